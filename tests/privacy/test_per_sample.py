"""hyprstream.privacy.per_sample: clipped per-example gradient sums equal a per-example loop and Opacus'."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("opacus")

import torch  # noqa: E402
from opacus import GradSampleModule  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from torch import nn  # noqa: E402

from hyprstream.learning.task import Dataset, get_task  # noqa: E402
from hyprstream.privacy.dpsgd import ClipEngine, DpSgd, dp_train_layers  # noqa: E402
from hyprstream.privacy.ledger import Budget  # noqa: E402
from hyprstream.privacy.per_sample import LinearClipper  # noqa: E402

pytestmark = pytest.mark.unit

TASK = get_task("digits")
TRAIN, _ = TASK.load_reference_data(seed=0)


class Mlp(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 8, bias=bias)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Sequence(nn.Module):
    """A linear layer over positions (B, T, F) and one applied twice: per-example gradients sum over both."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.shared = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):  # x: (B, T, 6)
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h.mean(dim=1))


def freeze_except(model: nn.Module, prefixes: tuple[str, ...]) -> list[nn.Parameter]:
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in prefixes)
    return [p for p in model.parameters() if p.requires_grad]


def loop_reference(model, params, x, y, clip: float) -> list[torch.Tensor]:
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i with g_i from one backward pass per example."""
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    loss_fn = nn.CrossEntropyLoss()
    for i in range(len(x)):
        grads = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g.double()
    return total


def fast(model, params, x, y, clip: float) -> list[torch.Tensor]:
    clipper = LinearClipper(model)
    try:
        loss = nn.CrossEntropyLoss()(model(x), y)
        sums = clipper.clipped_sum(loss, len(x), clip)
        order = {id(p): i for i, p in enumerate(clipper.parameters())}
        return [sums[order[id(p)]] for p in params]
    finally:
        clipper.close()


CASES = {
    "head": (lambda: Mlp(), ("head",), lambda g: torch.randn(32, 12, generator=g)),
    "fc2+head": (lambda: Mlp(), ("fc2", "head"), lambda g: torch.randn(32, 12, generator=g)),
    "fc2 without bias": (lambda: Mlp(bias=False), ("fc2", "head"), lambda g: torch.randn(32, 12, generator=g)),
    "positions and a shared layer": (lambda: Sequence(), ("embed", "shared", "head"),
                                     lambda g: torch.randn(16, 5, 6, generator=g)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])  # every example clipped / some / none
def test_clipped_sum_equals_a_per_example_loop(case: str, clip: float) -> None:
    make, trained, inputs = CASES[case]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = make()
    params = freeze_except(model, trained)
    x = inputs(g)
    y = torch.randint(0, 3, (len(x),), generator=g)
    for got, want in zip(fast(model, params, x, y, clip), loop_reference(model, params, x, y, clip), strict=True):
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # frozen fc1: no input gradients, as expected
def test_clipped_sum_equals_opacus_clip_and_accumulate() -> None:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = Mlp()
    params = freeze_except(model, ("fc2", "head"))
    x, y = torch.randn(64, 12, generator=g) * 3, torch.randint(0, 4, (64,), generator=g)
    ours = fast(model, params, x, y, 1.0)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=64, loss_reduction="mean")
    nn.CrossEntropyLoss()(gsm(x), y).backward()
    opt.clip_and_accumulate()
    for p, mine in zip(params, ours, strict=True):
        np.testing.assert_allclose(mine.numpy(), p.summed_grad.numpy(), rtol=1e-5, atol=1e-6)
    gsm._close()


def test_only_linear_models_qualify_and_hooks_are_removed() -> None:
    model = Mlp()
    freeze_except(model, ("head",))
    assert LinearClipper.supports(model)
    clipper = LinearClipper(model)
    assert clipper.modules == [model.head]  # frozen layers are not hooked
    clipper.close()
    assert not model.head._forward_hooks
    with pytest.raises(ValueError, match="took no part"):
        LinearClipper(model).clipped_sum(torch.zeros((), requires_grad=True), 1, 1.0)

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.fc(x))

    normed = Normed()
    assert not LinearClipper.supports(normed)  # a trainable LayerNorm: Opacus' per-sample gradients
    with pytest.raises(ValueError, match="nn.Linear"):
        LinearClipper(normed)
    half = Mlp()
    freeze_except(half, ("head",))
    half.head.bias.requires_grad_(False)
    assert not LinearClipper.supports(half)  # a partly trained layer
    freeze_except(half, ())
    assert not LinearClipper.supports(half)  # nothing to train


def dp_settings(secure: bool) -> DpSgd:
    return DpSgd(noise_multiplier=1.1, max_grad_norm=1.0, budget=Budget(1e9, 1e-5), secure=secure)


@pytest.mark.parametrize("layers", [["head"], ["fc2", "head"]])
@pytest.mark.parametrize("secure", [False, True])
def test_both_engines_take_the_same_dp_sgd_steps(layers: list[str], secure: bool) -> None:
    """Same Poisson samples, same noise draws (Opacus' own), same clipping: the same trained delta."""
    data = Dataset(TRAIN.x[:300], TRAIN.y[:300])
    out = {}
    for engine in (ClipEngine.OPACUS, ClipEngine.LINEAR):
        model = TASK.build_model(seed=0)
        out[engine] = dp_train_layers(TASK, model, layers, data, steps=8, batch_size=32, lr=0.01,
                                      settings=dp_settings(secure), generator=torch.Generator().manual_seed(3),
                                      engine=engine)
    a, b = out[ClipEngine.OPACUS], out[ClipEngine.LINEAR]
    assert a.steps == b.steps == 8 and set(a.delta) == set(b.delta)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    for name in a.delta:
        np.testing.assert_allclose(b.delta[name], a.delta[name], rtol=1e-5, atol=1e-6)


def test_both_engines_agree_on_empty_poisson_samples() -> None:
    tiny = Dataset(TRAIN.x[:50], TRAIN.y[:50])  # q = 0.02: most samples are empty (noise-only steps)
    deltas = [dp_train_layers(TASK, TASK.build_model(seed=0), ["head"], tiny, steps=30, batch_size=1, lr=0.01,
                              settings=dp_settings(False), generator=torch.Generator().manual_seed(0),
                              engine=engine).delta["head.weight"] for engine in (ClipEngine.OPACUS, ClipEngine.LINEAR)]
    np.testing.assert_allclose(deltas[1], deltas[0], rtol=1e-5, atol=1e-6)
    assert np.abs(deltas[1]).sum() > 0


def test_auto_picks_the_linear_engine_for_the_digits_head(monkeypatch) -> None:
    used = []
    original = LinearClipper.clipped_sum

    def spy(self, *args, **kwargs):
        used.append([type(m).__name__ for m in self.modules])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LinearClipper, "clipped_sum", spy)
    model = TASK.build_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp_train_layers(TASK, model, ["fc2", "head"], Dataset(TRAIN.x[:200], TRAIN.y[:200]), steps=3, batch_size=32,
                    lr=0.01, settings=dp_settings(False), generator=torch.Generator().manual_seed(0))
    assert used and all(u == ["Linear", "Linear"] for u in used)
    after = model.state_dict()
    assert torch.equal(after["fc1.weight"], before["fc1.weight"]) and torch.equal(after["fc1.bias"], before["fc1.bias"])
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    assert all(p.grad is None for p in model.parameters())
