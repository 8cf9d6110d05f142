"""Client-level DP on plain steps in the simulator (no SecAgg+): each fog clips its agents' deltas, adds the
noise and divides by the fixed expected count, as a deployed fog with ``[privacy.client_dp] clip`` does."""

from __future__ import annotations

import dataclasses
import json
import math

import dp_accounting
import numpy as np
import pytest

from hyprstream.cli import resolve_experiment
from hyprstream.sim import harness
from hyprstream.sim.experiment import load_experiment, reduced

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_plain_steps_with_client_dp_release_noise_calibrated_to_the_fogs_clip(tmp_path):
    """digits-client-dp without [privacy.secagg]: every step pushes, core gets no count, each release's norm is
    the noise's z C sqrt(d) / D give or take the signal (at most C n / D) and 5 sd of the noise's norm, and the
    model's epsilon after each step is the subsampled Gaussian's over the steps (dp-accounting, PLD to RDP)."""
    exp = reduced(load_experiment(resolve_experiment("digits-client-dp")))
    clip = exp.privacy.secagg.clip
    privacy = dataclasses.replace(exp.privacy, secagg=None,
                                  client_dp=dataclasses.replace(exp.privacy.client_dp, clip=clip))
    exp = dataclasses.replace(exp, privacy=privacy)
    assert not list(exp.check())
    steps = []
    result = harness.run(exp, tmp_path / "run", on_step=lambda step, rounds, row, core: steps.append(list(rounds)))
    dp = exp.privacy.client_dp
    versions = json.loads((tmp_path / "run" / "core" / "digits-model" / "manifest.json").read_text())["versions"][1:]
    assert len(versions) == exp.training.global_steps == result.final_version
    expected = dp.client_sampling_rate * exp.fleet.agents_per_fog
    for step, (version, rounds) in enumerate(zip(versions, steps, strict=True), start=1):
        record = version["privacy"]
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(dp.client_sampling_rate,
                                                dp_accounting.GaussianDpEvent(dp.noise_multiplier)), step)
        pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(dp.delta)
        rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(dp.delta)
        assert pld * 0.999 <= record["epsilon"] <= rdp * 1.001
        assert record["clip"] == clip and record["expected_participants"] == expected
        assert version["participants"] == 0
        (r,) = rounds
        size = sum(a.size for a in r.delta.values())
        norm = math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in r.delta.values()))
        noise = dp.noise_multiplier * clip * math.sqrt(size) / expected
        spread = 5 * dp.noise_multiplier * clip / (expected * math.sqrt(2))
        assert abs(norm - noise) <= clip * len(r.contributors) / expected + spread, (norm, noise)
    # the report names the fog's clip (there is no [privacy.secagg] to take it from)
    from hyprstream.sim.report import write_report

    report = write_report(exp, result.metrics, tmp_path / "run", final_accuracy=result.final_accuracy,
                          final_version=result.final_version).read_text()
    assert f"sampling rate {dp.client_sampling_rate:g}, clip {clip:g}" in report
