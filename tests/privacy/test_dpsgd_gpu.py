"""DP-SGD on a CUDA GPU: both clip engines train there, clip as on the CPU, draw the CPU's Poisson samples,
and a round is charged to the ledger as on the CPU. Every test here skips cleanly without CUDA.

Run on a GPU machine with ``pytest -m gpu tests/privacy/test_dpsgd_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from hyprstream.learning.task import Dataset, get_task  # noqa: E402
from hyprstream.learning.trainer import load_weights, model_weights  # noqa: E402
from hyprstream.privacy.dpsgd import ClipEngine, DpSgd, DpSgdTrainer, clipping, dp_train_layers, noise_generator  # noqa: E402
from hyprstream.privacy.ledger import Budget  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here)")]

ENGINES = (ClipEngine.OPACUS, ClipEngine.LINEAR)
GPU = "cuda"


@pytest.fixture(autouse=True)
def exact_float32():
    """The comparisons are of the arithmetic, not of TF32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def digits(rows: int = 400) -> Dataset:
    train, _ = get_task("digits").load_reference_data(seed=0)
    return Dataset(train.x[:rows], train.y[:rows])


def layers_for(task, model, engine: ClipEngine) -> list[str]:
    """The linear engine trains the two linear top layers; Opacus every layer (the convolutions too)."""
    groups = task.layer_groups(model)
    return groups[-2:] if engine is ClipEngine.LINEAR else groups


def twin_models(task, seed: int = 3):
    start = model_weights(task.build_model(seed=seed))
    out = {}
    for device in ("cpu", GPU):
        model = task.build_model(seed=seed)
        load_weights(model, start)
        out[device] = model.to(device)
    return out


def settings(z: float, secure: bool = False) -> DpSgd:
    return DpSgd(noise_multiplier=z, max_grad_norm=1.0, budget=Budget(1e9, 1e-5), secure=secure)


def test_the_noise_generator_lives_on_the_models_device() -> None:
    cpu = torch.Generator().manual_seed(5)
    gen = noise_generator(cpu, GPU)
    assert gen.device.type == torch.device(GPU).type
    again = noise_generator(torch.Generator().manual_seed(5), GPU)
    assert torch.equal(torch.randn(8, device=GPU, generator=gen), torch.randn(8, device=GPU, generator=again))


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.value)
@pytest.mark.parametrize("name", ["digits", "digits-cnn", "sensor"])
def test_clipped_sums_on_cuda_equal_the_cpus(name: str, engine: ClipEngine) -> None:
    task = get_task(name)
    models = twin_models(task)
    rng = np.random.default_rng(1)
    x = task.example_input(48, seed=1)
    y = rng.integers(0, task.n_classes, 48)
    sums = {}
    for device, model in models.items():
        layers = layers_for(task, model, engine)
        params = [p for n, p in model.named_parameters() if task.layer_of(n) in layers]
        for n, p in model.named_parameters():
            p.requires_grad_(task.layer_of(n) in layers)
        model.train()
        with clipping(task, model, params, 0.5, engine) as clip:
            got, _ = clip(torch.as_tensor(x, device=device), torch.as_tensor(y, device=device))
        assert all(s.device.type == torch.device(device).type for s in got)
        sums[device] = [s.detach().cpu().numpy() for s in got]
    for cpu, gpu in zip(sums["cpu"], sums[GPU], strict=True):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.value)
def test_dp_sgd_on_cuda_takes_the_cpus_steps(engine: ClipEngine, secure: bool) -> None:
    """Negligible noise (z = 1e-12): the same Poisson samples (drawn on the CPU) and the same clipping give
    the CPU's delta (the digits MLP's top two layers, as tests/agent/test_gpu.py compares plain training)."""
    task = get_task("digits")
    deltas = {}
    for device, model in twin_models(task).items():
        result = dp_train_layers(task, model, ["fc2", "head"], digits(), steps=6, batch_size=32, lr=0.01,
                                 settings=settings(1e-12, secure), generator=torch.Generator().manual_seed(9),
                                 device=device, engine=engine)
        assert result.steps == 6 and next(model.parameters()).device.type == torch.device(device).type
        deltas[device] = result.delta
    assert set(deltas["cpu"]) == set(deltas[GPU])
    for key in deltas["cpu"]:
        np.testing.assert_allclose(deltas[GPU][key], deltas["cpu"][key], rtol=1e-3, atol=2e-5, err_msg=key)


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.value)
def test_dp_sgd_with_noise_trains_on_cuda(engine: ClipEngine, secure: bool) -> None:
    """With noise (z = 1.1) both engines train the CNN on the GPU (Opacus: the convolutions too) to finite,
    non-zero deltas of the CPU's parameters."""
    task = get_task("digits-cnn")
    model = twin_models(task)[GPU]
    result = dp_train_layers(task, model, layers_for(task, model, engine), digits(), steps=6, batch_size=32,
                             lr=0.01, settings=settings(1.1, secure), generator=torch.Generator().manual_seed(9),
                             device=GPU, engine=engine)
    assert result.steps == 6 and next(model.parameters()).device.type == torch.device(GPU).type
    assert set(result.delta) == {n for n, _ in model.named_parameters()
                                 if task.layer_of(n) in layers_for(task, model, engine)}
    assert all(np.all(np.isfinite(d)) and np.abs(d).sum() > 0 for d in result.delta.values())


def test_a_round_on_cuda_is_charged_as_on_the_cpu(tmp_path: Path) -> None:
    task = get_task("digits")
    data = digits()
    entries = {}
    for device, model in twin_models(task).items():
        trainer = DpSgdTrainer(settings(1.1, secure=True), tmp_path / f"ledger-{device}", "d")
        train = trainer.bind(model="digits", base_version=1, round="r1")
        result = train(task, model, ["fc2", "head"], data, steps=10, batch_size=32, lr=0.05, seed=1, device=device)
        assert result.steps == 10
        assert all(np.all(np.isfinite(d)) for d in result.delta.values())
        entries[device] = (result.privacy.charge.event, result.privacy.epsilon, trainer.spent())
    assert entries[GPU] == entries["cpu"]
