"""Core's access rules and audit trail, through a plain pyarrow.flight client (no Hyprstream on the wire side)."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from hyprstream.core import audit, signing, tokens
from hyprstream.core.audit import AuditError, AuditLog, iter_entries, verify_bytes
from hyprstream.core.auth import Authenticator, Role
from hyprstream.core.certs import init_deployment
from hyprstream.coreapi.client import CoreClient
from hyprstream.consistency import ConsistencyMode, ConsistencyPolicy
from hyprstream.core.ratelimit import RateLimitPolicy
from hyprstream.core.repository import ModelRepository, ModelSettings
from hyprstream.core.server import CoreFlightServer
from hyprstream.core.storage import LocalStorage
from hyprstream.errors import TransportError
from hyprstream.store.layer_table import to_arrays, to_table

pytestmark = pytest.mark.integration

AUDIT_KEY = signing.generate_key()
TOKEN_KEY = signing.generate_key()
W0 = {"fc1.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc1.bias": np.zeros(2, np.float32),
      "head.weight": np.ones((1, 2), np.float32)}


def token(sub, role, ttl_s=3600, now=None, key=TOKEN_KEY):
    return tokens.issue(key, sub, role, ttl_s=ttl_s, now=time.time() if now is None else now)[0]


class Core:
    def __init__(self, root, rate=RateLimitPolicy(requests_per_s=1000.0, burst=1000), **server_kwargs):
        self.log_path = root / "audit.jsonl"
        self.audit = AuditLog(self.log_path, AUDIT_KEY, sync=False)
        self.repo = ModelRepository(LocalStorage(root / "models", sync=False), audit=self.audit)
        self.server = CoreFlightServer(self.repo, Authenticator(None, [TOKEN_KEY.public_key()]), rate_limit=rate,
                                       token_key=TOKEN_KEY, **server_kwargs)
        self.location = self.server.start_background()

    def entries(self):
        return list(iter_entries(self.log_path))

    def close(self):
        self.server.stop()
        self.audit.close()


@pytest.fixture()
def core(tmp_path):
    c = Core(tmp_path)
    policy = ConsistencyPolicy(ConsistencyMode.BOUNDED, max_staleness=1)
    with CoreClient(c.location, token("admin", Role.ADMIN)) as admin:
        admin.register_model("m", to_table(W0), ModelSettings(policy, max_update_norm=10.0))
    yield c
    c.close()


def opts(tok=None):
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {tok}".encode())] if tok else [])


def command(**body):
    return json.dumps({"schema": "hyprstream.core/1", **body}).encode()


def plain_get(location, tok, **body):
    return flight.FlightClient(location).do_get(flight.Ticket(command(**body)), opts(tok)).read_all()


def plain_action(location, tok, name, body=None):
    [res] = flight.FlightClient(location).do_action(flight.Action(name, json.dumps(body or {}).encode()), opts(tok))
    return json.loads(res.body.to_pybytes())


def plain_push(location, tok, delta, **body):
    table = delta if isinstance(delta, pa.Table) else to_table(delta)
    writer, reader = flight.FlightClient(location).do_put(
        flight.FlightDescriptor.for_command(command(command="push_delta", **body)), table.schema, opts(tok))
    writer.write_table(table)
    writer.done_writing()
    buf = reader.read()
    writer.close()
    return json.loads(buf.to_pybytes())


def test_no_credentials_expired_forged_or_wrong_role_are_refused_and_audited(core):
    get = {"command": "get_weights", "model": "m"}
    with pytest.raises(flight.FlightUnauthenticatedError, match="missing credentials"):
        plain_get(core.location, None, **get)
    with pytest.raises(flight.FlightUnauthenticatedError, match="malformed authorization header"):
        flight.FlightClient(core.location).do_get(flight.Ticket(command(**get)), flight.FlightCallOptions(
            headers=[(b"authorization", b"Basic Zm9nOnB3")])).read_all()
    expired = token("fog-a", Role.FOG, ttl_s=60, now=time.time() - 3600)
    with pytest.raises(flight.FlightUnauthenticatedError, match="token expired"):
        plain_get(core.location, expired, **get)
    forged = token("fog-a", Role.ADMIN, key=signing.generate_key())
    with pytest.raises(flight.FlightUnauthenticatedError, match="signature is not valid"):
        plain_get(core.location, forged, **get)
    with pytest.raises(flight.FlightUnauthenticatedError, match="invalid token"):
        plain_get(core.location, "guess", **get)

    reader, auditor, fog = token("dash", Role.READER), token("aud", Role.AUDITOR), token("fog-a", Role.FOG)
    d = {"fc1.bias": np.ones(2, np.float32)}
    with pytest.raises(flight.FlightUnauthorizedError, match="role 'reader' of 'dash' may not push"):
        plain_push(core.location, reader, d, model="m", fog="dash", seq=1, base_clocks={"fc1": {}}, participants=1)
    with pytest.raises(flight.FlightUnauthorizedError, match="may not push as fog 'fog-b'"):
        plain_push(core.location, fog, d, model="m", fog="fog-b", seq=1, base_clocks={"fc1": {}}, participants=1)
    with pytest.raises(flight.FlightUnauthorizedError, match="role 'auditor' of 'aud' may not read"):
        plain_get(core.location, auditor, **get)
    with pytest.raises(flight.FlightUnauthorizedError, match="may not audit_read"):
        plain_action(core.location, fog, "audit_head")
    with pytest.raises(flight.FlightUnauthorizedError, match="may not audit_read"):
        plain_get(core.location, reader, command="read_audit")
    with pytest.raises(flight.FlightUnauthorizedError, match="may not issue_token"):
        plain_action(core.location, fog, "issue_token", {"sub": "fog-a", "role": "admin", "ttl_s": 60})
    with pytest.raises(flight.FlightUnauthorizedError, match="may not register"):
        table = to_table(W0)
        w, _ = flight.FlightClient(core.location).do_put(flight.FlightDescriptor.for_command(
            command(command="register_model", model="m2")), table.schema, opts(fog))
        w.write_table(table)
        w.done_writing()
        w.close()

    core.server.auth.refused.flush(all_windows=True)  # what stopping core does
    refused = [e for e in core.entries() if e.outcome == "refused"]
    first, counted = refused[0], refused[-1]
    assert (first.actor, first.action, first.details) == ("anonymous", "auth.refused", {
        "method": "do_get", "reason": "missing credentials: send 'authorization: Bearer <token>'",
        "peer": "127.0.0.1", "count": 1})
    # the four later failed logins from the same address: one counted entry, every reason kept
    assert (counted.actor, counted.action, counted.details["peer"], counted.details["count"]) == (
        "anonymous", "auth.refused", "127.0.0.1", 4)
    reasons = counted.details["reasons"]
    assert [reasons[r] for r in ("malformed authorization header: expected 'Bearer <token>'",
                                 "token signature is not valid (not issued by this core's token key)",
                                 "invalid token")] == [1, 1, 1]
    assert [n for r, n in reasons.items() if r.startswith("token expired")] == [1]
    assert counted.details["claimed"] == {"anonymous": 2, "unverified:fog-a": 2}
    assert counted.details["methods"] == {"do_get": 4}
    assert [(e.actor, e.action) for e in refused[1:-1]] == [
        ("dash", "access.refused"), ("fog-a", "access.refused"), ("aud", "access.refused"),
        ("fog-a", "access.refused"), ("dash", "access.refused"), ("fog-a", "access.refused"),
        ("fog-a", "access.refused")]
    assert core.repo.head("m")["version"] == 0


def push_cases():
    ok = {"fc1.bias": np.ones(2, np.float32)}
    return [
        ("nan", {"fc1.bias": np.array([np.nan, 0], np.float32)}, {}, "fc1.bias: delta contains NaN or Inf"),
        ("inf", {"fc1.weight": np.full((2, 3), np.inf, np.float32)}, {}, "fc1.weight: delta contains NaN or Inf"),
        ("shape", {"fc1.weight": np.ones((3, 2), np.float32)}, {},
         "fc1.weight: shape [3, 2] differs from the model's [2, 3]"),
        ("dtype", {"fc1.bias": np.ones(2, np.float64)}, {}, "fc1.bias: dtype float64 differs from the model's float32"),
        ("unknown layer", {"fc9.weight": np.ones(2, np.float32)}, {}, "unknown parameter 'fc9.weight'"),
        ("wrong layer", to_table({"fc1.bias": np.ones(2, np.float32)}, layer=lambda _: "head"), {},
         "parameter 'fc1.bias' belongs to layer 'fc1', not 'head'"),
        ("norm", {"fc1.bias": np.full(2, 8.0, np.float32)}, {}, "update norm 11.3137 exceeds the model's bound 10"),
        ("stale", ok, {"stale": True}, "layer 'fc1': bounded consistency: staleness 2 exceeds max_staleness 1"),
        ("replay", ok, {"replay": True}, "replayed push: fog 'fog-a' already pushed seq 1, got 1"),
        ("no base clock", ok, {"base_clocks": {}}, "push lacks the base clock of layer 'fc1'"),
        # fc1's clocks so far: {}, {fog-b: 1}, {fog-b: 2}, {fog-b: 2, fog-c: 1}
        ("fabricated base clock", ok, {"history": True, "base_clocks": {"fc1": {"fog-b": 1, "fog-c": 1}}},
         "layer 'fc1': base clock {'fog-b': 1, 'fog-c': 1} is not the clock of any committed version"),
        ("base clock of another layer", ok, {"history": True, "base_clocks": {"fc1": {"fog-c": 1}}},
         "layer 'fc1': base clock {'fog-c': 1} is not the clock of any committed version"),
        ("base clock of an unknown fog", ok, {"history": True, "base_clocks": {"fc1": {"fog-z": 1}}},
         "layer 'fc1': base clock {'fog-z': 1} is not the clock of any committed version"),
    ]


@pytest.mark.parametrize("name, delta, setup, reason", push_cases(), ids=[c[0] for c in push_cases()])
def test_bad_pushes_are_refused_audited_and_change_nothing(core, name, delta, setup, reason):
    fog = token("fog-a", Role.FOG)
    body = {"model": "m", "fog": "fog-a", "seq": 1, "base_clocks": {"fc1": {}}, "participants": 1}
    if setup.get("stale"):  # fog-b commits twice on fc1: fog-a's base {} is now 2 updates behind
        for seq in (1, 2):
            plain_push(core.location, token("fog-b", Role.FOG), {"fc1.bias": np.full(2, seq, np.float32)},
                       **{**body, "fog": "fog-b", "seq": seq, "base_clocks": {"fc1": {"fog-b": seq - 1}}})
    if setup.get("replay"):
        plain_push(core.location, fog, delta, **body)
    if setup.get("history"):
        for f, seq, base in (("fog-b", 1, {}), ("fog-b", 2, {"fog-b": 1}), ("fog-c", 1, {"fog-b": 2})):
            plain_push(core.location, token(f, Role.FOG), {"fc1.bias": np.full(2, 0.5, np.float32)},
                       **{**body, "fog": f, "seq": seq, "base_clocks": {"fc1": base}})
        plain_push(core.location, token("fog-c", Role.FOG), {"head.weight": np.ones((1, 2), np.float32)},
                   **{**body, "fog": "fog-c", "seq": 2, "base_clocks": {"head": {}}})
    if "base_clocks" in setup:
        body["base_clocks"] = setup["base_clocks"]
    before_head = core.repo.head("m")
    before = to_arrays(plain_get(core.location, fog, command="get_weights", model="m"))
    with pytest.raises(flight.FlightServerError, match="invalid argument: ") as err:
        plain_push(core.location, fog, delta, **body)
    assert reason in str(err.value)
    assert core.repo.head("m") == before_head
    after = to_arrays(plain_get(core.location, fog, command="get_weights", model="m"))
    for k in W0:
        np.testing.assert_array_equal(after[k], before[k])
    refusal = [e for e in core.entries() if e.action == "model.push" and e.outcome == "refused"][-1]
    assert refusal.actor == "fog-a" and reason in refusal.details["reason"]
    assert (refusal.details["fog"], refusal.details["seq"]) == ("fog-a", 1)
    assert audit.verify_file(core.log_path, AUDIT_KEY.public_key()).ok


def test_reads_are_audited_and_auditors_can_fetch_and_verify_the_log(core):
    reader, auditor = token("dash", Role.READER), token("aud", Role.AUDITOR)
    plain_get(core.location, reader, command="get_weights", model="m", layers=["head"])
    read = core.entries()[-1]
    assert (read.actor, read.action, read.subject, read.outcome) == ("dash", "weights.read", "model/m", "ok")
    assert read.details == {"version": 0, "layers": ["head"], "bytes": 8}
    with pytest.raises(flight.FlightServerError, match="no version 9"):
        plain_get(core.location, reader, command="get_weights", model="m", version=9)
    assert core.entries()[-1].outcome == "refused" and core.entries()[-1].action == "weights.read"

    head = plain_action(core.location, auditor, "audit_head")
    assert audit.checkpoint_valid(audit.Checkpoint(**{k: v for k, v in head.items() if k != "schema"}),
                                  AUDIT_KEY.public_key())
    lines = plain_get(core.location, auditor, command="read_audit").column("line").to_pylist()
    data = "".join(x + "\n" for x in lines).encode()
    assert verify_bytes(data, json.dumps(head).encode(), AUDIT_KEY.public_key()).ok
    assert [e.action for e in core.entries()][-2:] == ["audit.read", "audit.read"]
    some = plain_get(core.location, auditor, command="read_audit", since_seq=2, limit=2)
    assert some.column("seq").to_pylist() == [2, 3]


def test_rate_limit_per_identity_is_enforced_and_audited(tmp_path):
    c = Core(tmp_path, rate=RateLimitPolicy(requests_per_s=0.001, burst=3))
    try:
        reader = token("dash", Role.READER)
        for _ in range(3):
            plain_action(c.location, reader, "list_models")
        with pytest.raises(flight.FlightUnavailableError, match="rate limit exceeded for 'dash'"):
            plain_action(c.location, reader, "list_models")
        assert plain_action(c.location, token("other", Role.READER), "list_models") == []
        with CoreClient(c.location, reader) as client, pytest.raises(TransportError, match="rate limit exceeded"):
            client.list_models()
        limited = [e for e in c.entries() if e.action == "rate.limited"]
        assert [(e.actor, e.outcome) for e in limited] == [("dash", "refused")] * 2
    finally:
        c.close()


def test_admin_issues_tokens_and_the_issue_is_audited(core):
    admin = token("admin", Role.ADMIN)
    issued = plain_action(core.location, admin, "issue_token", {"sub": "fog-c", "role": "fog", "ttl_s": 600})
    assert (issued["sub"], issued["role"], issued["exp"] - issued["iat"]) == ("fog-c", "fog", 600)
    assert plain_get(core.location, issued["token"], command="get_weights", model="m").num_rows == 3
    e = [e for e in core.entries() if e.action == "token.issue"][-1]
    assert (e.actor, e.subject, e.details["role"]) == ("admin", "identity/fog-c", "fog")
    assert e.details["jti"] == issued["jti"] and issued["token"] not in e.to_line().decode()
    with pytest.raises(flight.FlightServerError,
                       match=r"invalid argument: unknown role 'root' \(known: fog, reader, auditor, admin\)"):
        plain_action(core.location, admin, "issue_token", {"sub": "x", "role": "root", "ttl_s": 60})
    refusals = sum(e.action == "token.issue" and e.outcome == "refused" for e in core.entries())
    for body, why in [({"sub": "core", "role": "admin", "ttl_s": 60}, "reserved"),
                      ({"sub": "Anonymous", "role": "reader", "ttl_s": 60}, "reserved"),
                      ({"sub": "fog-c", "role": "fog", "ttl_s": 100 * 365 * 86400}, "at most 366 days")]:
        with pytest.raises(flight.FlightServerError, match=f"invalid argument: .*{why}"):
            plain_action(core.location, admin, "issue_token", body)
    assert sum(e.action == "token.issue" and e.outcome == "refused" for e in core.entries()) == refusals + 3


def test_fails_closed_when_the_audit_log_cannot_be_written(core, monkeypatch):
    def broken(*a, **k):
        raise AuditError("disk full")

    monkeypatch.setattr(core.audit, "append", broken)
    with pytest.raises(flight.FlightServerError, match="cannot record this call in its audit log"):
        plain_get(core.location, token("dash", Role.READER), command="get_weights", model="m")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    init_deployment(out, clients=["fog-a"])
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_tls_and_mutual_tls(tmp_path, pki):
    c = Core(tmp_path, location="grpc+tls://127.0.0.1:0",
             tls_certificates=[(pki["server.pem"], pki["server.key"])], verify_client=True,
             root_certificates=pki["ca.pem"])
    try:
        assert c.location.startswith("grpc+tls://localhost:")
        reader = token("dash", Role.READER)
        with CoreClient(c.location, reader, tls_root_certs=pki["ca.pem"], cert_chain=pki["client-fog-a.pem"],
                        private_key=pki["client-fog-a.key"]) as ok:
            assert ok.list_models() == []
        with CoreClient(c.location, reader, tls_root_certs=pki["ca.pem"], timeout_s=10) as no_cert:
            with pytest.raises(TransportError):
                no_cert.list_models()
        with CoreClient(c.location, reader, timeout_s=10) as untrusted:  # the server's CA is not trusted
            with pytest.raises(TransportError):
                untrusted.list_models()
    finally:
        c.close()


# --- crafted commands: refused at the boundary, audited, never a traceback ------------------------

def huge_shape_table(name="fc1.weight", layer="fc1"):
    return pa.table({"layer": [layer], "name": [name], "dtype": ["float32"],
                     "shape": pa.array([[2**62, 4]], pa.list_(pa.int64())), "data": pa.array([b""], pa.large_binary())})


def plain_put(location, tok, body, table):
    writer, reader = flight.FlightClient(location).do_put(
        flight.FlightDescriptor.for_command(json.dumps(body).encode() if isinstance(body, dict) else body),
        table.schema, opts(tok))
    writer.write_table(table)
    writer.done_writing()
    reader.read()
    writer.close()


def crafted_cases():
    schema = {"schema": "hyprstream.core/1"}
    big = "9" * 5000
    push = {**schema, "command": "push_delta", "model": "m", "fog": "admin", "seq": 1, "base_clocks": {"fc1": {}},
            "participants": 1}
    return [
        ("nested ticket", "reader", lambda c, t: plain_get_raw(c, t, b"[" * 100_000), "nests deeper than"),
        ("long int in ticket", "reader",
         lambda c, t: plain_get_raw(c, t, ('{"schema":"hyprstream.core/1","command":"get_weights","model":"m",'
                                           f'"version":{big}}}').encode()), "number longer than"),
        ("long int in action body", "auditor",
         lambda c, t: list(flight.FlightClient(c).do_action(flight.Action("audit_head", f'{{"x":{big}}}'.encode()),
                                                             opts(t))), "number longer than"),
        ("nested action body", "reader",
         lambda c, t: list(flight.FlightClient(c).do_action(flight.Action("head", b"[" * 100_000), opts(t))),
         "nests deeper than"),
        ("unknown action", "auditor",
         lambda c, t: list(flight.FlightClient(c).do_action(flight.Action("drop", b"{}"), opts(t))),
         "unknown action 'drop'"),
        ("huge shape in push", "admin", lambda c, t: plain_put(c, t, push, huge_shape_table()),
         "0 bytes do not match dtype float32 and shape [4611686018427387904, 4]"),
        ("huge shape in register", "admin",
         lambda c, t: plain_put(c, t, {**schema, "command": "register_model", "model": "m2"}, huge_shape_table()),
         "0 bytes do not match dtype float32 and shape [4611686018427387904, 4]"),
        ("get_flight_info", "reader",
         lambda c, t: flight.FlightClient(c).get_flight_info(flight.FlightDescriptor.for_command(b"{}"), opts(t)),
         "core serves get_flight_info for Flight SQL commands only"),
        ("list_flights", "reader", lambda c, t: list(flight.FlightClient(c).list_flights(b"", opts(t))),
         "core does not serve list_flights"),
    ]


def plain_get_raw(location, tok, raw):
    return flight.FlightClient(location).do_get(flight.Ticket(raw), opts(tok)).read_all()


@pytest.mark.parametrize("name, role, call, reason", crafted_cases(), ids=[c[0] for c in crafted_cases()])
def test_crafted_commands_are_refused_and_audited_without_a_traceback(core, name, role, call, reason):
    before = len(core.entries())
    with pytest.raises(flight.FlightServerError) as err:
        call(core.location, token(role, Role(role)))
    message = str(err.value)
    assert "invalid argument: " in message and reason in message
    assert "Traceback" not in message and "Python exception" not in message
    new = core.entries()[before:]
    assert [(e.actor, e.outcome) for e in new] == [(role, "refused")]
    assert reason in new[0].details["reason"]
    assert core.repo.head("m")["version"] == 0 and core.repo.models() == ["m"]


def test_readers_and_auditors_are_refused_before_a_put_command_is_decoded(core):
    for role in ("reader", "auditor"):
        before = len(core.entries())
        with pytest.raises(flight.FlightUnauthorizedError, match=f"role '{role}' of '{role}' may not push or register"):
            plain_put(core.location, token(role, Role(role)), b"[" * 100_000, to_table(W0))
        [e] = core.entries()[before:]
        assert (e.actor, e.action, e.outcome, e.details["request"]) == (role, "access.refused", "refused", "do_put")


def test_an_unexpected_failure_reaches_the_client_as_an_internal_error_id(core, monkeypatch, caplog):
    def broken(model):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(core.repo, "head", broken)
    with pytest.raises(flight.FlightServerError) as err:
        plain_action(core.location, token("dash", Role.READER), "head", {"model": "m"})
    message = str(err.value)
    assert "secret internals" not in message and "Traceback" not in message and "RuntimeError" not in message
    incident = message.split("internal error ", 1)[1].split(".")[0].split()[0]
    failed = core.entries()[-1]
    assert (failed.actor, failed.action, failed.outcome) == ("dash", "request.failed", "failed")
    assert failed.details == {"incident": incident, "request": "do_action", "error": "RuntimeError"}
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and "secret internals" in "".join(r.exc_text or "" for r in logged)


# --- refused logins: throttled per peer address, audited as counted entries ------------------------

def test_refused_logins_are_throttled_per_peer_and_audited_as_counted_entries(tmp_path):
    c = Core(tmp_path, rate=RateLimitPolicy(requests_per_s=1000.0, burst=1000, refused_logins_per_s=0.001,
                                            refused_login_burst=5))
    stopped = False
    try:
        before = len(c.entries())
        n = 60
        errors = []
        for i in range(n):
            forged = token(f"fog-{i}", Role.ADMIN, key=signing.generate_key())
            try:
                plain_action(c.location, forged, "list_models")
            except flight.FlightError as exc:
                errors.append(exc)
        assert len(errors) == n
        assert all(isinstance(e, flight.FlightUnauthenticatedError) for e in errors[:5])
        assert all("signature is not valid" in str(e) for e in errors[:5])
        throttled = errors[5:]
        assert all(isinstance(e, flight.FlightUnavailableError) for e in throttled)
        assert all("too many refused logins from '127.0.0.1': retry in" in str(e) for e in throttled)
        # a valid token from the same address still works while the forged ones are throttled
        assert plain_action(c.location, token("dash", Role.READER), "list_models") == []
        written_while_running = [e for e in c.entries()[before:] if e.action == "auth.refused"]
        assert 1 <= len(written_while_running) < 5
        c.close()
        stopped = True
        refused = [e for e in c.entries()[before:] if e.action == "auth.refused"]
        assert len(refused) <= 3
        assert sum(e.details["count"] for e in refused) == n
        assert {e.details["peer"] for e in refused} == {"127.0.0.1"}
        assert all(e.outcome == "refused" for e in refused)
        assert audit.verify_file(c.log_path, AUDIT_KEY.public_key()).ok
    finally:
        if not stopped:
            c.close()


# --- token revocation --------------------------------------------------------------------------------

def test_a_revoked_token_is_refused_also_after_a_restart_and_only_admins_revoke(tmp_path):
    c = Core(tmp_path)
    fog_token, claims = tokens.issue(TOKEN_KEY, "fog-a", Role.FOG, ttl_s=3600, now=time.time())
    admin, reader = token("admin", Role.ADMIN), token("dash", Role.READER)
    try:
        assert plain_action(c.location, fog_token, "list_models") == []
        with pytest.raises(flight.FlightUnauthorizedError, match="role 'reader' of 'dash' may not revoke_token"):
            plain_action(c.location, reader, "revoke_token", {"jti": claims.jti, "reason": "lost"})
        refused = c.entries()[-1]
        assert (refused.actor, refused.action, refused.outcome) == ("dash", "access.refused", "refused")
        assert plain_action(c.location, fog_token, "list_models") == []  # a refused revocation revokes nothing

        answer = plain_action(c.location, admin, "revoke_token", {"jti": claims.jti, "reason": "laptop lost"})
        assert answer == {"jti": claims.jti, "revoked": True, "already": False}
        revoked = c.entries()[-1]
        assert (revoked.actor, revoked.action, revoked.subject, revoked.outcome) == (
            "admin", "token.revoke", f"token/{claims.jti}", "ok")
        assert revoked.details == {"jti": claims.jti, "reason": "laptop lost"}
        with pytest.raises(flight.FlightUnauthenticatedError, match=f"token revoked \\(jti {claims.jti}\\)"):
            plain_action(c.location, fog_token, "list_models")
        assert plain_action(c.location, admin, "revoke_token", {"jti": claims.jti})["already"] is True
        with pytest.raises(flight.FlightServerError, match="invalid argument: field 'jti' must be a token's jti"):
            plain_action(c.location, admin, "revoke_token", {"jti": "../x"})
    finally:
        c.close()
    logins = [e for e in c.entries() if e.action == "auth.refused"]
    assert [(e.actor, e.details["reason"], e.details["count"]) for e in logins] == [
        ("unverified:fog-a", f"token revoked (jti {claims.jti})", 1)]

    again = Core(tmp_path)  # a restart: the revocation is read back from the audit log
    try:
        with pytest.raises(flight.FlightUnauthenticatedError, match="token revoked"):
            plain_action(again.location, fog_token, "list_models")
        assert plain_action(again.location, token("fog-a", Role.FOG), "list_models") == []  # a new token works
    finally:
        again.close()
    assert audit.verify_file(again.log_path, AUDIT_KEY.public_key()).ok


def test_token_revoke_cli_records_the_revocation_for_a_stopped_core(tmp_path, capsys):
    from hyprstream.cli import main

    fog_token, claims = tokens.issue(TOKEN_KEY, "fog-a", Role.FOG, ttl_s=3600, now=time.time())
    Core(tmp_path).close()  # a core that ran once and is stopped
    key_file = tmp_path / "audit-signing.key"
    signing.write_private_key(key_file, AUDIT_KEY)
    assert main(["token", "revoke", "--jti", claims.jti, "--reason", "laptop lost", "--audit-log",
                 str(tmp_path / "audit.jsonl"), "--audit-key", str(key_file)]) == 0
    assert f"revoked token {claims.jti}" in capsys.readouterr().err
    c = Core(tmp_path)
    try:
        e = [e for e in c.entries() if e.action == "token.revoke"][-1]
        assert (e.actor, e.subject, e.details["jti"], e.details["reason"]) == (
            "cli", f"token/{claims.jti}", claims.jti, "laptop lost")
        assert e.details["via"] == "hyprstream token revoke"
        with pytest.raises(flight.FlightUnauthenticatedError, match="token revoked"):
            plain_action(c.location, fog_token, "list_models")
    finally:
        c.close()
    # while core runs, it holds the audit log: the CLI says to use the revoke_token action
    c = Core(tmp_path)
    try:
        assert main(["token", "revoke", "--jti", "ab" * 8, "--audit-log", str(tmp_path / "audit.jsonl"),
                     "--audit-key", str(key_file)]) == 1
        assert "revoke_token action" in capsys.readouterr().err
    finally:
        c.close()


@pytest.mark.parametrize("field, value", [("seq", 2**63), ("participants", 2**64)])
def test_integers_beyond_64_bits_are_refused(core, field, value):
    body = {"model": "m", "fog": "fog-a", "seq": 1, "base_clocks": {"fc1": {}}, "participants": 1, field: value}
    with pytest.raises(flight.FlightServerError, match=f"invalid argument: field '{field}' is outside the 64-bit"):
        plain_push(core.location, token("fog-a", Role.FOG), {"fc1.bias": np.ones(2, np.float32)}, **body)
    assert core.repo.head("m")["version"] == 0
    assert core.entries()[-1].outcome == "refused"
