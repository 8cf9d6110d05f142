"""Telemetry and status records: wire round trips, JSON Schema agreement, refusals, topics."""

from __future__ import annotations

import json

import pytest
from agent_helpers import telemetry

from hyprstream.telemetry.records import (
    STATUS_JSON_SCHEMA,
    TELEMETRY_JSON_SCHEMA,
    DeviceState,
    Status,
    from_wire,
    status_topic,
    telemetry_topic,
    to_wire,
)
from hyprstream.errors import ValidationError

pytestmark = pytest.mark.unit
jsonschema = pytest.importorskip("jsonschema")


@pytest.mark.parametrize("record", [
    telemetry(3), telemetry(4, gpu=False),
    Status("plant-7", "cam-01", DeviceState.ONLINE, "5f1c0e", 1_760_000_000.5),
    Status("plant-7", "cam-01", DeviceState.OFFLINE, "5f1c0e", None, "connection lost (last will)"),
])
def test_round_trip_and_schema(record):
    payload = to_wire(record)
    assert from_wire(payload) == record
    data = json.loads(payload)
    schema = STATUS_JSON_SCHEMA if isinstance(record, Status) else TELEMETRY_JSON_SCHEMA
    jsonschema.validate(data, schema)


def test_wire_format_is_the_documented_one():
    data = json.loads(to_wire(telemetry(3)))
    assert data["schema"] == "hyprstream.telemetry/2"
    assert data["strategy"] == {"current": "hybrid", "since": 1_759_999_990.0, "reason": "GPU 55.0% > 50%",
                                "accept_training": True, "execution_provider": "cpu", "model_variant": "fp32"}
    assert data["resources"]["gpu"]["util_percent"] == 35.0 and data["resources"]["battery_percent"] is None
    assert data["privacy"] == {"budget_spent": False, "epsilon_budget": 8.0, "delta": 1e-5}
    assert "store" not in data  # no row count or size of the device's data (docs/privacy.md)
    assert data["model"] == {"task": "digits", "version": 7}
    assert json.loads(to_wire(Status("f", "d", DeviceState.OFFLINE, "s", None, "x"))) == {
        "schema": "hyprstream.status/1", "fleet": "f", "device_id": "d", "state": "offline", "session": "s",
        "time": None, "reason": "x"}


def mutate(path, value):
    data = json.loads(to_wire(telemetry(3)))
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize("path, value, message", [
    ("schema", "hyprstream.telemetry/1", "unknown payload schema"),  # v1 carried the store's row count
    ("seq", 0, "seq must be >= 1"),
    ("seq", "1", "'seq' must be int"),
    ("resources.cpu_percent", 130.0, "cpu_percent must be in"),
    ("resources.cpu_percent", True, "'resources.cpu_percent' must be float"),
    ("resources.gpu.util_percent", KeyError, "lacks 'resources.gpu.util_percent'"),
    ("strategy.current", "turbo", "'turbo' is not a valid Strategy"),
    ("inference.requests", -1, "'inference.requests' must be >= 0"),
    ("privacy.budget_spent", 0, "'privacy.budget_spent' must be bool"),
    ("store", {"rows": 1234, "bytes": 567_890}, "unknown key(s) ['store']"),
    ("model.extra", 1, "unknown key(s) ['model.extra']"),
    ("device_id", "a/b", "device ID must be"),
    ("fleet", "+", "fleet must be"),
])
def test_off_schema_payloads_are_refused(path, value, message):
    payload = mutate(path, value)
    with pytest.raises(ValidationError) as err:
        from_wire(payload)
    assert message in str(err.value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(payload), TELEMETRY_JSON_SCHEMA)


@pytest.mark.parametrize("payload", [b"\xff", b"[1]", b"{", b'{"schema": null}'])
def test_garbage_is_refused(payload):
    with pytest.raises(ValidationError):
        from_wire(payload)


def test_topics():
    assert telemetry_topic("plant-7", "cam-01") == "hyprstream/v1/plant-7/cam-01/telemetry"
    assert status_topic("plant-7", "cam-01") == "hyprstream/v1/plant-7/cam-01/status"
    for bad in ("", "a/b", "#", "x+", "-lead", "a" * 129):
        with pytest.raises(ValidationError):
            telemetry_topic("f", bad)
