"""Every shipped experiment validates, and runs end to end at reduced size (`--quick`) with its report."""

from pathlib import Path

import dp_accounting
import pyarrow.parquet as pq
import pytest

from hyprstream.sim import harness
from hyprstream.sim.experiment import load_experiment, reduced
from hyprstream.sim.report import write_report

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "simulations").glob("*.toml"))


@pytest.mark.unit
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_experiment_validates(path):
    exp = load_experiment(path)
    assert exp.name == path.stem


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem != "quickstart"], ids=lambda p: p.stem)
def test_shipped_experiment_runs_reduced(path, tmp_path):
    exp = reduced(load_experiment(path))
    result = harness.run(exp, tmp_path)
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows if r["kind"] == "global"] == list(range(1, exp.training.global_steps + 1))
    assert result.final_version >= 1
    assert 0.0 <= result.final_accuracy <= 1.0
    report = write_report(exp, result.metrics, tmp_path, final_accuracy=result.final_accuracy,
                          final_version=result.final_version).read_text()
    assert f"Final held-out accuracy: {result.final_accuracy:.4f}" in report
    dp = exp.privacy.client_dp
    if dp is not None:  # the model's client-level epsilon, cross-checked from first principles
        steps = exp.training.global_steps
        assert [r["version"] is not None for r in rows if r["kind"] == "fog_round"] == [True] * steps * exp.fleet.fogs
        shown = float(report.split("Model's client-level epsilon: ")[1].split("*")[0])
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            dp.client_sampling_rate, dp_accounting.GaussianDpEvent(dp.noise_multiplier)), steps)
        pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(dp.delta)
        rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(dp.delta)
        assert pld * 0.999 <= shown <= rdp * 1.001, (pld, shown, rdp)
        assert [r["client_epsilon"] for r in rows if r["kind"] == "global"][-1] == pytest.approx(shown, abs=5e-4)
