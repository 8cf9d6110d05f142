"""Every benchmark still runs (small sizes): its figures and correctness checks, not its speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


# MiniLM's export and quantization are the smoke run's longest part; its ONNX path is tested on its own
# (tests/agent/test_tasks.py::test_text_model_on_onnx_runtime)
EXTRA = {"bench_agent.py": ["--no-text"],
         # the engines mode (the batched engine against the Flower engine) is bench_sim's only coverage; its
         # default mode's two cases are the harness and flat runs tests/sim/test_flat.py runs
         "bench_sim.py": ["--engines", "--rounds", "2"]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick_run(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", *EXTRA.get(script, [])],
                          capture_output=True, text=True,
                          timeout=600 if script == "bench_sim.py" else 300, cwd=BENCH.parent)  # two Ray start-ups
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, "a benchmark ends with one 'RESULT {json}' line"
    assert isinstance(json.loads(result[-1].removeprefix("RESULT ")), dict)
