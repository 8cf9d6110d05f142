"""Local training of many simulated devices in one pass: per-device copies of the trained layers, stacked,
trained together with ``torch.func`` (``functional_call`` under ``vmap``) and a per-device Adam.

Each device trains exactly as :func:`hyprstream.learning.trainer.train_layers` trains it, alone: the same
minibatches (drawn from a generator seeded with the device's seed, ``min(batch_size, n)`` rows each, with
replacement), the task's (class-weighted mean) loss, Adam with torch's defaults and the given learning
rate, only the requested layer groups trained. The per-device deltas come back as one matrix per
parameter (devices first), so that what aggregates them can treat a fleet's deltas as arrays rather
than as one Python object per device. ``tests/sim/test_batched.py`` checks the equivalence against
``train_layers``, device by device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from hyprstream.errors import ValidationError
from hyprstream.fog.aggregator import FogAggregator
from hyprstream.fog.secure import SecureFogAggregator
from hyprstream.learning.task import Dataset, Task

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as train_layers uses it
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class BatchedResult:
    """Per-device outcome of :func:`train_devices`: ``delta[name]`` has the devices along its first axis."""

    delta: dict[str, np.ndarray]
    loss: np.ndarray  # each device's mean training loss over its steps
    steps: int
    num_examples: np.ndarray


def batch_indices(n: int, steps: int, batch_size: int, seed: int):
    """The rows ``train_layers`` draws for a device of ``n`` examples: ``steps`` x ``min(batch_size, n)``
    indices from a generator seeded with ``seed`` (one draw of all of them gives the same stream as one
    draw per step: tested)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (steps, min(batch_size, n)), generator=gen)


def train_devices(task: Task, weights: Mapping[str, np.ndarray], layers: Sequence[str], datasets: Sequence[Dataset],
                  *, steps: int, batch_size: int, lr: float, seeds: Sequence[int], device: str = "cpu",
                  chunk: int = 4096, private=None) -> BatchedResult:
    """Train ``layers`` of the task's model, starting from ``weights``, on each of ``datasets`` (one per
    device, with ``seeds[i]`` for device ``i``) for ``steps`` steps; ``chunk`` devices at a time.

    With ``private`` (:class:`~hyprstream.privacy.dpsgd.DpSgd`, ``secure`` false) each device trains as
    :func:`~hyprstream.privacy.dpsgd.dp_train_layers` trains it with the generator seeded by its seed: its
    own Poisson samples and noise, every example's gradient clipped, the noised sum divided by its
    expected batch size (the caller charges each device's ledger first)."""

    from hyprstream.learning.trainer import load_weights, params_of

    if len(datasets) != len(seeds):
        raise ValidationError(f"{len(datasets)} datasets but {len(seeds)} seeds")
    if steps < 1 or batch_size < 1:
        raise ValidationError("steps and batch_size must be >= 1")
    empty = [i for i, d in enumerate(datasets) if len(d) == 0]
    if empty:
        raise ValidationError(f"no local training data on device(s) {empty[:5]}")
    model = task.build_model(seed=0)
    load_weights(model, weights)
    known = set(task.layer_groups(model))
    unknown = [layer for layer in layers if layer not in known]
    if unknown:
        raise ValidationError(f"unknown layer group(s) {unknown} (model has {sorted(known)})")
    model.to(device).train()
    trained = sorted(params_of(task, model, layers))
    import torch

    cut = split_frozen(model, trained, torch.as_tensor(np.concatenate([d.x[:2] for d in datasets[:2]]), device=device))
    deltas: dict[str, list[np.ndarray]] = {name: [] for name in trained}
    losses: list[np.ndarray] = []
    for lo in range(0, len(datasets), chunk):
        run = _train_chunk if private is None else partial(_private_chunk, settings=private)
        part = run(task, model, trained, datasets[lo:lo + chunk], seeds[lo:lo + chunk], steps=steps,
                   batch_size=batch_size, lr=lr, device=device, cut=cut)
        for name in trained:
            deltas[name].append(part[0][name])
        losses.append(part[1])
    return BatchedResult({n: np.concatenate(v) for n, v in deltas.items()}, np.concatenate(losses), steps,
                         np.array([len(d) for d in datasets]))


ROW_MIXING = ("BatchNorm", "InstanceNorm", "GroupNorm", "Dropout", "AlphaDropout")  # batch statistics or randomness


@dataclass
class FrozenSplit:
    """A model cut where training starts: ``prefix(x)`` computes, with no trained parameter, the values the
    trained part reads (``boundary``, one per example), and ``suffix(*boundary)`` the model's output from them."""

    prefix: object  # torch.fx.GraphModule: x -> tuple of boundary values
    suffix: object  # torch.fx.GraphModule: *boundary -> the model's output


def split_frozen(model, trained: Sequence[str], sample) -> FrozenSplit | None:
    """Where the trained parameters are the model's last layers, the part below them is the same function
    at every step of every device: :func:`train_devices` computes it once per example instead of once per
    example per step. None when the model cannot be cut so (it does not trace with ``torch.fx``, holds a
    layer whose output depends on the rest of the batch or on chance, the trained part reads the input
    itself, or the prefix fails the check that each example's values do not depend on the others in its
    batch, made on ``sample``)."""
    import torch
    import torch.fx as fx

    if any(type(m).__name__.startswith(ROW_MIXING) for m in model.modules()):
        return None
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 -- a model fx cannot trace trains without the cut
        return None
    trained = set(trained)
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None

    def holds_trained(target: str) -> bool:
        return any(name == target or name.startswith(target + ".") for name in trained) if target else bool(trained)

    dynamic, from_input = set(), {inputs[0]}
    for n in nodes:
        args = n.all_input_nodes
        if (n.op in ("call_module", "get_attr") and holds_trained(str(n.target))) or any(a in dynamic for a in args):
            dynamic.add(n)
        elif any(a in from_input for a in args):
            from_input.add(n)
    output = next(n for n in nodes if n.op == "output")
    boundary = [n for n in nodes if n in from_input and n not in dynamic and any(u in dynamic for u in n.users)]
    if not boundary or inputs[0] in boundary or not any(a in dynamic for a in output.all_input_nodes):
        return None

    prefix_graph, env = fx.Graph(), {}
    needed = set()

    def need(n) -> None:
        if n not in needed:
            needed.add(n)
            for a in n.all_input_nodes:
                need(a)

    for b in boundary:
        need(b)
    for n in nodes:
        if n in needed:
            env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(tuple(env[b] for b in boundary))
    suffix_graph, env = fx.Graph(), {}
    for i, b in enumerate(boundary):
        env[b] = suffix_graph.placeholder(f"boundary_{i}")
    for n in nodes:
        if n in env or n.op == "placeholder":
            continue
        if n in dynamic or n is output or (n not in from_input and any(u in dynamic for u in n.users)):
            env[n] = suffix_graph.node_copy(n, lambda a: env[a])
    cut = FrozenSplit(fx.GraphModule(gm, prefix_graph), fx.GraphModule(gm, suffix_graph))
    # each example's boundary values must not depend on the other examples of its batch
    with torch.no_grad():
        rows = sample[: min(4, len(sample))]
        together = cut.prefix(rows)
        for i in range(len(rows)):
            alone = cut.prefix(rows[i:i + 1])
            for t, a in zip(together, alone, strict=True):
                if t.shape[0] != len(rows) or not torch.allclose(t[i:i + 1], a, rtol=1e-4, atol=1e-5):
                    return None
    return cut


def _chunk_state(model, trained: list[str], datasets: Sequence[Dataset], device: str, cut: FrozenSplit | None):
    """What a chunk's training starts from: the trained parameters (their start, per-device copies and Adam's
    state), the network it runs (the model, or its part above the frozen cut) with its fixed tensors, every
    device's rows in one tensor per input (the frozen cut's output when there is one: once per example, not
    once per example and step), labels, sizes and each device's first row."""
    import torch

    count = len(datasets)
    start = {n: p.detach() for n, p in model.named_parameters() if n in trained}
    params = {n: p.unsqueeze(0).repeat(count, *([1] * p.dim())).clone() for n, p in start.items()}
    adam = tuple({n: torch.zeros_like(p) for n, p in params.items()} for _ in range(3))  # moments, denominator
    sizes = [len(d) for d in datasets]
    offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]), dtype=torch.long)
    x_all = torch.as_tensor(np.concatenate([d.x for d in datasets]), device=device)
    y_all = torch.as_tensor(np.concatenate([d.y for d in datasets]), device=device)
    net = model
    if cut is not None:
        with torch.no_grad():
            parts = [cut.prefix(x_all[lo:lo + 65536]) for lo in range(0, len(x_all), 65536)]
        inputs = tuple(torch.cat(p) for p in zip(*parts, strict=True))
        net = cut.suffix
    else:
        inputs = (x_all,)
    fixed = {n: t.detach() for n, t in {**dict(net.named_parameters()), **dict(net.named_buffers())}.items()
             if n not in trained}
    return start, params, adam, net, fixed, inputs, y_all, sizes, offsets


def _adam(params, grads, exp_avg, exp_avg_sq, denom, *, step: int, lr: float) -> None:
    """torch.optim.Adam's update (its single-tensor form, torch's default betas and eps), every device at once."""
    import torch

    beta1, beta2 = ADAM_BETAS
    bc1, bc2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    with torch.no_grad():
        for n, g in grads.items():
            exp_avg[n].lerp_(g, 1 - beta1)
            exp_avg_sq[n].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            torch.sqrt(exp_avg_sq[n], out=denom[n]).div_(bc2_sqrt).add_(ADAM_EPS)
            params[n].addcdiv_(exp_avg[n], denom[n], value=-lr / bc1)


def _private_chunk(task: Task, model, trained: list[str], datasets: Sequence[Dataset], seeds: Sequence[int], *,
                   steps: int, batch_size: int, lr: float, device: str, cut: FrozenSplit | None,
                   settings) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """DP-SGD (DP-Adam) of every device of a chunk, as :func:`~hyprstream.privacy.dpsgd.dp_train_layers`
    trains one: per device a CPU generator seeded with its seed draws the noise generator's seed, then each
    step's Poisson sample (rate batch / n); each sampled example's gradient (of its own, class-weighted
    loss) is clipped to ``max_grad_norm`` (Opacus' factor ``min(1, C / (||g|| + 1e-6))``), the clipped sum
    gets the device's noise (``N(0, (z C)^2)`` per parameter, Opacus' draw) and is divided by the expected
    batch size; an empty sample is a noise-only step."""
    import torch
    from torch.func import functional_call, grad_and_value, vmap

    from hyprstream.privacy.dpsgd import noise_generator

    if settings.secure:
        raise ValidationError("the batched engine runs seeded DP-SGD only (a simulation's)")
    count = len(datasets)
    start, params, (exp_avg, exp_avg_sq, denom), net, fixed, inputs, y_all, sizes, offsets = \
        _chunk_state(model, trained, datasets, device, cut)
    gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    noise = [noise_generator(g, device) for g in gens]  # drawn first, as dp_train_layers does
    rates = [min(1.0, batch_size / n) for n in sizes]
    expected = torch.tensor([max(1, round(r * n)) for r, n in zip(rates, sizes)], dtype=torch.float32, device=device)
    clip, std = settings.max_grad_norm, settings.noise_multiplier * settings.max_grad_norm
    weight = None if task.class_weights is None else torch.tensor(task.class_weights, dtype=torch.float32,
                                                                   device=device)

    def example_loss(p, y, *x):  # one example's own loss (its class weight included)
        out = functional_call(net, {**fixed, **p}, tuple(t.unsqueeze(0) for t in x))
        return torch.nn.functional.cross_entropy(out, y.unsqueeze(0), weight=weight, reduction="none")[0]

    k = len(inputs)
    per_example = vmap(vmap(grad_and_value(example_loss), in_dims=(None, 0, *[0] * k)), in_dims=(0, 0, *[0] * k))
    total = torch.zeros(count, dtype=torch.float64, device=device)
    nonempty = torch.zeros(count, dtype=torch.float64, device=device)
    for step in range(1, steps + 1):
        chosen = [torch.nonzero(torch.rand(n, generator=g) < r).flatten() for n, g, r in zip(sizes, gens, rates)]
        counts = torch.tensor([len(c) for c in chosen], dtype=torch.float32)
        width = max(1, int(counts.max()))
        idx = torch.zeros((count, width), dtype=torch.long)
        for i, c in enumerate(chosen):
            idx[i, :len(c)] = c + offsets[i]
        mask = (torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)).to(torch.float32).to(device)
        idx = idx.to(device)
        grads, losses = per_example(params, y_all[idx], *(t[idx] for t in inputs))
        with torch.no_grad():
            sq = sum(g.flatten(2).pow(2).sum(dim=-1) for g in grads.values())
            factor = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0) * mask
            noised = {}
            for n in params:  # the model's order: the order each device draws its noise in
                summed = torch.einsum("dw,dw...->d...", factor, grads[n])
                draw = torch.stack([torch.normal(0.0, std, size=tuple(summed.shape[1:]), generator=gen,
                                                 device=device) for gen in noise])
                noised[n] = (summed + draw) / expected.view(-1, *([1] * (summed.dim() - 1)))
            counts = counts.to(device)
            some = counts > 0
            total += torch.where(some, (losses * mask).sum(dim=1) / counts.clamp(min=1), 0).to(torch.float64)
            nonempty += some.to(torch.float64)
        _adam(params, noised, exp_avg, exp_avg_sq, denom, step=step, lr=lr)
    delta = {n: (params[n] - start[n].unsqueeze(0)).cpu().numpy() for n in trained}
    mean = torch.where(nonempty > 0, total / nonempty.clamp(min=1), float("nan"))
    return delta, mean.cpu().numpy()


def _train_chunk(task: Task, model, trained: list[str], datasets: Sequence[Dataset], seeds: Sequence[int], *,
                 steps: int, batch_size: int, lr: float, device: str,
                 cut: FrozenSplit | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    import torch
    from torch.func import functional_call, vmap

    count = len(datasets)
    start, params, (exp_avg, exp_avg_sq, denom), net, fixed, inputs, y_all, sizes, offsets = \
        _chunk_state(model, trained, datasets, device, cut)
    width = min(batch_size, max(sizes))
    rows = torch.zeros((count, steps, width), dtype=torch.long)
    full = [i for i, n in enumerate(sizes) if min(batch_size, n) == width]  # the usual case: one stack
    if full:
        rows[full] = torch.stack([batch_indices(sizes[i], steps, batch_size, seeds[i]) for i in full])
    for i, n in enumerate(sizes):
        if min(batch_size, n) < width:  # a device with fewer examples than a batch: its batch is shorter
            rows[i, :, :n] = batch_indices(n, steps, batch_size, seeds[i])
    widths = torch.as_tensor([min(batch_size, n) for n in sizes])
    mask = (torch.arange(width).unsqueeze(0) < widths.unsqueeze(1)).to(torch.float32)
    rows = (rows + offsets.view(count, 1, 1)).transpose(0, 1).contiguous()  # (steps, devices, width)
    rows, mask = rows.to(device), mask.to(device)
    weight = None if task.class_weights is None else torch.tensor(task.class_weights, dtype=torch.float32,
                                                                   device=device)

    def forward(p, *x):
        return functional_call(net, {**fixed, **p}, x)

    # The forward pass vmapped over devices; the loss and its gradient at the logits over every row at once
    # (CrossEntropyLoss: softmax minus the label's one-hot, times the row's share of its device's weighted
    # mean); one backward pass from the logits: each device's parameters are its own leaves, so each gets its
    # own gradient. Buffers are made once and reused: on the CPU, fresh large tensors cost more in page
    # faults than the arithmetic on them.
    batched_forward = vmap(forward)
    per_row = (count, width)
    xs = tuple(torch.empty((count * width, *t.shape[1:]), dtype=t.dtype, device=device) for t in inputs)
    y = torch.empty(count * width, dtype=y_all.dtype, device=device)
    shares = torch.empty(per_row, device=device)
    total = torch.zeros(count, dtype=torch.float64, device=device)
    for step in range(1, steps + 1):
        flat = rows[step - 1].view(-1)
        for buf, t in zip(xs, inputs, strict=True):
            torch.index_select(t, 0, flat, out=buf)
        torch.index_select(y_all, 0, flat, out=y)
        labels = y.view(*per_row, 1)
        for p in params.values():
            p.requires_grad_(True)
        out = batched_forward(params, *(b.view(*per_row, *b.shape[1:]) for b in xs))
        with torch.no_grad():
            logits = out.detach()
            top = logits.amax(dim=-1, keepdim=True)
            probs = torch.sub(logits, top).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            each = sums.log().add_(top).squeeze_(-1).sub_(logits.gather(-1, labels).squeeze_(-1))  # -log p(label)
            torch.mul(mask, weight[y].view(per_row), out=shares) if weight is not None else shares.copy_(mask)
            shares.div_(shares.sum(dim=1, keepdim=True))
            loss = (each * shares).sum(dim=1)  # each device's (weighted) mean loss
            grad_out = probs.div_(sums).scatter_add_(-1, labels, torch.full_like(logits[..., :1], -1.0))
            grad_out.mul_(shares.unsqueeze(-1))
        grads = dict(zip(params, torch.autograd.grad(out, list(params.values()), grad_out), strict=True))
        total += loss.to(torch.float64)
        for p in params.values():
            p.requires_grad_(False)
        _adam(params, grads, exp_avg, exp_avg_sq, denom, step=step, lr=lr)
    delta = {n: (params[n] - start[n].unsqueeze(0)).cpu().numpy() for n in trained}
    return delta, (total / steps).cpu().numpy()




# -- the batched engine: the devices of a run as one trainer, under the project's own fogs ---------------------


@dataclass
class TrainedRows:
    """Devices of one job that trained the same layer groups: their deltas as the fog receives them (decoded
    from int8 when the job asked for it), one ``(k, *shape)`` array per parameter, in the model's order."""

    positions: np.ndarray  # the devices' positions in their job's nodes
    layers: tuple[str, ...]
    delta: dict[str, np.ndarray]
    loss: np.ndarray
    num_examples: np.ndarray
    bytes_up: np.ndarray  # each device's reply payload (the delta as it travels)


@dataclass
class JobResult:
    rows: list[TrainedRows]
    declined: dict[int, str]  # position in the job's nodes -> the reason the device gave
    failed: dict[int, str] = field(default_factory=dict)  # position -> the error its ClientApp would raise


@dataclass
class Job:
    """One fog's train request to ``nodes`` (device indices), each with its seed."""

    weights: Mapping[str, np.ndarray]
    version: int
    task: str
    layers: tuple[str, ...]
    steps: int
    batch_size: int
    lr: float
    encoding: str
    nodes: tuple[int, ...]
    seeds: tuple[int, ...]
    model: str = ""
    group: str = ""  # the round's name (a Flower message's group ID): what a device's privacy ledger calls it
    result: JobResult | None = None


class BatchedDevices:
    """The simulated devices of a run, trained together: fogs :meth:`submit` their rounds' requests, and the
    first :meth:`result` asked for trains every request submitted so far in as few vmapped passes as their
    settings allow (the fogs of a synchronous step share the base version, so one pass serves them all).

    Each device does what the agent's ClientApp does with a request: it plans by its simulated strategy
    (:func:`~hyprstream.agent.client_app.strategy_plan`: ``minimal`` declines, ``hybrid`` trains the last
    layer groups), trains as :func:`~hyprstream.learning.trainer.train_layers` on its own rows of
    ``data`` with the request's seed, and encodes its delta as its reply would (int8 with the same
    stochastic rounding, :class:`~hyprstream.protocol.TrainReply`)."""

    def __init__(self, task: Task, data, *, device: str = "cpu", chunk: int = 4096) -> None:
        self.task = task
        self.data = data  # hyprstream.sim.devices.FleetData
        self.device = device
        self.chunk = chunk
        self.strategies: Sequence | None = None  # each device's Strategy this step (None: every device full)
        self.hybrid_keep: Sequence[int] | None = None  # each device's max_layer_groups_hybrid
        # DP-SGD (hyprstream.privacy.dpsgd.DpSgd, seeded) and where each device keeps its privacy ledger (a store
        # per device, <ledgers>/<device name>.privacy, as a simulated agent keeps it beside its store)
        self.dpsgd = None
        self.ledgers = None
        self._pending: list[Job] = []
        self.passes = 0  # vmapped training calls made (for reports and tests)

    def submit(self, job: Job) -> Job:
        if job.task != self.task.name:
            raise ValidationError(f"request for task {job.task!r}; the simulated devices hold {self.task.name!r}")
        self._pending.append(job)
        return job

    def result(self, job: Job) -> JobResult:
        if job.result is None:
            self.train_pending()
        if job.result is None:
            raise ValidationError("a job that was never submitted has no result")
        return job.result

    def train_pending(self) -> None:
        from hyprstream.agent.client_app import strategy_plan
        from hyprstream.protocol import TrainRequest

        jobs, self._pending = self._pending, []
        sizes = self.data.sizes
        # (job index, position) per layer set, per shared training settings
        groups: dict[tuple, list[tuple[int, int]]] = {}
        reps: dict[int, Job] = {}
        for j, job in enumerate(jobs):
            job.result = JobResult([], {})
            request = TrainRequest(model="", model_version=job.version, task=job.task, layers=job.layers,
                                   local_steps=job.steps, batch_size=job.batch_size, lr=job.lr, seed=0, weights={})
            same = (self._weights_key(job, reps), job.steps, job.batch_size, job.lr)
            plans: dict[tuple, object] = {}  # one plan per (strategy, hybrid layer count): devices share them
            for pos, node in enumerate(job.nodes):
                if sizes[node] == 0:
                    job.result.declined[pos] = "no local training data"
                    continue
                layers = job.layers
                if self.strategies is not None:
                    mode = (self.strategies[node], int(self.hybrid_keep[node]))
                    plan = plans.get(mode)
                    if plan is None:
                        plan = plans[mode] = strategy_plan(request, *mode)
                    if not plan.accept:
                        job.result.declined[pos] = plan.reason
                        continue
                    layers = tuple(plan.layers)
                if self.dpsgd is not None:
                    refused = self._charge(job, node)
                    if refused:
                        job.result.declined[pos] = refused
                        continue
                groups.setdefault((same, layers), []).append((j, pos))
        for ((_, steps, batch, lr), layers), members in groups.items():
            self._train_group(jobs, members, layers, steps=steps, batch=batch, lr=lr)

    def _charge(self, job: Job, node: int) -> str | None:
        """Charge device ``node``'s ledger for ``job``'s round before it trains, as its ClientApp does; the reason
        it declines when its budget cannot pay (None: charged)."""
        from hyprstream.agent.client_app import BUDGET_DECLINE, device_name
        from hyprstream.errors import HyprstreamError
        from hyprstream.privacy.dpsgd import DpSgdTrainer, ledger_dir_for
        from hyprstream.privacy.errors import BudgetExceeded

        name = device_name(node)
        trainer = DpSgdTrainer(self.dpsgd, ledger_dir_for(self.ledgers / name), name)
        try:
            trainer.charge(self.task, int(self.data.sizes[node]), batch_size=job.batch_size, steps=job.steps,
                           model=job.model, base_version=job.version,
                           round=job.group or f"{job.model}/v{job.version}")
        except BudgetExceeded:
            return BUDGET_DECLINE
        except HyprstreamError as exc:
            return str(exc)
        return None

    @staticmethod
    def _weights_key(job: Job, reps: dict) -> int:
        """Jobs on equal weights share a key (the fogs of a step pull the same version)."""
        for key, other in reps.items():
            if other.version == job.version and other.weights.keys() == job.weights.keys() and all(
                    np.array_equal(other.weights[n], job.weights[n]) for n in job.weights):
                return key
        reps[len(reps)] = job
        return len(reps) - 1

    def _train_group(self, jobs: list[Job], members: list[tuple[int, int]], layers: tuple[str, ...], *,
                     steps: int, batch: int, lr: float) -> None:
        first = jobs[members[0][0]]
        nodes = [jobs[j].nodes[pos] for j, pos in members]
        seeds = [jobs[j].seeds[pos] for j, pos in members]
        datasets = [self.data.dataset(n) for n in nodes]
        out = train_devices(self.task, first.weights, layers, datasets, steps=steps, batch_size=batch, lr=lr,
                            seeds=seeds, device=self.device, chunk=self.chunk, private=self.dpsgd)
        self.passes += 1
        names = _model_order(self.task, first.weights, out.delta)
        where = np.array([j for j, _ in members])
        for j in dict.fromkeys(where.tolist()):
            job, mine = jobs[j], np.flatnonzero(where == j)
            positions = np.array([members[i][1] for i in mine], dtype=np.int64)
            delta = {n: out.delta[n][mine] for n in names}
            loss, examples = out.loss[mine], out.num_examples[mine]
            if job.encoding == "int8":
                delta, bad = int8_roundtrip(delta, [job.seeds[p] for p in positions])
                for i in np.flatnonzero(bad):  # the agent's reply fails to encode: its ClientApp raises
                    job.result.failed[int(positions[i])] = "cannot encode a tensor with NaN or infinite values"
                keep = ~bad
                positions, loss, examples = positions[keep], loss[keep], examples[keep]
                delta = {n: d[keep] for n, d in delta.items()}
                nbytes = sum(int(np.prod(d.shape[1:])) + 4 for d in delta.values())
            else:
                nbytes = sum(int(np.prod(d.shape[1:])) * d.itemsize for d in delta.values())
            if len(positions):
                job.result.rows.append(TrainedRows(positions, layers, delta, loss, examples,
                                                   np.full(len(positions), nbytes, dtype=np.int64)))


def _model_order(task: Task, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> list[str]:
    """The trained parameters in the model's order (the order an agent's reply lists, and encodes, them)."""
    return [n for n in weights if n in delta] + sorted(n for n in delta if n not in weights)


def int8_roundtrip(delta: Mapping[str, np.ndarray], seeds: Sequence[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Row ``i`` of every ``delta`` matrix encoded to int8 as device ``i``'s reply encodes it (the generator
    seeded ``[seeds[i], 0x18]``, one draw per value in parameter order, :func:`hyprstream.codec.encode_int8`)
    and decoded as the fog decodes it; and which rows could not be encoded (NaN or infinite values)."""
    from hyprstream.codec import INT8_MAX, decode_int8, encode_int8

    k = len(seeds)
    flat = {n: np.asarray(d, dtype=np.float32).reshape(k, -1) for n, d in delta.items()}
    bad = np.zeros(k, dtype=bool)
    scales = {}
    for name, m in flat.items():
        bad |= ~np.isfinite(m).all(axis=1)
        peak = np.abs(np.where(np.isfinite(m), m, 0)).max(axis=1, initial=0.0).astype(np.float64)
        scale = (peak / INT8_MAX).astype(np.float32)
        up = (scale.astype(np.float64) * INT8_MAX < peak) & (peak > 0)  # int8_scale's rounding up
        scale[up] = np.nextafter(scale[up], np.float32(np.inf))
        scales[name] = scale
    # a tensor of zeros encodes without drawing: a row with one takes the codec's own path
    odd = ~bad & np.any([s == 0 for s in scales.values()], axis=0) if scales else np.zeros(k, dtype=bool)
    fast = ~bad & ~odd
    sizes = [m.shape[1] for m in flat.values()]
    # each device's uniforms: one generator per device, all of its draws in one call (the same stream as
    # one call per tensor)
    uniforms = np.zeros((k, sum(sizes)))
    for i in np.flatnonzero(fast):
        uniforms[i] = np.random.default_rng([int(seeds[i]), 0x18]).random(uniforms.shape[1])
    out, at = {}, 0
    for (name, m), size in zip(flat.items(), sizes, strict=True):
        u, scale = uniforms[:, at:at + size], scales[name]
        at += size
        with np.errstate(divide="ignore", invalid="ignore"):
            y = m.astype(np.float64) / scale.astype(np.float64)[:, None]
        low = np.floor(y)
        q = np.clip(low + (u < (y - low)), -INT8_MAX, INT8_MAX)
        q[~fast] = 0
        out[name] = q.astype(np.int8).astype(np.float32) * scale[:, None]
    for i in np.flatnonzero(odd):
        rng = np.random.default_rng([int(seeds[i]), 0x18])
        for name, m in flat.items():
            out[name][i] = decode_int8(*encode_int8(m[i], rng))
    return {n: out[n].reshape(np.shape(delta[n])) for n in flat}, bad


class BatchedFog(FogAggregator):
    """A fog whose agents are :class:`BatchedDevices`: the project's :class:`~hyprstream.fog.aggregator.FogAggregator`
    (its pull from core, seeds, aggregation rules, push through the outbox, and under
    :class:`~hyprstream.fog.dp.PrivateFogAggregator` client-level DP), its requests handed to the devices
    instead of sent as Flower messages, and its replies checked as matrices: each device's delta is refused
    for NaN or Inf or a norm over the plan's bound, clipped when client-level DP asks, and kept with its
    weight, as :meth:`FogAggregator.gather` does reply by reply."""

    def __init__(self, name: str, devices: BatchedDevices, node_ids: Sequence[int], core, model: str, plan, *,
                 seed: int = 0, outbox=None) -> None:
        super().__init__(name, None, node_ids, core, model, plan, seed=seed, outbox=outbox)
        self.devices = devices
        self._jobs: dict[int, tuple[object, Job]] = {}

    def start_round(self, round_no: int, base=None, nodes: Sequence[int] | None = None):
        import time

        from hyprstream.fog.aggregator import PendingRound

        base, nodes, weights, layers = self.round_inputs(base, nodes)
        request = self.train_request(base, layers, round_no, 0, weights)
        job = self.submit(round_no, base, nodes, weights, layers, request.update_encoding.value,
                          f"{self.name}/round-{round_no}")
        pending = PendingRound(round_no, base, layers, set(), nodes, request.payload_bytes() * len(nodes),
                               time.monotonic())
        self._jobs[id(pending)] = (pending, job)
        return pending

    def submit(self, round_no: int, base, nodes: Sequence[int], weights, layers: Sequence[str], encoding: str,
               group: str) -> Job:
        """Hand round ``round_no``'s train request to ``nodes`` to the devices: the plan's settings, each agent's
        seed (:func:`~hyprstream.protocol.train_seed` of its index, as a sent request carries it)."""
        from hyprstream.protocol import train_seed

        p, index = self.plan, {node: i for i, node in enumerate(self.node_ids)}
        return self.devices.submit(Job(weights, base.version, p.task, tuple(layers), p.local_steps, p.batch_size,
                                       p.lr, encoding, tuple(nodes),
                                       tuple(train_seed(self.seed, round_no, index[n]) for n in nodes),
                                       model=self.model, group=group))

    def gather(self, pending, *, clip: float | None = None):
        from hyprstream.fog.aggregate import Aggregation, updates_for
        from hyprstream.fog.aggregator import Gathered, _shapes
        from hyprstream.store import layer_table as lt

        held = self._jobs.pop(id(pending), None)
        if held is None or held[0] is not pending:
            raise ValidationError(f"fog {self.name!r}: round {pending.round} was not started here")
        result = self.devices.result(held[1])
        trained = lt.select_layers(pending.base.table, pending.layers)
        rule = Aggregation.MEAN if clip is not None else self.plan.aggregation
        g = Gathered({layer: updates_for(rule, _shapes(lt.select_layers(trained, [layer])),
                                         capacity=max(1, len(pending.nodes))) for layer in pending.layers})
        nodes, bound = pending.nodes, self.plan.max_update_norm
        for pos, reason in sorted(result.declined.items()):
            g.declined += 1
            g.reasons.append(f"declined: {reason}")
            g.uplink[nodes[pos]] = 0
        for pos, reason in sorted(result.failed.items()):
            g.failed += 1
            g.reasons.append(f"error: {reason}")
        kept: list[tuple[int, float, int]] = []  # (position, train loss, examples) of each contributor
        for rows in result.rows:
            k = len(rows.positions)
            flat = {n: d.reshape(k, -1) for n, d in rows.delta.items()}
            g.bytes_up += int(rows.bytes_up.sum())
            g.uplink.update(zip((nodes[p] for p in rows.positions), rows.bytes_up.tolist()))
            with np.errstate(over="ignore", invalid="ignore"):
                sq = sum((m.astype(np.float64) ** 2).sum(axis=1) for m in flat.values())
                finite = np.all([np.isfinite(m).all(axis=1) for m in flat.values()], axis=0)
                norm = np.sqrt(sq)
            ok = finite & (norm <= bound) if bound is not None else finite.copy()
            for i in np.flatnonzero(~ok):
                g.refused += 1
                g.reasons.append("refused: update contains NaN or Inf" if not finite[i] else
                                 f"refused: update norm {norm[i]:.4g} exceeds the bound {bound:.4g}")
            if not ok.any():
                continue
            weights = rows.num_examples[ok].astype(np.float64)
            if clip is not None:
                # a relative margin of 1e-6 keeps the clipped norm below ``clip`` after float32 rounding
                with np.errstate(divide="ignore"):
                    scale = np.where(norm[ok] > 0, np.minimum(1.0, clip / (norm[ok] * (1.0 + 1e-6))), 1.0)
                flat = {n: m[ok] * scale.astype(np.float32)[:, None] for n, m in flat.items()}
                weights = np.ones_like(weights)
            else:
                flat = {n: m[ok] for n, m in flat.items()}
            for layer in rows.layers:
                g.matrices[layer].store_rows({n: flat[n] for n in g.matrices[layer].shapes}, weights)
            kept.extend(zip(rows.positions[ok].tolist(), rows.loss[ok].tolist(), rows.num_examples[ok].tolist()))
        for pos, loss, examples in sorted(kept):
            g.losses.append((loss, examples))
            g.contributors.append(nodes[pos])
        return g


class BatchedSecureFog(SecureFogAggregator):
    """Secure rounds of a :class:`BatchedFog` that compute what the SecAgg+ protocol outputs, not its
    exchange: the round is planned by :class:`~hyprstream.fog.secure.SecureFogAggregator` itself (client-level
    DP's sample and budget, the quantizer and layout, the neighbour graph and threshold), every asked device
    trains, and each device that answers encodes its delta as its secure-aggregation middleware would
    (:func:`~hyprstream.privacy.contribution.encode`: clipped, quantized with stochastic rounding, with its
    distributed noise; the randomness seeded from its request, as a simulation's middleware seeds it); the
    fog gets the sum of those field vectors modulo the field, over the devices the protocol's graph keeps
    (a device whose live neighbours fall below the threshold is dropped; fewer than the round's minimum
    aborts it), and releases it as a secure round does (client-level DP's noise and charge included).
    No keys, masks or shares are made: the transcript hash covers no public keys, and the uplink counted
    is each survivor's field vector."""

    def __init__(self, fog, secagg, client_dp=None, *, ledger=None, source=None) -> None:
        super().__init__(fog, secagg, client_dp, ledger=ledger, source=source)
        self._jobs: dict[int, tuple[object, Job]] = {}

    def start_round(self, round_no: int, base=None, nodes=None, sampling=None):
        from hyprstream.store import layer_table as lt

        fog = self.fog
        pending = self.plan_round(round_no, base, nodes, sampling)
        if pending.aborted:
            return pending
        weights = lt.to_arrays(pending.base.table)
        request = fog.train_request(pending.base, pending.layers, round_no, 0, weights, encoded=False)
        pending.bytes_down = request.payload_bytes() * len(pending.nodes)
        job = fog.submit(round_no, pending.base, pending.nodes, weights, pending.layers, "fp32", pending.group_id)
        self._jobs[id(pending)] = (pending, job)
        return pending

    def _run_stages(self, pending, counts, reasons, uplink, seconds):
        import time

        from hyprstream.privacy.contribution import encode
        from hyprstream.privacy.errors import SecAggAborted
        from hyprstream.privacy.noise import SeededRandom
        from hyprstream.privacy.quantize import field_add
        from hyprstream.privacy.secagg import SecAggSum
        from hyprstream.protocol import train_seed

        t0 = time.monotonic()
        held = self._jobs.pop(id(pending), None)
        if held is None or held[0] is not pending:
            raise ValidationError(f"fog {self.fog.name!r}: round {pending.round} was not started here")
        job = held[1]
        result = self.fog.devices.result(job)
        spec, server = pending.spec, pending.server
        for _, reason in sorted(result.declined.items()):
            counts["declined"] += 1
            reasons.append(f"declined: {reason}")
        for _, reason in sorted(result.failed.items()):
            counts["failed"] += 1
            reasons.append(f"error: {reason}")
        vectors: dict[int, np.ndarray] = {}  # protocol index (position + 1) -> its field vector
        asked = tuple(pending.layers)
        for rows in result.rows:
            trained = None
            if rows.layers != asked:  # a device in its hybrid strategy: zeros and weight 0 for the rest
                if spec.n_groups != len(asked):
                    for _ in rows.positions:
                        counts["declined"] += 1
                        reasons.append(f"declined: this round sums the layer groups {list(asked)} as one; "
                                       f"this device trained {list(rows.layers)}")
                    continue
                trained = [asked.index(layer) for layer in rows.layers]
            for k, pos in enumerate(rows.positions.tolist()):
                index = pos + 1
                source = SeededRandom(train_seed(job.seeds[pos], 0, index))
                delta = {n: d[k] for n, d in rows.delta.items()}
                try:
                    vectors[index] = encode(delta, int(rows.num_examples[k]), spec, source, trained).vector
                except ValidationError as exc:  # the middleware refuses the setup stage
                    counts["refused"] += 1
                    reasons.append(f"refused: client refused the setup stage: {exc}")
        survivors = server.survivors(set(vectors))  # the protocol's dropout: too few live neighbours, too few left
        if not survivors:
            raise SecAggAborted("secure aggregation: no masked inputs")
        total = None
        for i in sorted(survivors):
            if total is None:
                total = vectors[i].copy()
            else:
                field_add(total, vectors[i])
            uplink[pending.nodes[i - 1]] = int(vectors[i].nbytes)
        seconds["batched"] = time.monotonic() - t0
        return SecAggSum(total, tuple(sorted(survivors)), (), ())


__all__ = ["BatchedDevices", "BatchedFog", "BatchedResult", "BatchedSecureFog", "Job", "JobResult", "TrainedRows", "batch_indices", "int8_roundtrip",
           "train_devices"]
