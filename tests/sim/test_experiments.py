"""Every shipped experiment validates, and runs end to end at reduced size (`--quick`) with its report."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hyprstream.sim import harness
from hyprstream.sim.experiment import load_experiment, reduced

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
