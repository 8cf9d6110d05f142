"""Core's Flight API through a plain pyarrow.flight client (no Hyprstream client on the wire side)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.vector_clock import VectorClock
from hyprstream.errors import AuthError, Refusal, UpdateRejected
from hyprstream.store.layer_table import to_arrays, to_table

pytestmark = pytest.mark.integration

W0 = {
    "fc1.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "fc1.bias": np.zeros(2, np.float32),
    "head.weight": np.ones((1, 2), np.float32),
}


@pytest.fixture()
def core(tmp_path):
    tokens = TokenRegistry()
    tokens.add("admin-secret", Principal("admin", Role.ADMIN))
    tokens.add("fog-secret", Principal("fog-a", Role.FOG))
    tokens.add("reader-secret", Principal("dash", Role.READER))
    server = CoreFlightServer(ModelRepository(tmp_path), tokens)
    location = server.start_background()
    with CoreClient(location, "admin-secret") as admin:
        admin.register_model("m", to_table(W0))
    yield location
    server.stop()


def opts(token):
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def command(**body):
    return json.dumps({"schema": "hyprstream.core/1", **body}).encode()


def plain_get(location, token, **body):
    client = flight.FlightClient(location)
    return client.do_get(flight.Ticket(command(command="get_weights", **body)), opts(token)).read_all()


def plain_push(location, token, delta, **body):
    client = flight.FlightClient(location)
    table = to_table(delta)
    desc = flight.FlightDescriptor.for_command(command(command="push_delta", **body))
    writer, reader = client.do_put(desc, table.schema, opts(token))
    writer.write_table(table)
    writer.done_writing()
    buf = reader.read()
    writer.close()  # raises the server's error, if it refused the call
    return json.loads(buf.to_pybytes())


def test_plain_client_reads_and_pushes(core):
    table = plain_get(core, "fog-secret", model="m")
    meta = table.schema.metadata
    assert int(meta[b"hyprstream.version"]) == 0
    clocks = json.loads(meta[b"hyprstream.clocks"])
    assert clocks == {"fc1": {}, "head": {}}
    weights = to_arrays(table)
    np.testing.assert_array_equal(weights["fc1.weight"], W0["fc1.weight"])

    delta = {"fc1.weight": np.full((2, 3), 0.5, np.float32), "fc1.bias": np.ones(2, np.float32)}
    result = plain_push(core, "fog-secret", delta, model="m", fog="fog-a", seq=1,
                        base_clocks={"fc1": {}}, participants=4)
    assert result["version"] == 1 and result["staleness"] == {"fc1": 0}
    after = to_arrays(plain_get(core, "reader-secret", model="m"))
    np.testing.assert_array_equal(after["fc1.weight"], W0["fc1.weight"] + 0.5)
    np.testing.assert_array_equal(after["fc1.bias"], np.ones(2, np.float32))
    np.testing.assert_array_equal(after["head.weight"], W0["head.weight"])  # untouched layer
    subset = plain_get(core, "reader-secret", model="m", version=0, layers=["head"])
    assert subset.column("name").to_pylist() == ["head.weight"]


@pytest.mark.parametrize("delta, reason, code", [
    ({"fc1.weight": np.ones((3, 2), np.float32)}, "shape", Refusal.SHAPE),
    ({"fc1.bias": np.array([np.nan, 0], np.float32)}, "NaN", Refusal.NOT_FINITE),
    ({"fc1.bias": np.array([np.inf, 0], np.float32)}, "NaN or Inf", Refusal.NOT_FINITE),
    ({"fc9.weight": np.ones(2, np.float32)}, "unknown parameter", Refusal.UNKNOWN_PARAMETER),
    ({"fc1.bias": np.ones(2, np.float64)}, "dtype", Refusal.DTYPE),
])
def test_malformed_update_refused_version_unchanged(core, delta, reason, code):
    with CoreClient(core, "fog-secret") as fog:
        with pytest.raises(UpdateRejected, match=reason) as refused:
            fog.push_delta("m", to_table(delta), fog="fog-a", seq=1, base_clocks={"fc1": VectorClock()},
                           participants=1)
        assert refused.value.code is code  # the code crossed the wire beside the message
        head = fog.head("m")
        assert head["version"] == 0
        np.testing.assert_array_equal(to_arrays(fog.get_weights("m").table)["fc1.weight"], W0["fc1.weight"])
        # the refused push did not burn the sequence number: a good push with seq 1 still commits
        receipt = fog.push_delta("m", to_table({"fc1.bias": np.ones(2, np.float32)}), fog="fog-a", seq=1,
                                 base_clocks={"fc1": VectorClock()}, participants=1)
        assert receipt.version == 1


def test_replay_and_identity(core):
    with CoreClient(core, "fog-secret") as fog:
        d = to_table({"fc1.bias": np.ones(2, np.float32)})
        fog.push_delta("m", d, fog="fog-a", seq=1, base_clocks={"fc1": VectorClock()}, participants=1)
        with pytest.raises(UpdateRejected, match="replayed") as refused:
            fog.push_delta("m", d, fog="fog-a", seq=1, base_clocks={"fc1": VectorClock()}, participants=1)
        assert refused.value.code is Refusal.REPLAY
        with pytest.raises(UpdateRejected, match="same base clocks") as refused:  # same delta, new seq
            fog.push_delta("m", d, fog="fog-a", seq=2, base_clocks={"fc1": VectorClock()}, participants=1)
        assert refused.value.code is Refusal.REPLAY
        with pytest.raises(UpdateRejected, match="base clock") as refused:
            fog.push_delta("m", to_table({"fc1.bias": np.full(2, 2.0, np.float32)}), fog="fog-a", seq=3,
                           base_clocks={"fc1": VectorClock({"fog-z": 7})}, participants=1)
        assert refused.value.code is Refusal.UNKNOWN_BASE
        with pytest.raises(AuthError, match="may not push as fog"):
            fog.push_delta("m", d, fog="fog-b", seq=1, base_clocks={"fc1": VectorClock()}, participants=1)
        assert fog.head("m")["version"] == 1


def test_authentication_and_roles(core):
    client = flight.FlightClient(core)
    ticket = flight.Ticket(command(command="get_weights", model="m"))
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(ticket).read_all()
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(ticket, opts("wrong")).read_all()
    with pytest.raises(flight.FlightUnauthorizedError):
        plain_push(core, "reader-secret", {"fc1.bias": np.ones(2, np.float32)}, model="m", fog="dash", seq=1,
                   base_clocks={"fc1": {}}, participants=1)


@pytest.mark.parametrize("raw", [b"not json", b"[]", json.dumps({"command": "get_weights"}).encode(),
                                 command(command="drop_tables"), command(command="get_weights", model=3),
                                 command(command="get_weights", model="nope")])
def test_bad_commands_get_clear_errors(core, raw):
    client = flight.FlightClient(core)
    with pytest.raises(flight.FlightError, match="invalid argument|unknown"):
        client.do_get(flight.Ticket(raw), opts("admin-secret")).read_all()


def test_actions(core):
    client = flight.FlightClient(core)
    names = [a.type for a in client.list_actions(opts("reader-secret"))]
    assert {"head", "list_versions", "list_models"} <= set(names)
    [res] = client.do_action(flight.Action("head", json.dumps({"model": "m"}).encode()), opts("reader-secret"))
    assert json.loads(res.body.to_pybytes())["version"] == 0
    [res] = client.do_action(flight.Action("list_models", b""), opts("reader-secret"))
    assert json.loads(res.body.to_pybytes()) == ["m"]


def test_stale_push_refused_under_strong_mode(tmp_path):
    from hyprstream.consistency import ConsistencyMode, ConsistencyPolicy
    from hyprstream.core.repository import ModelSettings

    repo = ModelRepository(tmp_path)
    repo.register("m", to_table(W0), ModelSettings(ConsistencyPolicy(ConsistencyMode.STRONG, max_staleness=0)),
                  actor="t")
    d = to_table({"fc1.bias": np.ones(2, np.float32)})
    repo.push_delta("m", d, fog="fog-a", seq=1, base_clocks={"fc1": VectorClock()}, participants=1)
    with pytest.raises(UpdateRejected, match="strong consistency"):
        repo.push_delta("m", d, fog="fog-b", seq=1, base_clocks={"fc1": VectorClock()}, participants=1)
    # a disjoint layer never conflicts
    h = to_table({"head.weight": np.ones((1, 2), np.float32)})
    assert repo.push_delta("m", h, fog="fog-b", seq=1, base_clocks={"head": VectorClock()}, participants=1).version == 2
    # a restart reads the same committed state
    again = ModelRepository(tmp_path)
    assert again.head("m")["version"] == 2
    assert again.head("m")["clocks"] == {"fc1": {"fog-a": 1}, "head": {"fog-b": 1}}


def test_a_refusal_code_is_read_from_its_own_field_never_from_the_message(core):
    """The code travels in Flight's extra_info; a plain client sees it there, and a message that merely
    mentions a replay is not one."""
    with pytest.raises(flight.FlightError) as err:
        plain_push(core, "fog-secret", {"fc1.bias": np.array([np.nan, 0], np.float32)}, model="m", fog="fog-a",
                   seq=1, base_clocks={"fc1": {}}, participants=1)
    assert json.loads(err.value.extra_info) == {"code": "not_finite"}
    from hyprstream.coreapi.client import _refusal

    class Crafted(Exception):
        def __init__(self, extra_info):
            super().__init__("invalid argument: replayed push (says the message)")
            self.extra_info = extra_info

    for extra, code in ((b"", Refusal.INVALID), (b"not json", Refusal.INVALID), (b'{"code": "nope"}', Refusal.INVALID),
                        (b'["replay"]', Refusal.INVALID), (b'{"code": "replay"}', Refusal.REPLAY)):
        assert _refusal(Crafted(extra)) is code
