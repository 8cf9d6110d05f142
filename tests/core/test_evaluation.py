"""Every version scored at core on the operator's validation rows, and the regression guard in each mode:
a push that would make the model worse than its best by more than the margin is kept, committed with a
warning in its audit entry, or refused (code ``regression``), as configured."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hyprstream.config import parse
from hyprstream.core import signing
from hyprstream.core.audit import AuditLog, iter_entries
from hyprstream.core.config import CoreConfig
from hyprstream.core.evaluation import EvaluationSection, Evaluator, Guard
from hyprstream.core.repository import ModelRepository, ModelSettings
from hyprstream.core.storage import LocalStorage
from hyprstream.errors import ConfigError, Refusal, UpdateRejected
from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import evaluate, load_weights, model_weights, train_layers
from hyprstream.store import to_table
from hyprstream.vector_clock import VectorClock

pytestmark = pytest.mark.unit

TASK = get_task("digits")
TRAIN, TEST = TASK.load_reference_data(0)
W0 = model_weights(TASK.build_model(seed=0))


@pytest.fixture(scope="module")
def trained_delta() -> dict[str, np.ndarray]:
    model = TASK.build_model(seed=0)
    result = train_layers(TASK, model, TASK.layer_groups(model), TRAIN, steps=150, batch_size=32, lr=0.05, seed=0)
    return {k: np.asarray(v, np.float32) for k, v in result.delta.items()}


def validation_file(tmp_path) -> str:
    path = tmp_path / "validation.arrow"
    table = TASK.to_table(TEST)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def open_repo(tmp_path, guard: Guard, margin: float = 0.02):
    evaluator = Evaluator("m", EvaluationSection("digits", validation_file(tmp_path), guard, margin))
    audit = AuditLog(tmp_path / "audit.jsonl", signing.generate_key(), sync=False)
    repo = ModelRepository(LocalStorage(tmp_path / "models", sync=False), audit=audit, evaluators={"m": evaluator})
    repo.register("m", to_table(W0, layer=TASK.layer_of), ModelSettings(), actor="admin")
    return repo, audit


def push(repo, seq: int, delta: dict[str, np.ndarray]):
    base = {layer: VectorClock.of(c) for layer, c in repo.head("m")["clocks"].items()}
    return repo.push_delta("m", to_table(delta, layer=TASK.layer_of), fog="fog-a", seq=seq, base_clocks=base,
                           participants=3)


def accuracy_of(weights) -> float:
    model = TASK.build_model(seed=0)
    load_weights(model, weights)
    return evaluate(TASK, model, TEST)[1]


def harmful(trained) -> dict[str, np.ndarray]:
    """Undo the training and then some: the model falls far below its best."""
    return {k: -3.0 * v for k, v in trained.items()}


@pytest.mark.parametrize("guard", list(Guard))
def test_every_version_is_scored_and_the_guard_acts_as_configured(tmp_path, trained_delta, guard):
    repo, audit = open_repo(tmp_path, guard)
    try:
        v0 = repo.versions("m")[0]
        assert v0.accuracy == pytest.approx(accuracy_of(W0)) and v0.loss > 0
        assert push(repo, 1, trained_delta).version == 1
        good = repo.versions("m")[1]
        assert good.accuracy == pytest.approx(accuracy_of({k: W0[k] + trained_delta.get(k, 0) for k in W0}))
        assert good.accuracy > v0.accuracy + 0.3  # the validation rows see the training
        bad = harmful(trained_delta)
        if guard is Guard.REFUSE:
            with pytest.raises(UpdateRejected, match=r"would score accuracy 0\.\d+ .* more than 0.02 below the "
                                                     r"model's best 0\.\d+") as refused:
                push(repo, 2, bad)
            assert refused.value.code is Refusal.REGRESSION
            assert [v.version for v in repo.versions("m")] == [0, 1]  # the model keeps its best version
        else:
            assert push(repo, 2, bad).version == 2
            assert repo.versions("m")[2].accuracy < good.accuracy - 0.02
    finally:
        audit.close()
    pushes = [e for e in iter_entries(tmp_path / "audit.jsonl") if e.action == "model.push"]
    assert pushes[0].details["accuracy"] == pytest.approx(good.accuracy)
    if guard is Guard.WARN:
        assert pushes[1].details["regression"] is True and pushes[1].outcome == "ok"
    elif guard is Guard.KEEP:
        assert "regression" not in pushes[1].details and pushes[1].outcome == "ok"


def test_a_small_dip_within_the_margin_passes_a_refusing_guard(tmp_path, trained_delta):
    repo, audit = open_repo(tmp_path, Guard.REFUSE, margin=0.5)
    try:
        push(repo, 1, trained_delta)
        assert push(repo, 2, {k: -0.5 * v for k, v in trained_delta.items()}).version == 2
    finally:
        audit.close()


def test_evaluation_settings_name_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow")
    with pytest.raises(ConfigError, match=r"evaluation\.m\.validation: .*bad\.arrow: not a table of task 'digits'"):
        Evaluator("m", EvaluationSection("digits", str(bad)))
    with pytest.raises(ConfigError, match=r"evaluation\.m\.task"):
        Evaluator("m", EvaluationSection("no-such-task", validation_file(tmp_path)))
    with pytest.raises(ConfigError, match="guard"):
        parse(CoreConfig, {"audit": {"signing_key": "k"}, "evaluation": {"m": {"task": "digits", "validation": "v",
                                                                               "guard": "ignore"}}})


@pytest.mark.integration
def test_core_run_config_scores_versions_and_serves_the_accuracy(tmp_path, trained_delta):
    """`[evaluation.<model>]` in core.toml reaches the service: the lineage, `core versions` and /metrics carry
    each version's accuracy."""
    from coreproc import make_deployment
    from prometheus_client import generate_latest

    from hyprstream.core.auth import Role
    from hyprstream.core.cli import version_rows
    from hyprstream.core.config import load_core_config
    from hyprstream.core.service import CoreService
    from hyprstream.coreapi.client import CoreClient

    dep = make_deployment(tmp_path, sync=False)
    dep.config.write_text(dep.config.read_text() + f'\n[evaluation.m]\ntask = "digits"\n'
                          f'validation = "{validation_file(tmp_path)}"\nguard = "refuse"\n')
    service = CoreService(load_core_config(dep.config))
    try:
        with CoreClient(service.location, dep.token("admin", Role.ADMIN)) as admin:
            admin.register_model("m", to_table(W0, layer=TASK.layer_of))
        with CoreClient(service.location, dep.token("fog-a", Role.FOG)) as fog:
            fog.push_delta("m", to_table(trained_delta, layer=TASK.layer_of), fog="fog-a", seq=1,
                           base_clocks={layer: VectorClock() for layer in TASK.layer_groups(TASK.build_model(0))},
                           participants=2)
            with pytest.raises(UpdateRejected) as refused:
                fog.push_delta("m", to_table(harmful(trained_delta), layer=TASK.layer_of), fog="fog-a", seq=2,
                               base_clocks={layer: VectorClock.of({"fog-a": 1})
                                            for layer in TASK.layer_groups(TASK.build_model(0))}, participants=2)
            assert refused.value.code is Refusal.REGRESSION  # the code crosses the wire
            lineage = fog.list_versions("m")
        text = generate_latest(service.metrics.registry).decode()
    finally:
        service.stop()
    assert [v["version"] for v in lineage] == [0, 1] and lineage[1]["accuracy"] > lineage[0]["accuracy"] + 0.3
    assert [r["accuracy"] for r in version_rows(lineage)] == [f"{v['accuracy']:.4f}" for v in lineage]
    assert f'hyprstream_core_model_accuracy_ratio{{model="m"}} {lineage[1]["accuracy"]!r}' in text
    assert 'hyprstream_core_pushes_total{code="regression",fog="fog-a",model="m",outcome="refused"} 1.0' in text
