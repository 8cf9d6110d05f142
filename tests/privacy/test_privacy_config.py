"""hyprstream.privacy.config: the [privacy] sections, validated once, errors naming the key."""

from __future__ import annotations

import tomllib

import pytest

from hyprstream.errors import ConfigError
from hyprstream.privacy.client_dp import NoisePlacement
from hyprstream.privacy.config import PrivacyConfig, Weighting, parse_privacy

pytestmark = pytest.mark.unit

FOG = """
[privacy.secagg]
clip = 0.5
field_bits = 64
weighting = "uniform"
stage_timeout_s = 10

[privacy.client_dp]
noise_multiplier = 1.2
placement = "distributed"
client_sampling_rate = 0.5
epsilon_budget = 8.0
min_clients = 3
"""

DEVICE = """
[privacy.dpsgd]
noise_multiplier = 1.1
max_grad_norm = 1.0
epsilon_budget = 4.0
"""


def test_fog_and_device_sections_parse() -> None:
    fog = parse_privacy(tomllib.loads(FOG), source="fog.toml")
    assert fog.secagg.clip == 0.5 and fog.secagg.field_bits == 64 and fog.secagg.weighting is Weighting.UNIFORM
    assert fog.client_dp.placement is NoisePlacement.DISTRIBUTED and fog.client_dp.budget.epsilon == 8.0
    assert fog.dpsgd is None
    dev = parse_privacy(tomllib.loads(DEVICE))
    assert dev.dpsgd.budget(profile_delta=1e-5).epsilon == 4.0 and dev.dpsgd.secure and dev.secagg is None
    assert dev.dpsgd.budget(profile_epsilon=9.0, profile_delta=1e-6).delta == 1e-6  # delta from the profile
    assert dev.dpsgd.settings(profile_delta=1e-5).budget.epsilon == 4.0
    bare = parse_privacy(tomllib.loads("[privacy.dpsgd]\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n"))
    assert bare.dpsgd.budget(3.0, 1e-5).epsilon == 3.0
    with pytest.raises(ValueError, match="no budget"):
        bare.dpsgd.budget()
    assert parse_privacy({}) == PrivacyConfig()  # no [privacy]: everything off


@pytest.mark.parametrize("text, key, reason", [
    ("[privacy.secagg]\nfield_bits = 48\n", "privacy.secagg.field_bits", "32 or 64"),
    ("[privacy.secagg]\nclip = 0\n", "privacy.secagg.clip", "> 0"),
    ("[privacy.secagg]\nthreshold_fraction = 1.5\n", "privacy.secagg.threshold_fraction", "<= 1"),
    ("[privacy.client_dp]\nnoise_multiplier = 1.0\n", "privacy.client_dp.clip", "needs privacy.client_dp.clip"),
    ("[privacy.client_dp]\nnoise_multiplier = 1.0\nclip = 1.0\nplacement = \"distributed\"\n",
     "privacy.client_dp.placement", "needs [privacy.secagg]"),
    ("[privacy.secagg]\nclip = 1.0\n[privacy.client_dp]\nnoise_multiplier = 1.0\nclip = 2.0\n",
     "privacy.client_dp.clip", "leave client_dp.clip unset or equal"),
    ("[privacy.secagg]\nweighting = \"examples\"\n[privacy.client_dp]\nnoise_multiplier = 1.0\n",
     "privacy.secagg.weighting", "uniform"),
    ("[privacy.dpsgd]\nmax_grad_norm = 1.0\n", "privacy.dpsgd.noise_multiplier", "required"),
    ("[privacy.dpsgd]\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\nepsilon_budget = 2\nbudget = 3\n",
     "privacy.dpsgd.budget", "unknown key"),
    ("[privacy.client_dp]\nnoise_multiplier = 1.0\nplacement = \"local\"\n[privacy.secagg]\n",
     "privacy.client_dp.placement", "must be one of"),
])
def test_errors_name_the_file_and_key(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_privacy(tomllib.loads(text), source="x.toml")
    assert err.value.key == key and reason in err.value.reason and str(err.value).startswith("x.toml: ")


def test_public_surface_is_importable() -> None:
    import hyprstream.privacy as privacy

    for name in privacy.__all__:
        assert getattr(privacy, name) is not None
    with pytest.raises(AttributeError):
        privacy.nothing_here  # noqa: B018


def _profile(tmp_path, privacy: str):
    from pathlib import Path

    rpi4 = (Path(__file__).resolve().parents[2] / "firmware-configs" / "rpi4.toml").read_text()
    path = tmp_path / "device.toml"
    path.write_text(rpi4 + "\n" + privacy)
    return path


def test_device_profiles_read_dpsgd_and_refuse_fog_sections(tmp_path):
    from hyprstream.agent.profile import load_profile

    prof = load_profile(_profile(tmp_path, "[privacy.dpsgd]\nnoise_multiplier = 0.9\nmax_grad_norm = 2.0\n"
                                           "ledger_dir = \"ledgers/dev\"\n"))
    settings = prof.dpsgd()
    assert (settings.noise_multiplier, settings.max_grad_norm, settings.secure) == (0.9, 2.0, True)
    assert (settings.budget.epsilon, settings.budget.delta) == (8.0, 1e-5)  # rpi4's [training] budget
    assert prof.privacy.ledger_dir("/data/store") == __import__("pathlib").Path("/data/ledgers/dev")
    assert load_profile(_profile(tmp_path, "")).dpsgd() is None  # no section: DP-SGD off
    with pytest.raises(ConfigError, match=r"privacy\.secagg: unknown key"):  # a fog's section, not a device's
        load_profile(_profile(tmp_path, "[privacy.secagg]\nclip = 1.0\n"))
    with pytest.raises(ConfigError, match=r"privacy\.dpsgd\.secure: must be true on a device"):
        load_profile(_profile(tmp_path, "[privacy.dpsgd]\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\nsecure = false\n"))
