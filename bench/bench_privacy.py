"""Privacy costs: a secure fog round against a plain round and Flower's SecAgg+, and DP-SGD against plain training.

    python bench/bench_privacy.py            # K = 100 clients, n = 100,000-parameter delta; DP-SGD 100 steps
    python bench/bench_privacy.py --quick    # K = 10, n = 2,000; DP-SGD 20 steps: a CI smoke run
    python bench/bench_privacy.py --workers 16 --skip-dpsgd   # A only, the K clients in 16 processes at once
    python bench/bench_privacy.py --skip-secagg --device cuda  # B only, trained on the GPU

A. One aggregation round of K clients whose layer-wise delta has n float32 parameters. The three
   cases run over the same in-process ``LoopbackGrid`` (every message protobuf-encoded and decoded
   both ways, as a SuperLink carries it; the K ClientApps run one after another in this process)
   and aggregate the same deltas: each client's train handler returns a fixed delta (norm 0.5,
   below the clip bound 1.0), no training happens.

   (plain)  ``FogAggregator.run_round``: train requests, plaintext delta replies, the weighted
            mean (``UpdateSum``), push to an in-memory core.
   (secure) ``SecureFogAggregator.run_round`` around the same fog: setup (the train request),
            share, mask, consistency, unmask stages (SecAgg+ over a Harary graph of degree k,
            threshold t from ``plan_graph(K, expected_dropout=0.1)``), decode, mean, push. Each
            client has a secure-aggregation identity certified by a deployment CA made with
            ``hyprstream certs init`` (node config ``secagg-identity-*``), as in a deployment that
            defends against a deviating fog: it checks its neighbours' certificates, agrees each
            pair's keys with its static identity key, and confirms the survivor set with pairwise MACs.
   (flower) Flower 1.42 ``SecAggPlusWorkflow(num_shares=k+1, reconstruction_threshold=t)`` (Flower
            counts the client itself among the share holders), one fit round with FedAvg and a
            ``LegacyContext``, clients ``ClientApp(client_fn, mods=[secaggplus_mod])`` returning the
            same deltas as their parameters. Only the workflow call is timed.

   By default A runs twice: so, and then with the K ClientApps answering in W worker processes at
   once, W = the usable cores (``ProcessLoopbackGrid``: as K devices answer side by side; messages
   cross as the same wire bytes), for all three cases; the client seconds then overlap and only the
   round's wall time is compared. ``--workers W`` runs that case alone (``--workers 0``: serial alone).

   Timed: the whole round, everything on this machine's cores (K clients' work + the fog's). Also
   split into *client* seconds (inside the ClientApps) and *fog* seconds (the rest: the fog's
   protocol work and the message encoding), and a *deployment* estimate where clients run in
   parallel: fog seconds + the slowest client of each stage, summed over the stages.
   Checked before timing: plain = exact mean (float32); secure = exact mean within one quantization
   step; Flower's error is printed.

B. DP-SGD (``dp_train_layers``) against non-private training (``train_layers``, the agent's
   trainer) of the same layers of the digits MLP: the last layer (``head``) and the last two
   (``fc2``, ``head``), S steps of batch 64 (Poisson rate 64 / n for DP) on the 1,347 training
   digits, one torch thread. Timed: the training call. ``dp`` is the default engine (for these
   all-``nn.Linear`` layers: ``LinearClipper``, per-example norms from layer inputs and output
   gradients); ``dp-opacus`` the same DP-SGD steps through Opacus' ``GradSampleModule`` +
   ``DPOptimizer`` (the same samples and noise draws; equal results, tested), for reference.
   ``--device cuda`` trains on the GPU (the model, the data and the noise there; the Poisson
   samples still drawn on the CPU); each timed call ends when its delta is back on the host.

Cases are interleaved round by round after the warm-up (bench/README.md). Memory at peak: the K
deltas, one round's messages (weights down, vectors up) and Flower's copies: a few times K * n * 4 bytes.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import warnings
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Case, base_parser, finish, header, machine_info, measure_interleaved  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
MODEL, LAYER, PARAM = "bench", "layer", "layer.w"


# ------------------------------------------------------------------------------------------ A
class StubCore:
    def __init__(self, n: int) -> None:
        from hyprstream.store import layer_table as lt

        self.table = lt.to_table({PARAM: np.zeros(n, np.float32)})
        self.version = 1
        self.last = None

    def get_weights(self, model):
        from hyprstream.core.repository import Snapshot
        from hyprstream.vector_clock import VectorClock

        return Snapshot(model, self.version, self.table, {LAYER: VectorClock()})

    def head(self, model):
        return {}  # the model's head: core sets no max_update_norm here

    def push(self, record, delta):
        from hyprstream.core.repository import PushResult
        from hyprstream.store import layer_table as lt

        self.last = lt.to_arrays(delta, copy=True)
        return PushResult(self.version + 1, {}, 1.0, 0.0)


def hyprstream_app(deltas):
    """The agent's shape of ClientApp: train.layerwise plain, train.secagg behind the middleware."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    from hyprstream.privacy.secagg_messages import SECAGG_ACTION
    from hyprstream.privacy.secagg_mod import make_secagg_mod
    from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest

    def train(msg, context):
        req = TrainRequest.from_content(msg.content)
        reply = TrainReply(ReplyStatus.OK, req.model_version, req.layers, {PARAM: deltas[context.node_id]},
                           num_examples=100, train_loss=0.0, steps=1)
        return Message(reply.to_content(), reply_to=msg)

    app = ClientApp()
    app.train("layerwise")(train)
    app.train(SECAGG_ACTION, mods=[make_secagg_mod(secure=False)])(train)
    return app


def make_grid(app_factory, nodes, workers: int, node_config=None):
    """The grid the K clients answer on: in this process one after another, or in ``workers`` processes at once
    (each builds its ClientApp from the picklable ``app_factory``)."""
    from hyprstream.fog.loopback import LoopbackGrid, ProcessLoopbackGrid

    if workers:
        return ProcessLoopbackGrid(app_factory, nodes, workers=workers, node_config=node_config)
    return LoopbackGrid(app_factory(), nodes, node_config=node_config)


def certified_identities(root: str, nodes) -> dict[int, dict[str, str]]:
    """A deployment CA (``hyprstream certs init``) and a secure-aggregation identity per node, as node config.
    Without the identity module (older code) no node config."""
    try:
        from hyprstream.privacy.identity import deployment_ca, issue_identity, write_identity
    except ImportError:
        return {node: {} for node in nodes}
    from hyprstream.core.certs import init_deployment

    init_deployment(os.path.join(root, "deployment"))
    ca, ca_key = deployment_ca(os.path.join(root, "deployment"))
    out = {}
    for node in nodes:
        key, cert = os.path.join(root, f"{node}.key"), os.path.join(root, f"{node}.pem")
        write_identity(issue_identity(f"device-{node}", ca, ca_key), key, cert)
        out[node] = {"secagg-identity-key": key, "secagg-identity-cert": cert,
                     "secagg-ca": os.path.join(root, "deployment", "ca.pem")}
    return out


def flower_client_fn(deltas, ctx):
    """Flower's NumPyClient returning the node's fixed delta as its 'parameters'."""
    from flwr.client import NumPyClient

    class Client(NumPyClient):
        def fit(self, parameters, config):
            return [deltas[ctx.node_id]], 100, {}

    return Client().to_client()


def flower_app(deltas):
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    return ClientApp(client_fn=functools.partial(flower_client_fn, deltas), mods=[secaggplus_mod])


def flower_setup(deltas, n: int, num_shares: int, threshold: int, workers: int = 0):
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    grid = make_grid(functools.partial(flower_app, deltas), list(deltas), workers)

    class Run:
        run_id = 1

    grid._run = Run()
    k = len(deltas)
    init = ndarrays_to_parameters([np.zeros(n, np.float32)])

    def run_round(_state=None):
        strategy = FedAvg(fraction_fit=1.0, min_fit_clients=k, min_available_clients=k, fraction_evaluate=0.0,
                          initial_parameters=init, fit_metrics_aggregation_fn=lambda m: {})
        ctx = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
        for node in deltas:
            ctx.client_manager.register(GridClientProxy(node_id=node, grid=grid, run_id=1))
        ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(init, keep_input=True)
        cfg = ConfigRecord()
        cfg[Key.CURRENT_ROUND] = 1
        cfg[Key.START_TIME] = 0.0
        ctx.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold, timeout=600)(grid, ctx)
        params = compat.arrayrecord_to_parameters(ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        return parameters_to_ndarrays(params)[0]

    return grid, run_round


def split_seconds(grid, total: float) -> dict[str, float]:
    """Client and fog seconds of one round, and the parallel-clients estimate, from the grid's log."""
    stage_of: dict[int, int] = defaultdict(int)
    slowest: dict[int, float] = defaultdict(float)
    client = 0.0
    for node, _type, sec in grid.seconds:
        stage = stage_of[node]
        stage_of[node] += 1
        slowest[stage] = max(slowest[stage], sec)
        client += sec
    fog = total - client
    return {"client_s": client, "fog_s": fog, "deployment_s": fog + sum(slowest.values()), "stages": len(slowest)}


def bench_secagg(k: int, n: int, repeats: int, warmup: int, seed: int, workers: int = 0, flower: bool = True) -> dict:
    from hyprstream.fog.aggregator import FogAggregator, RoundPlan
    from hyprstream.privacy.config import SecAggConfig
    from hyprstream.privacy.noise import SeededRandom
    from hyprstream.privacy.secagg import plan_graph
    from hyprstream.fog.secure import SecureFogAggregator

    rng = np.random.default_rng(seed)
    nodes = list(range(1000, 1000 + k))
    deltas = {}
    for node in nodes:
        v = rng.standard_normal(n)
        deltas[node] = (v * (0.5 / np.linalg.norm(v))).astype(np.float32)  # norm 0.5 < clip 1.0
    exact = np.mean([deltas[x].astype(np.float64) for x in nodes], axis=0)
    degree, threshold = plan_graph(k, expected_dropout=0.1)
    from hyprstream.privacy import masking

    print(f"A. secure round: K={k} clients, n={n} float32 parameters, degree k={degree}, threshold t={threshold}, "
          f"{masking.THREADS} mask thread(s) per client; clients answer "
          + (f"in {workers} worker processes at once" if workers else "one after another in this process"))

    plan = RoundPlan(task="bench", layers=(LAYER,), local_steps=1, batch_size=1, lr=0.1, timeout_s=600.0)
    import tempfile

    identities_dir = tempfile.TemporaryDirectory(prefix="bench-secagg-")
    identities = certified_identities(identities_dir.name, nodes)
    grid = make_grid(functools.partial(hyprstream_app, deltas), nodes, workers, node_config=identities.__getitem__)
    core = StubCore(n)
    fog = FogAggregator("fog-bench", grid, nodes, core, MODEL, plan)
    secure = SecureFogAggregator(fog, SecAggConfig(clip=1.0, stage_timeout_s=600.0), source=SeededRandom(seed))
    fgrid, flower_round = flower_setup(deltas, n, degree + 1, threshold, workers) if flower else (None, None)

    # correctness first
    r = fog.run_round(1)
    assert r.participants == k
    plain_err = float(np.abs(core.last[PARAM] - exact).max())
    assert plain_err <= 4 * np.finfo(np.float32).eps * np.abs(exact).max() + 1e-9, plain_err
    r = secure.run_round(1)
    assert r.participants == k and r.version is not None, r.reasons
    secure_err = float(np.abs(core.last[PARAM] - exact).max())
    from hyprstream.privacy.quantize import Quantizer

    step = Quantizer.for_clients(clip=1.0, max_clients=k).resolution
    assert secure_err <= step + 1e-6 * np.abs(exact).max(), (secure_err, step)
    flower_err = float(np.abs(flower_round() - exact).max()) if flower else float("nan")
    print(f"check:   plain max |err| {plain_err:.2e}; secure {secure_err:.2e} (quantization step {step:.2e}); "
          f"Flower SecAgg+ {flower_err:.2e} (of max |mean| {np.abs(exact).max():.2e})")

    splits: dict[str, list[dict]] = defaultdict(list)

    def timed(name, g, fn):
        def setup():
            g.seconds.clear()
            return None

        def run(_state):
            import time

            t0 = time.perf_counter()
            fn()
            splits[name].append(split_seconds(g, time.perf_counter() - t0))

        return Case(run=run, setup=setup)

    cases = {
        "plain": timed("plain", grid, lambda: fog.run_round(2)),
        "secure": timed("secure", grid, lambda: secure.run_round(2)),
    }
    if flower:
        cases["flower"] = timed("flower", fgrid, flower_round)
    t = measure_interleaved(cases, repeats=repeats, warmup=warmup)

    def med(name, key):
        return float(np.median([s[key] for s in splits[name][warmup:]]))

    # With worker processes the clients' seconds overlap: the fog / deployment split applies to serial runs only.
    serial = not workers
    where = "one machine, clients serial" if serial else f"one machine, clients in {workers} processes"

    def split(name, key):
        return med(name, key) if serial or key == "client_s" else float("nan")

    print()
    print(f"{'case':34s} {'round s':>9s} {'min s':>8s} {'client s':>9s} {'fog s':>8s} {'deploy s':>9s}")
    for name, label in (("plain", "(plain) FogAggregator"), ("secure", "(secure) SecureFogAggregator"),
                        ("flower", "(flower) SecAggPlusWorkflow")):
        if name not in t:
            continue
        print(f"{label:34s} {t[name].median:9.3f} {t[name].min:8.3f} {split(name, 'client_s'):9.3f} "
              f"{split(name, 'fog_s'):8.3f} {split(name, 'deployment_s'):9.3f}")
    ratio_plain = t["secure"].median / t["plain"].median
    ratio_plain_deploy = split("secure", "deployment_s") / split("plain", "deployment_s")
    speedup = t["flower"].median / t["secure"].median if flower else float("nan")
    speedup_deploy = split("flower", "deployment_s") / split("secure", "deployment_s") if flower else float("nan")

    def verdict(value, ok):
        return "" if math.isnan(value) else ("met" if ok(value) else "NOT met")

    print()
    print(f"secure / plain round: {ratio_plain:5.2f}x ({where}; target <= 3x: {verdict(ratio_plain, lambda v: v <= 3)})"
          + (f", {ratio_plain_deploy:5.2f}x deployment estimate ({verdict(ratio_plain_deploy, lambda v: v <= 3)})"
             if serial else ""))
    if flower:
        print(f"speedup vs Flower SecAgg+: {speedup:5.2f}x ({where}; target >= 2x: {verdict(speedup, lambda v: v >= 2)})"
              + (f", {speedup_deploy:5.2f}x deployment estimate ({verdict(speedup_deploy, lambda v: v >= 2)})"
                 if serial else ""))
    grid.close()
    if fgrid is not None:
        fgrid.close()
    identities_dir.cleanup()
    return {"k": k, "n": n, "degree": degree, "threshold": threshold, "mask_threads": masking.THREADS,
            "workers": workers, "seconds": t,
            "split_medians": {c: {key: split(c, key) for key in ("client_s", "fog_s", "deployment_s")} for c in cases},
            "secure_over_plain": ratio_plain, "secure_over_plain_deployment": ratio_plain_deploy,
            "speedup_vs_flower": speedup, "speedup_vs_flower_deployment": speedup_deploy,
            "max_abs_err": {"plain": plain_err, "secure": secure_err, "flower": flower_err, "quant_step": step}}


# ------------------------------------------------------------------------------------------ B
def bench_dpsgd(steps: int, repeats: int, warmup: int, device: str = "cpu") -> dict:
    import torch

    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import train_layers
    from hyprstream.privacy.dpsgd import ClipEngine, DpSgd, dp_train_layers
    from hyprstream.privacy.ledger import Budget

    torch.set_num_threads(1)
    task = get_task("digits")
    data, _ = task.load_reference_data(seed=0)
    settings = DpSgd(noise_multiplier=1.1, max_grad_norm=1.0, budget=Budget(1e9, 1e-5), secure=False)
    print()
    print(f"B. DP-SGD vs plain training: digits MLP, {steps} steps of batch 64 on {len(data)} examples, "
          f"1 torch thread, on {device}")
    cases, groups = {}, {"head": ["head"], "fc2+head": ["fc2", "head"]}
    for label, layers in groups.items():
        cases[f"plain {label}"] = Case(run=lambda m, layers=layers: train_layers(
            task, m, layers, data, steps=steps, batch_size=64, lr=0.01, seed=0, device=device),
            setup=lambda: task.build_model(seed=0))
        for name, engine in ((f"dp {label}", ClipEngine.AUTO), (f"dp-opacus {label}", ClipEngine.OPACUS)):
            cases[name] = Case(run=lambda m, layers=layers, engine=engine: dp_train_layers(
                task, m, layers, data, steps=steps, batch_size=64, lr=0.01, settings=settings,
                generator=torch.Generator().manual_seed(0), device=device, engine=engine),
                setup=lambda: task.build_model(seed=0))
    t = measure_interleaved(cases, repeats=repeats, warmup=warmup)
    print()
    print(f"{'case':20s} {'median s':>9s} {'min s':>8s} {'ms/step':>8s}")
    for name in cases:
        print(f"{name:20s} {t[name].median:9.4f} {t[name].min:8.4f} {1e3 * t[name].median / steps:8.3f}")
    ratios = {label: t[f"dp {label}"].median / t[f"plain {label}"].median for label in groups}
    opacus = {label: t[f"dp-opacus {label}"].median / t[f"plain {label}"].median for label in groups}
    print()
    for label, r in ratios.items():
        print(f"DP-SGD / plain, {label}: {r:5.2f}x (target <= 2x: {'met' if r <= 2 else 'NOT met'}); "
              f"through Opacus' per-sample gradients: {opacus[label]:5.2f}x")
    return {"steps": steps, "device": device, "seconds": t, "dp_over_plain": ratios, "dp_opacus_over_plain": opacus}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("-K", "--clients", type=int, default=None, help="clients (default 100; --quick 10)")
    p.add_argument("-n", "--size", type=int, default=None, help="delta parameters (default 100,000; --quick 2,000)")
    p.add_argument("--steps", type=int, default=None, help="DP-SGD steps (default 100; --quick 20)")
    p.add_argument("--skip-secagg", action="store_true")
    p.add_argument("--skip-dpsgd", action="store_true")
    p.add_argument("--skip-flower", action="store_true", help="A without Flower's SecAgg+ (plain and secure only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device DP-SGD (B) trains on: cpu (default) or cuda")
    p.add_argument("--workers", type=int, default=None,
                   help="answer the K clients in this many worker processes at once, as separate devices do "
                        "(hyprstream.fog.loopback.ProcessLoopbackGrid); 0: one after another in this process. "
                        "Default: both, serial first, then one worker per usable core")
    p.add_argument("--mask-threads", type=int, default=None,
                   help="threads a client spreads its mask expansion over (hyprstream.privacy.masking.THREADS; default 1)")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    if args.device != "cpu" and not args.skip_dpsgd:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            p.error(f"--device {args.device}: torch sees no CUDA device here")
    if args.mask_threads is not None:
        from hyprstream.privacy import masking

        masking.THREADS = max(1, args.mask_threads)
    k = args.clients or (10 if args.quick else 100)
    n = args.size or (2_000 if args.quick else 100_000)
    steps = args.steps or (20 if args.quick else 100)
    repeats = args.repeats or (2 if args.quick else 5)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("hyprstream").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    header("Privacy: secure aggregation round and DP-SGD")
    result: dict = {"benchmark": "privacy", "repeats": repeats, "warmup": args.warmup}
    if not args.skip_secagg:
        if args.workers is None:
            result["secagg"] = bench_secagg(k, n, repeats, args.warmup, args.seed, 0, not args.skip_flower)
            print()
            workers = max(2, machine_info()["usable_cores"] or 2)
            result["secagg_parallel"] = bench_secagg(k, n, repeats, args.warmup, args.seed, workers,
                                                     not args.skip_flower)
        else:
            result["secagg"] = bench_secagg(k, n, repeats, args.warmup, args.seed, args.workers, not args.skip_flower)
    if not args.skip_dpsgd:
        result["dpsgd"] = bench_dpsgd(steps, repeats * 2 if not args.quick else repeats, args.warmup, args.device)
    return finish(result)


if __name__ == "__main__":
    raise SystemExit(main())
