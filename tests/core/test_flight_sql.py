"""SQL over the federation: core's read-only Arrow Flight SQL endpoint, queried with the ADBC Flight SQL
driver (the one BI tools use) over mutual TLS with the deployment's tokens and roles, checked against the
Flight API's own answers; and what an attacker with a token tries: reading a table its role may not,
writing, reaching files, running away with time or rows, redeeming someone else's results, crafted
protobuf."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import adbc_driver_flightsql.dbapi as flight_sql
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from adbc_driver_flightsql import DatabaseOptions
from hypothesis import given, settings
from hypothesis import strategies as st

from coreproc import make_deployment
from hyprstream.core import sql
from hyprstream.core.audit import iter_entries
from hyprstream.core.auth import Role
from hyprstream.core.certs import init_deployment
from hyprstream.core.config import load_core_config
from hyprstream.core.service import CoreService
from hyprstream.coreapi.client import CoreClient
from hyprstream.errors import ValidationError
from hyprstream.store.layer_table import to_table
from hyprstream.vector_clock import VectorClock

W0 = {"fc1.weight": np.zeros((4, 3), np.float32), "fc1.bias": np.zeros(4, np.float32),
      "head.weight": np.zeros((2, 4), np.float32)}


def layer_of(name: str) -> str:
    return name.split(".")[0]


class Federation:
    """A core with TLS, client certificates, metrics, one model and three pushes from two fogs."""

    def __init__(self, root: Path) -> None:
        pki = root / "pki"
        init_deployment(pki, clients=["dash"])
        self.pki = {p.name: p.read_bytes() for p in pki.iterdir()}
        self.dep = make_deployment(root / "core", tls={"enabled": "true", "cert": str(pki / "server.pem"),
                                                       "key": str(pki / "server.key"),
                                                       "client_ca": str(pki / "ca.pem")})
        self.dep.config.write_text(self.dep.config.read_text().replace('enabled = "true"', "enabled = true"))
        self.service = CoreService(load_core_config(self.dep.config))
        self.location = self.service.location
        with self.client("admin", Role.ADMIN) as admin:
            admin.register_model("m", to_table(W0, layer=layer_of))
        clocks = {"fc1": VectorClock(), "head": VectorClock()}
        for seq, fog, layers, participants in ((1, "fog-a", ("fc1", "head"), 3), (1, "fog-b", ("head",), 5),
                                               (2, "fog-a", ("head",), 2)):
            delta = {k: np.full_like(v, 0.01 * seq) for k, v in W0.items() if layer_of(k) in layers}
            with self.client(fog, Role.FOG) as c:
                c.push_delta("m", to_table(delta, layer=layer_of), fog=fog, seq=seq,
                             base_clocks={k: clocks[k] for k in layers}, participants=participants)
            with self.client("admin", Role.ADMIN) as admin:
                clocks = {k: VectorClock.of(c) for k, c in admin.head("m")["clocks"].items()}

    def client(self, sub: str, role: Role) -> CoreClient:
        return CoreClient(self.location, self.dep.token(sub, role), tls_root_certs=self.pki["ca.pem"],
                          cert_chain=self.pki["client-dash.pem"], private_key=self.pki["client-dash.key"])

    def adbc(self, sub: str, role: Role, *, client_cert: bool = True):
        """A DB-API connection through the ADBC Flight SQL driver, as a BI tool makes it."""
        options = {DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {self.dep.token(sub, role)}",
                   DatabaseOptions.TLS_ROOT_CERTS.value: self.pki["ca.pem"].decode(),
                   DatabaseOptions.TIMEOUT_QUERY.value: "30"}
        if client_cert:
            options[DatabaseOptions.MTLS_CERT_CHAIN.value] = self.pki["client-dash.pem"].decode()
            options[DatabaseOptions.MTLS_PRIVATE_KEY.value] = self.pki["client-dash.key"].decode()
        return flight_sql.connect(self.location, db_kwargs=options, autocommit=True)

    def raw(self, sub: str, role: Role) -> tuple[flight.FlightClient, flight.FlightCallOptions]:
        client = flight.FlightClient(self.location, tls_root_certs=self.pki["ca.pem"],
                                     cert_chain=self.pki["client-dash.pem"], private_key=self.pki["client-dash.key"])
        return client, flight.FlightCallOptions(
            headers=[(b"authorization", f"Bearer {self.dep.token(sub, role)}".encode())], timeout=30)

    def entries(self):
        return list(iter_entries(self.dep.audit_log))


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    f = Federation(tmp_path_factory.mktemp("sql"))
    yield f
    f.service.stop()


def query(conn, text: str) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute(text)
        return cur.fetch_arrow_table().to_pylist()


@pytest.mark.integration
def test_adbc_queries_the_lineage_clocks_fogs_and_metrics_as_the_api_reports_them(fed):
    with fed.client("dash", Role.READER) as api:
        lineage = api.list_versions("m")
    with fed.adbc("dash", Role.READER) as conn:
        versions = query(conn, "SELECT version, parent, fog, seq, participants, layers, update_norm, created "
                               "FROM versions WHERE model = 'm' ORDER BY version")
        fogs = query(conn, "SELECT fog, pushes, last_seq, last_version, participants FROM main.fogs ORDER BY fog")
        clocks = query(conn, "SELECT layer, node, counter FROM layer_clocks JOIN models USING (model, version) "
                             "ORDER BY layer, node")
        models = query(conn, "SELECT model, version, layers FROM models")
        pushes = query(conn, "SELECT labels, value FROM metrics WHERE name = 'hyprstream_core_pushes_total'")
        listed = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        schema = conn.adbc_get_table_schema("versions", db_schema_filter="main")
        info = conn.adbc_get_info()
    assert [v["version"] for v in versions] == [v["version"] for v in lineage] == [0, 1, 2, 3]
    for row, api_row in zip(versions, lineage):
        assert (row["parent"], row["fog"], row["seq"], row["participants"], sorted(row["layers"])) == (
            api_row["parent"], api_row["fog"], api_row["seq"], api_row["participants"], sorted(api_row["layers"]))
        assert row["update_norm"] == api_row["update_norm"]
        assert abs(row["created"].timestamp() - api_row["created"]) < 1e-5
    assert fogs == [{"fog": "fog-a", "pushes": 2, "last_seq": 2, "last_version": 3, "participants": 5},
                    {"fog": "fog-b", "pushes": 1, "last_seq": 1, "last_version": 2, "participants": 5}]
    head = lineage[-1]["clocks"]
    assert clocks == [{"layer": layer, "node": node, "counter": n}
                      for layer in sorted(head) for node, n in sorted(head[layer].items())]
    assert clocks == [{"layer": "fc1", "node": "fog-a", "counter": 1}, {"layer": "head", "node": "fog-a", "counter": 2},
                      {"layer": "head", "node": "fog-b", "counter": 1}]
    assert models == [{"model": "m", "version": 3, "layers": 2}]
    assert sorted((json.loads(p["labels"])["fog"], p["value"]) for p in pushes) == [("fog-a", 2.0), ("fog-b", 1.0)]
    tables = [t["table_name"] for c in listed for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]]
    assert sorted(tables) == sorted(set(sql.TABLES) - {"audit"})  # a reader is not shown the audit log
    assert schema == sql.TABLES["versions"]
    assert info["vendor_name"] == "hyprstream core"
    ok = [e for e in fed.entries() if e.action == "sql.query" and e.actor == "dash"]
    assert {tuple(e.details["tables"]) for e in ok} >= {("versions",), ("fogs",), ("layer_clocks", "models")}
    assert all("query" not in e.details and len(e.details["query_sha256"]) == 64 for e in ok)


@pytest.mark.integration
def test_the_audit_table_is_for_auditors_and_each_role_sees_only_its_tables(fed):
    with fed.adbc("auditor", Role.AUDITOR) as conn:
        rows = query(conn, "SELECT seq, action, outcome, details FROM audit ORDER BY seq")
        with pytest.raises(flight_sql.ProgrammingError, match="may not read table versions"):
            query(conn, "SELECT count(*) FROM versions")
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    by_seq = {e.seq: e for e in fed.entries()}
    assert all(json.loads(r["details"]) == by_seq[r["seq"]].details and r["action"] == by_seq[r["seq"]].action
               for r in rows)
    assert sum(r["action"] == "model.push" for r in rows) == 3
    with fed.adbc("dash", Role.READER) as conn:
        for text in ("SELECT * FROM audit", "SELECT count(*) FROM versions WHERE version > (SELECT max(seq) FROM audit)",
                     "WITH a AS (SELECT * FROM versions) SELECT * FROM a, AUDIT"):
            with pytest.raises(flight_sql.ProgrammingError, match="role 'reader' of 'dash' may not read table audit"):
                query(conn, text)
    refused = [e for e in fed.entries() if e.action == "access.refused" and e.actor == "dash"]
    assert len(refused) >= 3 and all(e.details["request"] == "sql.query" for e in refused)


@pytest.mark.integration
@pytest.mark.parametrize("text, reason", [
    ("CREATE TABLE x AS SELECT 1", "only SELECT queries are served, not CREATE"),
    ("INSERT INTO versions VALUES (1)", "only SELECT queries are served, not INSERT"),
    ("COPY versions TO '/tmp/hyprstream-sql-leak.csv'", "only SELECT queries are served, not COPY"),
    ("ATTACH '/tmp/hyprstream-sql-leak.db'", "only SELECT queries are served, not ATTACH"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM read_text('/etc/hostname')", "file system operations are disabled"),
    ("SELECT 1; SELECT 2", "one SQL statement per query, got 2"),
    ("PRAGMA version", "not PRAGMA"),
    ("SET enable_external_access = true", "not SET"),
    ("SELECT * FROM nowhere", "Table with name nowhere does not exist"),
    ("SELEC 1", "syntax error"),
])
def test_writes_files_and_settings_are_out_of_reach(fed, text, reason):
    with fed.adbc("dash", Role.READER) as conn:
        with pytest.raises(flight_sql.Error, match=reason):
            query(conn, text)
    assert not Path("/tmp/hyprstream-sql-leak.csv").exists() and not Path("/tmp/hyprstream-sql-leak.db").exists()
    assert not [e for e in fed.entries() if e.action == "request.failed"]  # refused, never an internal error


@pytest.mark.integration
def test_a_client_without_a_certificate_or_a_token_gets_nothing(fed):
    with pytest.raises(flight_sql.Error):
        with fed.adbc("dash", Role.READER, client_cert=False) as conn:
            query(conn, "SELECT count(*) FROM versions")
    client, _ = fed.raw("dash", Role.READER)
    command = flight.FlightDescriptor.for_command(sql.pack_any("CommandStatementQuery", [(1, "SELECT 1")]))
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.get_flight_info(command)


@pytest.mark.integration
def test_results_are_read_once_and_only_by_who_asked(fed):
    client, reader = fed.raw("dash", Role.READER)
    _, other = fed.raw("eve", Role.READER)
    info = client.get_flight_info(flight.FlightDescriptor.for_command(
        sql.pack_any("CommandStatementQuery", [(1, "SELECT version FROM versions ORDER BY version")])), reader)
    ticket = info.endpoints[0].ticket
    assert info.total_records == 4
    with pytest.raises(flight.FlightServerError, match="unknown or expired handle"):
        client.do_get(ticket, other).read_all()
    assert client.do_get(ticket, reader).read_all().column("version").to_pylist() == [0, 1, 2, 3]
    with pytest.raises(flight.FlightServerError, match="unknown or expired handle"):
        client.do_get(ticket, reader).read_all()
    prepared = list(client.do_action(flight.Action("CreatePreparedStatement", sql.pack_any(
        "ActionCreatePreparedStatementRequest", [(1, "SELECT count(*) AS n FROM versions")])), reader))
    handle = sql.unpack_any(prepared[0].body.to_pybytes())[1][1][0]
    run = flight.FlightDescriptor.for_command(sql.pack_any("CommandPreparedStatementQuery", [(1, handle)]))
    with pytest.raises(flight.FlightServerError, match="unknown or expired handle"):
        client.get_flight_info(run, other)
    for _ in range(2):  # a prepared query runs as often as its owner likes, until closed
        info = client.get_flight_info(run, reader)
        assert client.do_get(info.endpoints[0].ticket, reader).read_all().column("n").to_pylist() == [4]
    list(client.do_action(flight.Action("ClosePreparedStatement", sql.pack_any(
        "ActionClosePreparedStatementRequest", [(1, handle)])), reader))
    with pytest.raises(flight.FlightServerError, match="unknown or expired handle"):
        client.get_flight_info(run, reader)
    with pytest.raises(flight.FlightServerError, match="binds no parameters"):
        prepared = list(client.do_action(flight.Action("CreatePreparedStatement", sql.pack_any(
            "ActionCreatePreparedStatementRequest", [(1, "SELECT ? AS x")])), reader))
        bind = flight.FlightDescriptor.for_command(sql.pack_any("CommandPreparedStatementQuery", [
            (1, sql.unpack_any(prepared[0].body.to_pybytes())[1][1][0])]))
        writer, _ = client.do_put(bind, pa.schema([("x", pa.int64())]), reader)
        writer.write_table(pa.table({"x": [1]}))
        writer.close()
    with pytest.raises(flight.FlightServerError, match="without transactions: BeginTransaction"):
        list(client.do_action(flight.Action("BeginTransaction", b""), reader))


@pytest.mark.integration
@pytest.mark.parametrize("raw", [
    sql.pack_any("CommandStatementQuery"),  # no query
    sql.pack_any("CommandStatementUpdate", [(1, "DELETE FROM versions")]),
    sql.pack_any("CommandStatementQuery", [(1, b"\xff\xfe")]),  # not UTF-8
    sql.pack_any("CommandStatementQuery")[:-1] + b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end
    sql.encode([(1, sql.TYPE_PREFIX + "CommandStatementQuery"), (2, b"\x0f")]),  # wire type 7
    sql.pack_any("CommandGetTables", [(3, b"\xff")]),  # a table pattern that is not UTF-8
    sql.pack_any("CommandGetSqlInfo", [(1, b"\xff")]),  # packed ids that end inside a varint
], ids=["empty", "update", "not-utf8", "overlong", "wire-type", "tables-pattern", "sql-info"])
def test_crafted_flight_sql_commands_are_refused_as_invalid_arguments(fed, raw):
    client, reader = fed.raw("dash", Role.READER)
    with pytest.raises(flight.FlightServerError, match="invalid argument"):
        client.get_flight_info(flight.FlightDescriptor.for_command(raw), reader)
    with pytest.raises(flight.FlightServerError, match="invalid argument"):
        client.do_get(flight.Ticket(raw), reader).read_all()
    assert not [e for e in fed.entries() if e.action == "request.failed"]


# --- the query engine's bounds, and the protobuf codec ----------------------------------------------------

@pytest.mark.unit
def test_held_handles_expire_unused_are_bounded_per_identity_and_results_are_read_once():
    now = [0.0]
    limits = sql.Limits(pending=2, pending_s=300.0)
    prepared = sql.Handles(limits, "prepared queries", once=False, clock=lambda: now[0])
    h = prepared.put("a", "SELECT 1")
    for _ in range(3):  # each use keeps it another 300 s
        now[0] += 200
        assert prepared.take("a", h) == "SELECT 1"
    now[0] += 301
    with pytest.raises(ValidationError, match="unknown or expired"):
        prepared.take("a", h)
    prepared.put("a", "q1"), prepared.put("a", "q2"), prepared.put("b", "q3")  # b has its own two
    with pytest.raises(ValidationError, match="2 prepared queries are held for 'a'"):
        prepared.put("a", "q4")
    results = sql.Handles(limits, "results", once=True, clock=lambda: now[0])
    r = results.put("a", "rows")
    with pytest.raises(ValidationError):
        results.take("b", r)
    assert results.take("a", r) == "rows"
    with pytest.raises(ValidationError):
        results.take("a", r)


@pytest.mark.unit
def test_a_query_past_its_time_or_row_limit_is_stopped_with_a_reason():
    tables = {"t": pa.table({"a": list(range(10))})}
    with pytest.raises(ValidationError, match="stopped after 0.5 s"):
        sql.execute("SELECT count(*) FROM range(100000000000) a, range(100000000) b", [], lambda n: {},
                    sql.Limits(timeout_s=0.5))
    with pytest.raises(ValidationError, match="more than 5 rows"):
        sql.execute("SELECT * FROM range(6)", [], lambda n: {}, sql.Limits(max_rows=5))
    with pytest.raises(ValidationError, match="characters refused"):
        sql.execute("SELECT 1" + " " * sql.MAX_QUERY_CHARS, [], lambda n: {}, sql.Limits())
    built = []
    out = sql.execute("SELECT sum(a) AS s FROM versions", ["versions", "fogs"],
                      lambda names: built.append(names) or {"versions": tables["t"]}, sql.Limits())
    assert out.column("s").to_pylist() == [45] and built == [{"versions"}]  # only the named table is built


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**29 - 1), st.one_of(st.binary(max_size=40), st.integers(0, 2**64 - 1)))))
def test_protobuf_fields_round_trip(fields):
    decoded = sql.decode(sql.encode(fields))
    expected: dict = {}
    for number, value in fields:
        expected.setdefault(number, []).append(value)
    assert decoded == expected


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_to_fields_or_a_validation_error(raw):
    with contextlib.suppress(ValidationError):  # anything else fails the test
        sql.decode(raw)
        sql.unpack_any(raw)
