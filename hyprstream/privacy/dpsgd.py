"""Sample-level DP-SGD on the device with Opacus, for exactly the layers a round trains.

:func:`dp_train_layers` is :func:`hyprstream.learning.trainer.train_layers` made private:

* only the requested layers have ``requires_grad``; only the modules that own trainable parameters
  are hooked, so frozen layers cost no per-sample gradients (and no backward pass below the lowest
  trained layer);
* each step draws a Poisson sample of the local data (rate q = batch_size / n, the rate the
  accountant amplifies by), clips every example's gradient to ``max_grad_norm`` and adds Gaussian
  noise of std ``noise_multiplier * max_grad_norm`` (an empty sample still takes a noise-only step,
  as the analysis assumes);
* clipping runs in one of two engines (:class:`ClipEngine`) behind one hook, :func:`clipping` (the
  clipped, un-noised sum of a batch), the same mechanism either way: when every trained module is an
  ``nn.Linear`` (the usual "last layers" case), :class:`~hyprstream.privacy.per_sample.LinearClipper`
  computes each example's gradient norm from the layers' inputs and output gradients and the clipped
  sum as one matrix product; otherwise Opacus' ``GradSampleModule`` computes per-example gradients
  and ``DPOptimizer.clip_and_accumulate`` clips and sums them. Either way the step then adds Opacus'
  own noise (``_generate_noise``) and divides by the expected batch size exactly as ``DPOptimizer``
  does;
* hooks are removed afterwards and the delta is read from the bare model: parameter names are
  the model's own, never Opacus' ``_module.`` ones.

:class:`DpSgdTrainer` binds it to the device's :class:`~hyprstream.privacy.ledger.PrivacyLedger`: before a round
trains, the round's mechanism event (``GaussianEvent(z, q, steps)``) is checked against the device's
budget and charged durably; a round that would exceed the budget raises
:class:`~hyprstream.privacy.errors.BudgetExceeded` (the agent declines with that reason) and trains
nothing. The spend is charged *before* training: a crash mid-round over-counts, never under-counts.
The event is that of the task's unit of privacy (:meth:`DpSgd.event`, ``Task.examples_per_record``),
which the ledger entry names (``unit``).

Randomness: the sampler and Opacus' noise follow from a CPU ``torch.Generator`` passed in: it draws
the Poisson samples and seeds a generator on the model's device (CPU or CUDA) for the noise
(:func:`noise_generator`). Deployed devices seed it from ``os.urandom`` each round and run Opacus
in ``secure_mode`` (its defence against floating-point attacks); simulations seed it from the
request's seed.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hyprstream.learning.task import Dataset, Task
from hyprstream.learning.trainer import TrainResult, prepare_layers
from hyprstream.errors import ValidationError
from hyprstream.privacy.accountant import GaussianEvent, gaussian_epsilon
from hyprstream.privacy.ledger import Budget, Charge, Entry, PrivacyLedger, Scope, check_budget

MECHANISM = "dpsgd"


@dataclass(frozen=True)
class DpSgd:
    """Sample-level DP-SGD settings of a device."""

    noise_multiplier: float
    max_grad_norm: float
    budget: Budget
    secure: bool = True  # OS-seeded generator and Opacus secure_mode; False: seeded (simulation)

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not self.max_grad_norm > 0:
            raise ValueError("noise_multiplier and max_grad_norm must be positive")

    def event(self, num_examples: int, batch_size: int, steps: int, group: int = 1) -> GaussianEvent:
        """The mechanism event of one round for the privacy unit: ``steps`` Poisson-sampled steps at rate
        batch / examples, for a unit that is one example (``group`` 1).

        A unit (a stored record) that enters ``group`` examples is accounted as that group: adding or
        removing it adds or removes one example and changes up to ``group - 1`` others, so one step's
        clipped sum moves by at most ``(2 group - 1) C``; no amplification by sampling is claimed for
        the group (its examples are sampled independently). Each step is then at least as private as
        the Gaussian mechanism of sensitivity ``(2 group - 1) C`` and noise ``z C``: multiplier
        ``z / (2 group - 1)``, rate 1.
        """
        if num_examples < 1:
            raise ValidationError("no local training data")
        if group < 1:
            raise ValidationError(f"a privacy unit enters at least one example, got group {group}")
        if group > 1:
            return GaussianEvent(self.noise_multiplier / (2 * group - 1), 1.0, steps)
        return GaussianEvent(self.noise_multiplier, min(1.0, batch_size / num_examples), steps)


def epsilon_floor(event: GaussianEvent, delta: float) -> float:
    """A lower bound, in closed form, of the epsilon of any history that holds ``event``: the exact epsilon
    of ``event`` alone when it is not subsampled (``steps`` Gaussians of multiplier z compose to one of
    ``mu = sqrt(steps) / z``), else 0. A round whose event alone is over the budget (a group's event,
    :meth:`DpSgd.event`, with its tiny multiplier) is refused on this bound before the ledger is read."""
    if event.sample_rate < 1.0 or not event.steps:
        return 0.0
    return gaussian_epsilon(math.sqrt(event.steps) / event.noise_multiplier, delta)


@dataclass(frozen=True)
class PrivateTrainResult(TrainResult):
    """A training result with the ledger entry that paid for it."""

    privacy: Entry | None = None


def _require_opacus():
    try:
        import opacus  # noqa: F401
    except ImportError:
        from hyprstream.errors import MissingExtraError

        raise MissingExtraError("opacus", "dp", "sample-level DP-SGD") from None


class ClipEngine(enum.Enum):
    """How per-example gradients are clipped (the same mechanism either way)."""

    AUTO = "auto"  # LINEAR when every trained module is an nn.Linear, else OPACUS
    OPACUS = "opacus"  # Opacus' GradSampleModule + DPOptimizer (per-example gradients materialised)
    LINEAR = "linear"  # hyprstream.privacy.per_sample.LinearClipper (norms from layer inputs and output gradients)


def dp_train_layers(task: Task, model, layers: Sequence[str], data: Dataset, *, steps: int, batch_size: int,
                    lr: float, settings: DpSgd, generator, device: str = "cpu",
                    max_seconds: float | None = None, engine: ClipEngine = ClipEngine.AUTO) -> TrainResult:
    """DP-SGD (DP-Adam) on ``layers`` of ``model`` for ``steps`` Poisson-sampled steps; returns their delta.

    With ``max_seconds`` it stops early (after at least one step); the caller has charged the planned
    ``steps``, so stopping early only over-counts the spend. ``engine`` picks how per-example
    gradients are clipped; both engines draw the same Poisson samples and the same noise (Opacus'
    own noise function).

    ``generator`` is a CPU ``torch.Generator``: it draws the Poisson samples (the same on every
    device) and seeds a generator on the model's device that draws the noise (:func:`noise_generator`).

    Per step, as ``DPOptimizer.step`` does: the clipped sum ``s`` of the sample (:func:`clipping`;
    zeros for an empty sample), then per parameter ``grad = (s + noise) / expected_batch_size`` with
    Opacus' ``_generate_noise(noise_multiplier * max_grad_norm, ..., secure_mode)``, then the Adam step.
    """
    _require_opacus()
    import torch
    from opacus.optimizers.optimizer import _generate_noise

    trainable, before = prepare_layers(task, model, layers, data, device)
    params = list(trainable.values())
    n = len(data)
    rate = min(1.0, batch_size / n)
    expected = max(1, round(rate * n))
    std = settings.noise_multiplier * settings.max_grad_norm
    opt = torch.optim.Adam(params, lr=lr)
    x = torch.as_tensor(data.x, device=device)
    y = torch.as_tensor(data.y, device=device)
    noise_gen = noise_generator(generator, device)
    model.train()
    losses, done = [], 0
    with clipping(task, model, params, settings.max_grad_norm, engine) as clip:
        started = time.monotonic()
        for _ in range(steps):
            if done and max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
            done += 1
            chosen = _poisson(n, rate, generator, device)
            if len(chosen) == 0:  # an empty Poisson sample: a noise-only step
                sums = [torch.zeros_like(p) for p in params]
            else:
                sums, loss = clip(x[chosen], y[chosen])
                losses.append(loss)
            for p, s in zip(params, sums, strict=True):
                noise = _generate_noise(std=std, reference=s, generator=noise_gen, secure_mode=settings.secure)
                p.grad = (s + noise).view_as(p)
                p.grad /= expected
            opt.step()
        opt.zero_grad(set_to_none=True)
    delta = {name: (p.detach() - before[name]).cpu().numpy() for name, p in trainable.items()}
    mean_loss = float(torch.stack(losses).mean().cpu()) if losses else float("nan")
    return TrainResult(delta, mean_loss, done, n)


@contextlib.contextmanager
def clipping(task: Task, model, params: Sequence, max_grad_norm: float, engine: ClipEngine = ClipEngine.AUTO):
    """The clipping both engines share: yields ``clip(x, y) -> (sums, loss)``.

    ``sums`` are the clipped, un-noised per-example gradient sums ``sum_i min(1, C / (||g_i|| +
    1e-6)) g_i`` of ``params`` (trainable parameters of ``model``, in that order) over the batch ``x,
    y``, ``g_i`` the gradient of example i's own loss (``task.loss(reduction="none")``, its class
    weight included), so adding or removing one example moves the sum by at most C; ``loss`` is
    the batch's mean loss (detached). Hooks are removed on exit; the bare model stays as
    it was built.
    """
    from hyprstream.privacy.per_sample import LinearClipper

    if engine is ClipEngine.AUTO:
        engine = ClipEngine.LINEAR if LinearClipper.supports(model) else ClipEngine.OPACUS
    per_example = task.loss(reduction="none").to(next(model.parameters()).device)

    def loss_fn(out, y):
        # each example's own (weighted) loss, then the plain mean over the sample: both engines undo
        # the 1 / len(sample), so example i's gradient is that of its own loss and depends on no other
        # example (a weighted mean would divide by the sample's sum of weights)
        losses = per_example(out, y)
        if tuple(losses.shape) != (len(y),):
            raise ValidationError(f"task {task.name!r}: loss(reduction='none') must give one loss per example, "
                                  f"got shape {tuple(losses.shape)} for {len(y)} examples")
        return losses.mean()

    if engine is ClipEngine.LINEAR:
        clipper = LinearClipper(model)
        try:
            order = {id(p): i for i, p in enumerate(clipper.parameters())}
            if set(order) != {id(p) for p in params}:
                raise ValidationError("the trained parameters differ from the trained linear layers'")

            def clip(x, y):
                loss = loss_fn(model(x), y)
                sums = clipper.clipped_sum(loss, len(x), max_grad_norm)
                return [sums[order[id(p)]] for p in params], loss.detach()

            yield clip
        finally:
            clipper.close()
        return
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        # only its clipping (clip_and_accumulate) is used: the noise and the step are the caller's
        opt = DPOptimizer(torch.optim.SGD(list(params), lr=0.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                          expected_batch_size=1, loss_reduction="mean")

        def clip(x, y):
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # torch warns that the full backward hook sees no input gradients: expected below the
                # lowest trained layer (the frozen layers get no backward pass at all)
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                loss = loss_fn(gsm(x), y)
                loss.backward()
            opt.clip_and_accumulate()
            sums = [p.summed_grad for p in params]
            opt.zero_grad(set_to_none=True)
            return sums, loss.detach()

        yield clip
        opt.zero_grad(set_to_none=True)
    finally:
        gsm._close()  # removes the hooks and Opacus' attributes: the bare model stays as it was built


def noise_generator(generator, device: str):
    """A generator on ``device`` for the noise, seeded with 63 bits drawn from ``generator`` (CPU).

    torch draws a tensor on a device only from a generator on that device, so the samples (CPU) and
    the noise (the model's device) take one generator each; both follow from the one passed in (OS
    randomness on a device, the request's seed in a simulation).
    """
    import torch

    if generator.device.type != "cpu":
        raise ValidationError(f"DP-SGD's generator must be a CPU generator, got one on {generator.device}")
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def _poisson(n: int, rate: float, generator, device: str):
    import torch

    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().to(device)


def _generator(settings: DpSgd, seed: int):
    import torch

    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") if settings.secure else seed)
    return gen


class DpSgdTrainer:
    """DP-SGD whose spend is charged to the device's ledger (a Store at ``ledger_dir``) before each round."""

    def __init__(self, settings: DpSgd, ledger_dir: Path, device_id: str) -> None:
        self.settings = settings
        self.ledger_dir = Path(ledger_dir)
        self.device_id = device_id
        self._lock = threading.Lock()

    def spent(self) -> float:
        """Epsilon spent so far at the budget's delta (0 before the first round)."""
        from hyprstream.store import Store

        if not self.ledger_dir.exists():
            return 0.0
        with Store.open(self.ledger_dir, readonly=True) as store:
            return PrivacyLedger(store).spent(Scope.DEVICE, self.device_id, self.settings.budget.delta)

    def status(self) -> dict[str, float]:
        """For telemetry: spent and budget epsilons at the budget's delta."""
        return {"epsilon_spent": self.spent(), "epsilon_budget": self.settings.budget.epsilon,
                "delta": self.settings.budget.delta}

    def bind(self, *, model: str, base_version: int, round: str):
        """A callable with :func:`~hyprstream.learning.trainer.train_layers`' signature for one request."""

        def train(task: Task, net, layers: Sequence[str], data: Dataset, *, steps: int, batch_size: int, lr: float,
                  seed: int, device: str = "cpu", max_seconds: float | None = None) -> PrivateTrainResult:
            return self.train(task, net, layers, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              device=device, max_seconds=max_seconds, model=model, base_version=base_version,
                              round=round)

        return train

    def train(self, task: Task, net, layers: Sequence[str], data: Dataset, *, steps: int, batch_size: int, lr: float,
              seed: int, model: str, base_version: int, round: str, device: str = "cpu",
              max_seconds: float | None = None) -> PrivateTrainResult:
        known = set(task.layer_groups(net))
        if not layers or any(layer not in known for layer in layers):
            raise ValidationError(f"unknown layer group(s) in {list(layers)} (model has {sorted(known)})")
        entry = self.charge(task, len(data), batch_size=batch_size, steps=steps, model=model,
                            base_version=base_version, round=round)
        result = dp_train_layers(task, net, layers, data, steps=steps, batch_size=batch_size, lr=lr,
                                 settings=self.settings, generator=_generator(self.settings, seed), device=device,
                                 max_seconds=max_seconds)
        return PrivateTrainResult(result.delta, result.loss, result.steps, result.num_examples, privacy=entry)


    def charge(self, task: Task, num_examples: int, *, batch_size: int, steps: int, model: str, base_version: int,
               round: str) -> Entry:
        """Charge one round's event (``steps`` Poisson-sampled steps at ``batch_size`` of ``num_examples``) to the
        device's ledger before it trains; raises :class:`~hyprstream.privacy.errors.BudgetExceeded` when the
        budget cannot pay for it (nothing charged)."""
        from hyprstream.store import Store

        event = self.settings.event(num_examples, batch_size, steps, group=task.examples_per_record)
        budget = self.settings.budget
        floor = epsilon_floor(event, budget.delta)
        if floor > budget.epsilon:
            check_budget(self.spent(), floor, budget, f"this round (per {task.privacy_unit})")
        with self._lock, Store.open(self.ledger_dir, create=True) as store:
            return PrivacyLedger(store).charge(
                Scope.DEVICE, self.device_id,
                Charge(event, model=model, base_version=base_version, round=round, mechanism=MECHANISM,
                       unit=task.privacy_unit),
                self.settings.budget)


def ledger_dir_for(store_dir: Path) -> Path:
    """Where a device keeps its privacy ledger: a store of its own beside the data store.

    A separate store, because the ClientApp reads the data store while the agent's ingest may hold
    its writer lock; the ledger needs a writer of its own.
    """
    store_dir = Path(store_dir)
    return store_dir.with_name(store_dir.name + ".privacy")


__all__ = [
    "MECHANISM",
    "ClipEngine",
    "DpSgd",
    "DpSgdTrainer",
    "PrivateTrainResult",
    "clipping",
    "dp_train_layers",
    "epsilon_floor",
    "gaussian_epsilon",
    "ledger_dir_for",
    "noise_generator",
]
