"""Robust aggregation in the simulator (``training.aggregation``): the same fog rounds as a deployed fog's."""

import dataclasses

import numpy as np
import pytest

from hyprstream.cli import resolve_experiment
from hyprstream.errors import ConfigError
from hyprstream.sim import harness
from hyprstream.sim.experiment import load_experiment, reduced

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(tmp_path, aggregation: str):
    exp = reduced(load_experiment(resolve_experiment("quickstart")))
    exp = dataclasses.replace(exp, training=dataclasses.replace(exp.training, global_steps=1,
                                                                aggregation=aggregation))
    steps = []
    result = harness.run(exp, tmp_path / aggregation,
                         on_step=lambda step, rounds, row, core: steps.append(list(rounds)))
    return result, steps[0]


def test_a_median_step_takes_other_deltas_than_the_mean_from_the_same_start(tmp_path):
    mean, mean_rounds = _run(tmp_path, "mean")
    median, median_rounds = _run(tmp_path, "median")
    assert [r.version is not None for r in median_rounds] == [True] * len(median_rounds)
    assert [r.participants for r in median_rounds] == [r.participants for r in mean_rounds]
    for a, b in zip(mean_rounds, median_rounds, strict=True):
        assert set(a.delta) == set(b.delta)
        # the same agents, seeds and data: only the rule differs, and so do the fogs' deltas
        assert any(not np.allclose(a.delta[n], b.delta[n]) for n in a.delta)
    assert median.final_accuracy > 0.1  # ten classes: better than chance after one robust step


@pytest.mark.unit
def test_experiment_aggregation_is_checked_as_the_fogs(tmp_path):
    from hyprstream.sim.experiment import load_experiment as load

    base = resolve_experiment("quickstart").read_text()
    cases = {
        'aggregation = "krum_nowhere:rule"': "training.aggregation",
        'aggregation = "median"\n[privacy.secagg]\nclip = 1.0': "robust aggregation needs each update in the clear",
    }
    for extra, expected in cases.items():
        path = tmp_path / "exp.toml"
        path.write_text(base.replace("[training]", "[training]\n" + extra.split("\n")[0], 1)
                        + "\n".join(extra.split("\n")[1:]) + "\n")
        with pytest.raises(ConfigError, match=expected):
            load(path)
