"""Property tests of core's whole Flight surface, through a plain pyarrow.flight client.

Random tickets, action types and bodies, descriptor commands and layer rows, sent with a token of
every role (and with forged or no credentials), must never reach a traceback, a Python exception
name or the last-resort ``internal error``; must never change the master version (unless the call
was a valid push and succeeded); and every refused call must leave exactly one refusal in the audit
log (failed logins counted through their ``count``).
"""

import base64
import json
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyprstream.core import signing, sql, tokens
from hyprstream.core.audit import AuditLog, parse_entry
from hyprstream.core.auth import Authenticator, Role
from hyprstream.coreapi.client import CoreClient
from hyprstream.coreapi.commands import SCHEMA
from hyprstream.consistency import ConsistencyMode, ConsistencyPolicy
from hyprstream.core.ratelimit import RateLimitPolicy
from hyprstream.core.repository import ModelRepository, ModelSettings
from hyprstream.core.server import CoreFlightServer
from hyprstream.core.storage import LocalStorage
from hyprstream.store.layer_table import to_table

pytestmark = pytest.mark.integration

TOKEN_KEY = signing.generate_key()
W0 = {"fc1.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc1.bias": np.zeros(2, np.float32),
      "head.weight": np.ones((1, 2), np.float32)}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LEAKS = re.compile(r"Traceback|Python exception|File \"|internal error|\b(?:Value|Type|Key|Index|Attribute|Recursion"
                   r"|Overflow|Memory|Runtime|Assertion|ZeroDivision|Unicode\w*)Error\b|ArrowInvalid|ArrowTypeError")


class Deployment:
    def __init__(self, root):
        self.audit = AuditLog(root / "audit.jsonl", signing.generate_key(), sync=False)
        self.repo = ModelRepository(LocalStorage(root / "models", sync=False), audit=self.audit)
        self.server = CoreFlightServer(self.repo, Authenticator(None, [TOKEN_KEY.public_key()]),
                                       rate_limit=RateLimitPolicy(requests_per_s=1e6, burst=10**6),
                                       token_key=TOKEN_KEY)
        self.location = self.server.start_background()
        now = time.time()
        self.tokens = {role: tokens.issue(TOKEN_KEY, sub, Role(role), ttl_s=3600, now=now)[0]
                       for role, sub in (("fog", "fog-a"), ("reader", "dash"), ("auditor", "aud"),
                                         ("admin", "admin"))}
        self.tokens["forged"] = tokens.issue(signing.generate_key(), "admin", Role.ADMIN, ttl_s=3600, now=now)[0]
        self.tokens["none"] = None
        policy = ConsistencyPolicy(ConsistencyMode.BOUNDED, max_staleness=1)
        with CoreClient(self.location, self.tokens["admin"]) as admin:
            admin.register_model("m", to_table(W0), ModelSettings(policy, max_update_norm=10.0))

    def options(self, who):
        tok = self.tokens[who]
        return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {tok}".encode())] if tok else [],
                                        timeout=30)

    def check(self, who, call, *, may_commit=False):
        """Run ``call(client, options)`` and check the invariants; returns its error, or None."""
        before_seq, before_version = self.audit.last_seq, self.repo.head("m")["version"]
        error = None
        try:
            call(flight.FlightClient(self.location), self.options(who))
        except (flight.FlightError, pa.ArrowException, OSError) as exc:  # get_schema answers OSError
            error = exc
        self.server.auth.refused.flush(all_windows=True)
        new = [parse_entry(line) for line in self.audit.read_lines(before_seq + 1)]
        refusals = sum(e.details.get("count", 1) if e.action == "auth.refused" else 1
                       for e in new if e.outcome in ("refused", "failed"))
        version = self.repo.head("m")["version"]
        if error is None:
            assert refusals == 0, [e.to_line() for e in new]
            assert version == before_version + (1 if may_commit and any(
                e.action == "model.push" and e.outcome == "ok" for e in new) else 0)
        else:
            message = str(error)
            assert not LEAKS.search(message), message
            assert refusals == 1, (message, [e.to_line() for e in new])
            assert version == before_version
        return error

    def close(self):
        self.server.stop()
        self.audit.close()


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("fuzz-core"))
    yield d
    d.close()


roles = st.sampled_from(["fog", "reader", "auditor", "admin", "forged", "none"])
names = st.sampled_from(["m", "fc1", "head", "fog-a", "admin", "nope", "", "../m", "m\n", "x" * 200]) | st.text(
    max_size=6)
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(width=64) | names)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
clocks = st.dictionaries(names, st.dictionaries(names, st.integers(-2, 2**64) | json_values, max_size=2)
                         | json_values, max_size=3)
COMMANDS = ["get_weights", "read_audit", "register_model", "push_delta", "head", "list_versions", "list_models",
            "audit_head", "issue_token"]
FIELDS = {"model": names, "version": st.integers(-1, 3) | json_values, "layers": st.lists(names, max_size=3)
          | json_values, "fog": names, "seq": st.integers(-1, 4) | json_values, "base_clocks": clocks,
          "participants": st.integers(-1, 10) | json_values, "privacy": st.dictionaries(names, scalars, max_size=2)
          | json_values, "transcript_sha256": st.just("ab" * 32) | names, "since_seq": st.integers(-1, 2**63)
          | json_values, "limit": st.integers(-1, 3) | json_values, "sub": names, "role": st.sampled_from(
              ["fog", "reader", "auditor", "admin", "root"]), "ttl_s": st.integers(-1, 2**40) | json_values,
          "consistency": st.dictionaries(st.sampled_from(["mode", "max_staleness", "mixing", "x"]), scalars,
                                         max_size=2) | json_values, "max_update_norm": scalars, "junk": json_values}
bodies = st.fixed_dictionaries(
    {"schema": st.sampled_from([SCHEMA, SCHEMA, "hyprstream.core/0"]),
     "command": st.sampled_from(COMMANDS) | names},
    optional=FIELDS)


def encode(body):
    return json.dumps(body).encode()  # NaN and Infinity come out as JSON's non-standard literals


flight_sql_commands = st.builds(  # core's other wire form: Flight SQL messages inside a protobuf Any
    sql.pack_any,
    st.sampled_from(["CommandStatementQuery", "CommandPreparedStatementQuery", "TicketStatementQuery",
                     "CommandGetTables", "CommandGetSqlInfo", "CommandGetDbSchemas", "CommandStatementUpdate",
                     "ActionCreatePreparedStatementRequest", "NoSuchCommand"]),
    st.lists(st.tuples(st.integers(1, 6), st.one_of(
        st.binary(max_size=24), st.integers(0, 2**64 - 1),
        st.sampled_from(["SELECT 1", "SELECT * FROM audit", "SELECT count(*) FROM versions", "DROP TABLE versions",
                         "SELECT * FROM read_csv('/etc/passwd')", "SELECT 1; SELECT 2", "%", ""]))), max_size=4))
raw_commands = st.one_of(
    bodies.map(encode),
    flight_sql_commands,
    st.binary(max_size=64),
    st.integers(1, 50_000).map(lambda n: b"[" * n),
    st.integers(1, 50_000).map(lambda n: b'{"a":' * n),
    st.integers(20, 6_000).map(lambda n: b'{"schema":"hyprstream.core/1","command":"get_weights","model":"m",'
                               b'"version":' + b"7" * n + b"}"),
    st.sampled_from([b"", b"{}", b"null", b"[]", b'"\\', b'{"schema":"hyprstream.core/1","command":"head",'
                     b'"model":"m","model":"m"}', b"1e999", b"-0", b"NaN", b"\xff\xfe{\x00}\x00"]),
)


@FUZZ
@given(who=roles, raw=raw_commands)
def test_random_tickets(core, who, raw):
    core.check(who, lambda client, opts: client.do_get(flight.Ticket(raw), opts).read_all())


@FUZZ
@given(who=roles, kind=st.sampled_from(["head", "list_versions", "list_models", "audit_head", "issue_token"])
       | names, raw=raw_commands)
def test_random_actions(core, who, kind, raw):
    core.check(who, lambda client, opts: list(client.do_action(flight.Action(kind, raw), opts)))


floats = st.lists(st.floats(width=32), min_size=0, max_size=6).map(lambda xs: np.array(xs, np.float32).tobytes())
rows = st.lists(st.fixed_dictionaries({
    "layer": st.sampled_from(["fc1", "head", "x"]) | names,
    "name": st.sampled_from(["fc1.weight", "fc1.bias", "head.weight", "z"]) | names,
    "dtype": st.sampled_from(["float32", "float32", "float64", "int8", "complex64", "object", "<f4", ""]),
    "shape": st.lists(st.sampled_from([0, 1, 2, 3, 2**31, 2**62, -1, -2**63, 2**63 - 1])
                      | st.integers(-2**63, 2**63 - 1), max_size=3),
    "data": floats | st.binary(max_size=40),
}), max_size=3)


def layer_rows(rows, variant):
    cols = {k: [r[k] for r in rows] for k in ("layer", "name", "dtype", "shape", "data")}
    shape_type = pa.list_(pa.int32()) if variant == "int32 shapes" else pa.list_(pa.int64())
    if variant == "int32 shapes":
        cols["shape"] = [[max(-2**31, min(2**31 - 1, d)) for d in s] for s in cols["shape"]]
    table = pa.table({"layer": pa.array(cols["layer"], pa.string()), "name": pa.array(cols["name"], pa.string()),
                      "dtype": pa.array(cols["dtype"], pa.string()), "shape": pa.array(cols["shape"], shape_type),
                      "data": pa.array(cols["data"], pa.binary() if variant == "binary data" else pa.large_binary())})
    if variant == "no data column":
        table = table.drop_columns(["data"])
    if variant == "null shape":
        table = table.set_column(3, "shape", pa.array([[None, 2]] * table.num_rows, pa.list_(pa.int64())))
    return table


def put(raw, table):
    def call(client, opts):
        writer, reader = client.do_put(flight.FlightDescriptor.for_command(raw), table.schema, opts)
        writer.write_table(table)
        writer.done_writing()
        reader.read()
        writer.close()
    return call


puts = st.fixed_dictionaries(
    {"schema": st.just(SCHEMA), "command": st.sampled_from(["push_delta", "push_delta", "register_model"])},
    optional={"model": st.sampled_from(["m", "m", "m2"]) | names, "fog": st.sampled_from(["fog-a", "admin"]) | names,
              "seq": st.integers(-1, 3) | json_values, "participants": st.integers(0, 3) | json_values,
              "base_clocks": st.sampled_from([{"fc1": {}}, {"head": {}}, {"fc1": {}, "head": {}}]) | clocks,
              "consistency": FIELDS["consistency"], "max_update_norm": scalars, "junk": json_values},
).map(encode)


@FUZZ
@given(who=roles, raw=puts | raw_commands, rows=rows,
       variant=st.sampled_from(["plain", "plain", "plain", "int32 shapes", "binary data", "no data column",
                                "null shape"]))
def test_random_descriptor_commands_and_layer_rows(core, who, raw, rows, variant):
    core.check(who, put(raw, layer_rows(rows, variant)), may_commit=True)


@FUZZ
@given(who=roles, method=st.sampled_from(["list_flights", "get_flight_info", "get_schema", "do_exchange",
                                          "list_actions"]), raw=raw_commands)
def test_the_other_flight_methods(core, who, method, raw):
    def call(client, opts):
        desc = flight.FlightDescriptor.for_command(raw)
        if method == "list_flights":
            list(client.list_flights(raw, opts))
        elif method == "get_flight_info":
            client.get_flight_info(desc, opts)
        elif method == "get_schema":
            client.get_schema(desc, opts)
        elif method == "do_exchange":
            writer, reader = client.do_exchange(desc, opts)
            writer.close()
        else:
            client.list_actions(opts)
    core.check(who, call)


def b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


headers = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=80).map(  # what gRPC sends as a header
        lambda text: b"Bearer " + text.encode()),
    st.tuples(bodies.map(encode) | st.binary(max_size=64) | st.integers(1, 4_000).map(lambda n: b"[" * n)
              | st.integers(20, 4_000).map(lambda n: b'{"sub":' + b"7" * n + b"}"), st.binary(max_size=70)).map(
        lambda parts: f"Bearer hst1.{b64(parts[0])}.{b64(parts[1])}".encode()),
    st.sampled_from([b"Bearer", b"Bearer ", b"Basic abc", b"bearer hst1..", b"Bearer hst1.e30.AA"]),
)


@FUZZ
@given(header=headers, method=st.sampled_from(["list_actions", "do_get", "get_schema"]))
def test_random_credentials(core, header, method):
    def call(client, _opts):
        opts = flight.FlightCallOptions(headers=[(b"authorization", header)], timeout=30)
        if method == "list_actions":
            client.list_actions(opts)
        elif method == "do_get":
            client.do_get(flight.Ticket(b"{}"), opts).read_all()
        else:
            client.get_schema(flight.FlightDescriptor.for_command(b"{}"), opts)
    core.check("none", call)
