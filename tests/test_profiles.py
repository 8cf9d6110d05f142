"""Device profiles: shipped ones load and round-trip; broken ones name file, key path and reason."""

from __future__ import annotations

import copy
import dataclasses
import enum
import operator
import re
import tomllib
import typing
from pathlib import Path

import pytest
import tomli_w  # a dependency of flwr, which the package pins
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hyprstream.agent.profile import (
    PROFILE_KIND,
    Accelerator,
    DeviceProfile,
    ExecutionProvider,
    InferenceSettings,
    ModelVariant,
    PolicyThresholds,
    Resources,
    SimulationFactors,
    StoreRetention,
    Strategy,
    TelemetrySettings,
    TrainingCaps,
    load_profile,
)
from hyprstream.config import parse, setting, to_dict
from hyprstream.errors import ConfigError
from hyprstream.privacy.config import FloorConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware-configs"
BAD = ROOT / "tests" / "fixtures" / "bad-profiles"
PROFILES = sorted(FIRMWARE.glob("*.toml"))

# Only the keys a profile must have; everything else takes its documented default.
MINIMAL = """\
kind = "device"
name = "Minimal"
device_class = "test-device"

[resources]
cpu_cores = 4
cpu_max_mhz = 1500
memory_mb = 4096
storage_mb = 16000
tdp_watts = 6.0

[training]
privacy_epsilon = 8.0
privacy_delta = 1e-5

[store]
max_mb = 4096

[simulation]
compute_speed_factor = 0.3
uplink_mbps = 50.0
downlink_mbps = 100.0
"""


def _write(path: Path, doc: dict) -> Path:
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def _profile_doc(profile: DeviceProfile) -> dict:
    return {"kind": PROFILE_KIND, **_without_none(to_dict(profile))}


def _without_none(doc: dict) -> dict:
    """TOML has no null: a section that is off (``privacy.dpsgd``) is left out, as in the files."""
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in doc.items() if v is not None}


# --- the shipped profiles -------------------------------------------------------------------------


def test_the_four_device_classes_are_shipped() -> None:
    names = {p.stem for p in PROFILES}
    assert {"rpi4", "jetson-orin-nano", "x86-gateway", "battery-sensor-hub"} <= names


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profile_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    profile = load_profile(path)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    assert raw.pop("kind") == PROFILE_KIND
    # every value written in the file comes back unchanged (enums by value, ints as numbers)
    plain = to_dict(profile)
    for key, value in raw.items():
        if isinstance(value, dict):
            assert {k: plain[key][k] for k in value} == value, key
        else:
            assert plain[key] == value, key
    # and the full form, written back as TOML, parses to an equal object
    again = load_profile(_write(tmp_path / path.name, _profile_doc(profile)))
    assert again == profile
    assert to_dict(again) == plain


def test_rpi4_profile_matches_the_hardware() -> None:
    p = load_profile(FIRMWARE / "rpi4.toml")
    assert p.device_class == "raspberry-pi-4"
    r = p.resources
    assert (r.cpu_cores, r.cpu_max_mhz, r.memory_mb) == (4, 1500, 4096)
    assert r.accelerator is Accelerator.NONE and r.gpu_memory_mb == 0 and not r.has_gpu
    assert r.battery is False and r.battery_capacity_wh == 0.0
    assert p.inference.model_variant is ModelVariant.INT8
    assert p.inference.execution_provider is ExecutionProvider.CPU
    assert p.training.allow_gpu is False
    assert p.simulation.battery_drain_percent_per_s == 0.0


def test_jetson_profile_matches_the_hardware() -> None:
    p = load_profile(FIRMWARE / "jetson-orin-nano.toml")
    assert p.device_class == "jetson-orin-nano"
    r = p.resources
    assert (r.cpu_cores, r.memory_mb) == (6, 8192)
    assert r.accelerator is Accelerator.CUDA and r.has_gpu
    assert 0 < r.gpu_memory_mb < r.memory_mb  # one LPDDR5 pool shared with the CPU
    assert 7.0 <= r.tdp_watts <= 15.0
    assert p.training.allow_gpu is True
    assert p.inference.execution_provider is ExecutionProvider.CUDA
    rpi4 = load_profile(FIRMWARE / "rpi4.toml")
    assert p.simulation.compute_speed_factor > rpi4.simulation.compute_speed_factor


def test_gateway_profile_matches_the_hardware() -> None:
    p = load_profile(FIRMWARE / "x86-gateway.toml")
    assert p.device_class == "x86-gateway"
    r = p.resources
    assert 4 <= r.cpu_cores <= 8 and r.memory_mb == 16384
    assert r.accelerator is Accelerator.NONE and r.battery is False


def test_battery_hub_profile_is_weak_and_battery_aware() -> None:
    hub = load_profile(FIRMWARE / "battery-sensor-hub.toml")
    assert hub.resources.battery is True and hub.resources.battery_capacity_wh > 0
    assert hub.simulation.battery_drain_percent_per_s > 0
    assert 0 < hub.policy.min_battery_train_percent < hub.policy.min_battery_full_percent
    others = [load_profile(p) for p in PROFILES if p.stem != "battery-sensor-hub"]
    assert all(hub.simulation.uplink_mbps < o.simulation.uplink_mbps for o in others)
    speed = hub.simulation.compute_speed_factor
    assert all(speed < o.simulation.compute_speed_factor for o in others)
    # the documented drain is the pack emptied by the device's full power: 3 W-ish from 37.4 Wh
    full_power_drain = hub.resources.tdp_watts / (hub.resources.battery_capacity_wh * 3600) * 100
    assert hub.simulation.battery_drain_percent_per_s <= full_power_drain


# --- defaults -------------------------------------------------------------------------------------


def test_minimal_profile_takes_the_documented_defaults(tmp_path: Path) -> None:
    path = tmp_path / "minimal.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    p = load_profile(path)
    assert p.description == ""
    assert p.policy == PolicyThresholds()
    assert p.policy.initial_strategy is Strategy.MINIMAL
    assert p.inference == InferenceSettings()
    assert p.inference.model_variant is ModelVariant.FP32
    assert p.inference.execution_provider is ExecutionProvider.AUTO
    assert p.telemetry == TelemetrySettings()
    assert p.telemetry.qos == 1
    assert p.resources.accelerator is Accelerator.NONE and p.resources.gpu_memory_mb == 0
    assert p.store == StoreRetention(max_mb=4096, max_age_days=30, segment_target_mb=64)
    assert p.store.encrypt_at_rest is True
    assert p.simulation == SimulationFactors(
        compute_speed_factor=0.3, uplink_mbps=50.0, downlink_mbps=100.0,
        latency_ms=20.0, availability=1.0, battery_drain_percent_per_s=0.0,
    )
    assert p.training == TrainingCaps(privacy_epsilon=8.0, privacy_delta=1e-5)


@pytest.mark.parametrize("section", [PolicyThresholds(), InferenceSettings(), TelemetrySettings()])
def test_default_sections_obey_their_own_rules(section: object) -> None:
    # defaults are not parsed, so their cross-field rules are checked here
    assert list(getattr(section, "check", lambda: iter(()))()) == []


def test_strategy_values() -> None:
    assert [s.value for s in Strategy] == ["full", "hybrid", "minimal"]


# --- broken profiles ------------------------------------------------------------------------------

# file stem -> (exact key path, a fragment of the reason)
BAD_CASES: dict[str, tuple[str, str]] = {
    "unknown-key": ("policy.full_max_cpu_pct", "unknown key"),
    "unknown-top-level-key": ("owner", "unknown key"),
    "wrong-type": ("resources.memory_mb", "expected an integer, got a string"),
    "float-for-integer": ("resources.cpu_cores", "expected an integer, got a float"),
    "boolean-for-number": ("telemetry.qos", "expected an integer, got a boolean"),
    "section-not-a-table": ("policy", "expected a table, got an integer"),
    "nan-number": ("resources.tdp_watts", "must be a finite number"),
    "out-of-range": ("simulation.availability", "must be <= 1, got 1.5"),
    "out-of-range-qos": ("telemetry.qos", "must be <= 2, got 3"),
    "zero-epsilon": ("training.privacy_epsilon", "must be > 0, got 0.0"),
    "delta-one": ("training.privacy_delta", "must be < 1, got 1.0"),
    "bad-enum": ("inference.model_variant", "must be one of 'fp32', 'int8', got 'fp16'"),
    "bad-strategy": ("policy.initial_strategy", "must be one of 'full', 'hybrid', 'minimal'"),
    "missing-required-key": ("resources.memory_mb", "required key is missing"),
    "missing-section": ("training", "required key is missing"),
    "missing-kind": ("kind", "required key is missing"),
    "wrong-kind": ("kind", "must be 'device' for a device profile, got 'fog'"),
    "bad-device-class": ("device_class", "lower-case slug"),
    "cross-field-cpu-thresholds": (
        "policy.hybrid_max_cpu_percent", "must be above full_max_cpu_percent"
    ),
    "cross-field-battery-thresholds": (
        "policy.min_battery_full_percent", "at least min_battery_train_percent"
    ),
    "cross-field-hysteresis": ("policy.hysteresis_percent", "smaller than the gap"),
    "cross-field-gpu-memory": ("resources.gpu_memory_mb", "must be 0 without an accelerator"),
    "cross-field-cuda-without-memory": (
        "resources.gpu_memory_mb", "must be above 0 with accelerator 'cuda'"
    ),
    "cross-field-battery-capacity": (
        "resources.battery_capacity_wh", "must be above 0 when battery = true"
    ),
    "cross-field-allow-gpu": ("training.allow_gpu", "needs a GPU"),
    "cross-field-cuda-provider": ("inference.execution_provider", "needs a GPU"),
    "cross-field-intra-op-threads": (
        "inference.intra_op_threads", "at most resources.cpu_cores (4)"
    ),
    "cross-field-batch-size": ("training.batch_size_hybrid", "at most batch_size_full (32)"),
    "cross-field-store-size": ("store.max_mb", "at most resources.storage_mb (16000)"),
    "cross-field-segment-size": ("store.segment_target_mb", "at most max_mb (1024)"),
    "cross-field-backoff": ("telemetry.reconnect_backoff_min_s", "at most reconnect_backoff_max_s"),
    "cross-field-battery-drain": (
        "simulation.battery_drain_percent_per_s", "must be 0 when resources.battery = false"
    ),
    "cross-field-battery-charge": (
        "simulation.battery_charge_percent_per_s", "must be 0 when resources.battery = false"
    ),
}


def test_every_bad_fixture_has_an_expected_key() -> None:
    stems = {p.stem for p in BAD.glob("*.toml")}
    assert stems == set(BAD_CASES) | {"invalid-syntax"}
    assert len(stems) >= 8


@pytest.mark.parametrize("stem", sorted(BAD_CASES))
def test_bad_profile_names_file_key_and_reason(stem: str) -> None:
    path = BAD / f"{stem}.toml"
    key, fragment = BAD_CASES[stem]
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    err = info.value
    assert err.source == str(path)
    assert err.key == key
    assert fragment in err.reason
    assert str(err) == f"{path}: {key}: {err.reason}"


def test_invalid_toml_names_file_and_line() -> None:
    path = BAD / "invalid-syntax.toml"
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    err = info.value
    assert err.source == str(path) and err.key is None  # no key can be named in unparsable text
    assert str(err).startswith(f"{path}: invalid TOML: ")
    assert "line 8" in err.reason


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(info.value) == f"{path}: file not found"


# --- property: integers written into bounded fields -----------------------------------------------

_OPS = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
}


def _bounded_fields(cls: type, prefix: str = "") -> list[tuple[str, dict, type]]:
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found += _bounded_fields(tp, f"{prefix}{f.name}.")
        elif any(f.metadata.get(b) is not None for b in _OPS):
            found.append((prefix + f.name, dict(f.metadata), tp))
    return found


BOUNDED = _bounded_fields(DeviceProfile)

# cross-field rule key -> the numeric fields the rule reads; an in-bounds value may break only these
RULE_FIELDS: dict[str, set[str]] = {
    "resources.gpu_memory_mb": {"resources.gpu_memory_mb"},
    "resources.battery_capacity_wh": {"resources.battery_capacity_wh"},
    "policy.hybrid_max_cpu_percent": {
        "policy.hybrid_max_cpu_percent", "policy.full_max_cpu_percent",
    },
    "policy.min_battery_full_percent": {
        "policy.min_battery_full_percent", "policy.min_battery_train_percent",
    },
    "policy.hysteresis_percent": {
        "policy.hysteresis_percent", "policy.hybrid_max_cpu_percent", "policy.full_max_cpu_percent",
        "policy.min_battery_full_percent", "policy.min_battery_train_percent",
    },
    "training.batch_size_hybrid": {"training.batch_size_hybrid", "training.batch_size_full"},
    "store.segment_target_mb": {"store.segment_target_mb", "store.max_mb"},
    "store.max_mb": {"store.max_mb", "resources.storage_mb"},
    "telemetry.reconnect_backoff_min_s": {
        "telemetry.reconnect_backoff_min_s", "telemetry.reconnect_backoff_max_s",
    },
    "inference.intra_op_threads": {"inference.intra_op_threads", "resources.cpu_cores"},
    "simulation.battery_drain_percent_per_s": {"simulation.battery_drain_percent_per_s"},
    "simulation.battery_charge_percent_per_s": {"simulation.battery_charge_percent_per_s"},
    # a floor's minimum or maximum needs secure_aggregation = true (false in the base document)
    **{f"privacy.floor.{key}": {f"privacy.floor.{key}"}
       for key in ("min_threshold_fraction", "min_cohort", "max_clip", "min_noise_multiplier")},
}
_BOUND_REASON = re.compile(r"must be (>=|>|<=|<) (\S+), got (\S+)")


def test_every_number_is_bounded() -> None:
    hints_numeric = []
    for cls in (Resources, PolicyThresholds, TrainingCaps, InferenceSettings, StoreRetention,
                TelemetrySettings, SimulationFactors, FloorConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                hints_numeric.append(f.name)
                assert any(f.metadata.get(b) is not None for b in _OPS), f"{cls.__name__}.{f.name}"
    assert len(BOUNDED) == len(hints_numeric)


@st.composite
def _field_and_integer(draw: st.DrawFn) -> tuple[str, dict, type, int]:
    path, meta, tp = draw(st.sampled_from(BOUNDED))
    bounds = [int(meta[b]) for b in _OPS if meta.get(b) is not None]
    edges = sorted({b + d for b in bounds for d in range(-2, 3)})
    value = draw(st.one_of(
        st.sampled_from(edges),
        st.integers(-1_000, 1_000_000),
        st.integers(-(2**63), 2**63 - 1),  # TOML integers are 64-bit
    ))
    return path, meta, tp, value


_BASE_DOC = _profile_doc(load_profile(FIRMWARE / "rpi4.toml"))


@settings(max_examples=300, deadline=None)
@given(case=_field_and_integer())
def test_integer_in_bounded_field_is_accepted_in_bounds_or_refused_naming_the_field(
    case: tuple[str, dict, type, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path, meta, tp, value = case
    *sections, name = path.split(".")
    doc = copy.deepcopy(_BASE_DOC)
    table = doc
    for section in sections:
        table = table.setdefault(section, {})
    table[name] = value
    file = _write(tmp_path_factory.getbasetemp() / "property.toml", doc)
    violated = [(op, meta[b]) for b, (fn, op) in _OPS.items()
                if meta.get(b) is not None and not fn(value, meta[b])]
    try:
        profile = load_profile(file)
    except ConfigError as err:
        assert err.source == str(file)
        if violated:
            event("refused: out of bounds")
            assert err.key == path
            m = _BOUND_REASON.fullmatch(err.reason)
            assert m is not None, err.reason
            assert (m.group(1), float(m.group(2))) in {(op, float(b)) for op, b in violated}
            assert m.group(3) == str(tp(value))
        else:  # within bounds: only a cross-field rule that reads this field may refuse it
            event("refused: cross-field rule")
            assert err.key in RULE_FIELDS, (err.key, err.reason)
            assert path in RULE_FIELDS[err.key], (path, err.key)
            assert not _BOUND_REASON.fullmatch(err.reason)
    else:
        event("accepted")
        assert not violated
        got = profile
        for part in path.split("."):
            got = getattr(got, part)
        assert type(got) is tp and got == value


# --- edge cases of the TOML loader itself ---------------------------------------------------------


def test_huge_integer_in_float_field_is_a_config_error(tmp_path: Path) -> None:
    # tomllib accepts integers of any size; this one does not fit a float
    path = tmp_path / "huge.toml"
    huge = MINIMAL.replace("tdp_watts = 6.0", "tdp_watts = 1" + "0" * 400)
    path.write_text(huge, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.key == "resources.tdp_watts"


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.replace('"Minimal"', '"Ger\xe4t"').encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.source == str(path)


class _Level(enum.IntEnum):
    LOW = 0
    HIGH = 1


@dataclasses.dataclass(frozen=True)
class _WithIntEnum:
    level: _Level = setting(_Level.LOW)


@pytest.mark.parametrize("value", [True, 1.0])
def test_integer_enum_refuses_booleans_and_floats(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse(_WithIntEnum, {"level": value}, source="x.toml")
    assert info.value.key == "level"
