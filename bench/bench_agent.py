"""Edge agent: idle footprint, ONNX Runtime inference vs torch eager, MQTT telemetry throughput.

    python bench/bench_agent.py            # 60 s idle window, full repeats, 20k telemetry messages
    python bench/bench_agent.py --quick    # 10 s idle window, few repeats, 2k messages: a smoke run

Three parts, all in this run:

1. Idle agent. A real ``agent run`` process (rpi4 profile, telemetry every 10 s to a private
   mosquitto, HTTP record endpoint and a watched directory on, and a Flower SuperNode connected to a
   private SuperLink on loopback when ``flower-superlink`` is installed) is started and left alone
   for a warm-up of 10 s; then its resident memory (RSS) and CPU time are read over the idle window.
   Reported: RSS at the end of the window, the CPU used over the window as a percentage of one core,
   and whether torch or onnxruntime are mapped into the process (/proc/PID/maps). The SuperNode child
   (Flower's own process) is reported on its own line. Targets: agent RSS <= 150 MB, agent CPU <= 2 %.
2. Inference at batch 32 on one CPU thread (torch ``set_num_threads(1)``, ONNX Runtime
   ``intra_op_num_threads = 1``): the digits MLP and the digits CNN (8x8 images) and the MiniLM text
   classifier (32 tokens). Cases: torch eager (``inference_mode``), ONNX Runtime fp32, ONNX Runtime
   int8 (dynamic for the MLP and MiniLM, static QDQ for the CNN), interleaved round by round; each
   timed round runs ``calls`` batches back to back. Outputs are checked first: fp32 ONNX equals torch
   within 1e-3, int8 agrees with torch on >= 90 % of the argmax classes. Targets: ORT fp32 >= 1.5x
   torch for the image models, > 1x for the text model; int8 faster than fp32 "where the hardware
   allows" (printed, not required).
3. Telemetry through mosquitto at QoS 1: (a) one agent's :class:`MqttPublisher` sends N real
   telemetry payloads as fast as it can, one plain paho subscriber (the fog) counts them;
   (b) 20 publishers (a fleet) share N messages, two fog subscribers on the fleet wildcard each count
   all of them. Timed: first publish to the last message at each subscriber. Loss = messages missing
   at a subscriber (duplicates counted apart). Target: >= 1000 msg/s per subscriber, no loss.

Memory: one model and its ONNX sessions at a time (MiniLM: ~90 MB of weights, three copies).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Case, base_parser, emit, header, measure_interleaved, peak_rss_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
RSS_TARGET_MB, CPU_TARGET_PCT, SPEEDUP_TARGET, MSG_TARGET = 150.0, 2.0, 1.5, 1000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


class Broker:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 1000000\nmax_inflight_messages 1000\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------------------------------------- 1. idle


def idle(workdir: Path, window_s: float) -> dict:
    import psutil

    broker = Broker(workdir)
    link = None
    extra: list[str] = []
    link_exe = Path(sys.executable).with_name("flower-superlink")
    if link_exe.exists():
        link_port = free_port()
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_HOME": str(workdir / "flwr-link")}
        link = subprocess.Popen([str(link_exe), "--insecure", "--disable-runtime-dependency-installation",
                                 "--port", str(link_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, cwd=workdir)
        wait_port(link_port, 60)
        extra = ["--fog", f"127.0.0.1:{link_port}", "--fog-insecure"]
    key = workdir / "store.key"
    key.write_bytes(os.urandom(32))
    listen = free_port()
    cmd = [sys.executable, "-m", "hyprstream.cli", "agent", "run", "--config", str(ROOT / "firmware-configs/rpi4.toml"),
           "--mqtt", f"127.0.0.1:{broker.port}", "--fleet", "bench", "--device-id", "idle-01",
           "--store", str(workdir / "store"), "--store-key", str(key), "--listen", str(listen),
           "--watch", str(workdir / "inbox"), "--log-level", "warning", *extra]
    log_path = workdir / "agent.log"
    agent = subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)

    def alive(when: str) -> None:
        """Fail loudly unless the agent runs (and its SuperNode with it, when a SuperLink is up)."""
        problem = None if agent.poll() is None else f"the agent exited with code {agent.returncode}"
        if problem is None and link is not None and not psutil.Process(agent.pid).children(recursive=True):
            problem = "the agent has no SuperNode child"
        if problem:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"idle agent {when}: {problem}; its log ends:\n{tail}")

    try:
        wait_port(listen, 60)  # the daemon is up: its HTTP record endpoint listens
        time.sleep(10.0)  # warm-up: imports, store open, first ticks, SuperNode start
        alive("after the warm-up")
        proc = psutil.Process(agent.pid)
        kids = [k for k in proc.children(recursive=True)]
        t0, c0 = time.monotonic(), proc.cpu_times()
        k0 = {k.pid: k.cpu_times() for k in kids}
        time.sleep(window_s)
        t1, c1 = time.monotonic(), proc.cpu_times()
        wall = t1 - t0
        cpu_pct = 100.0 * ((c1.user - c0.user) + (c1.system - c0.system)) / wall
        rss_mb = proc.memory_info().rss / 1e6
        alive("at the end of the window")
        maps = Path(f"/proc/{agent.pid}/maps").read_text() if Path(f"/proc/{agent.pid}/maps").exists() else ""
        child = {"rss_mb": 0.0, "cpu_pct": 0.0, "processes": 0, "each": {}}
        for k in kids:
            try:
                ct = k.cpu_times()
                rss, cpu = k.memory_info().rss / 1e6, 100.0 * ((ct.user - k0[k.pid].user) + (ct.system - k0[k.pid].system)) / wall
                name = "executor" if "hyprstream.agent.executor" in " ".join(k.cmdline()) else k.name()
            except psutil.Error:
                continue
            child["rss_mb"] += rss
            child["cpu_pct"] += cpu
            child["processes"] += 1
            child["each"][f"{name} ({k.pid})"] = {"rss_mb": rss, "cpu_pct": cpu}
        result = {"window_s": round(wall, 1), "rss_mb": rss_mb, "cpu_pct": cpu_pct,
                  "torch_loaded": "libtorch" in maps, "onnxruntime_loaded": "onnxruntime" in maps,
                  "supernode": link is not None, "children": child}
    finally:
        stop_process(agent)
        if link is not None:
            stop_process(link)
        broker.stop()
    print(f"\n## 1. idle agent over {result['window_s']} s (rpi4 profile, telemetry every 10 s, HTTP + watch on"
          f"{', SuperNode connected' if link else ', no SuperNode'})")
    print(f"agent process: RSS {rss_mb:.1f} MB (target <= {RSS_TARGET_MB:.0f}: "
          f"{'met' if rss_mb <= RSS_TARGET_MB else 'NOT met'}), CPU {cpu_pct:.2f} % of one core "
          f"(target <= {CPU_TARGET_PCT:.0f}: {'met' if cpu_pct <= CPU_TARGET_PCT else 'NOT met'}); "
          f"torch loaded: {result['torch_loaded']}, onnxruntime loaded: {result['onnxruntime_loaded']}")
    if child["processes"]:
        print(f"SuperNode and its ClientApp executor ({child['processes']} process(es)): RSS {child['rss_mb']:.1f} MB, "
              f"CPU {child['cpu_pct']:.2f} %")
        for name, figures in child["each"].items():
            print(f"  {name}: RSS {figures['rss_mb']:.1f} MB, CPU {figures['cpu_pct']:.2f} %")
    return result


# ---------------------------------------------------------------------------------------------- 2. inference


def inference(workdir: Path, repeats: int, warmup: int, calls: int, text: bool) -> dict:
    import torch

    from hyprstream.agent.export import export_version
    from hyprstream.agent.inference import OrtPredictor, TorchPredictor
    from hyprstream.agent.profile import ExecutionProvider, ModelVariant
    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import model_weights, train_layers

    torch.set_num_threads(1)
    names = ["digits", "digits-cnn"] + (["text"] if text else [])
    print(f"\n## 2. inference, batch 32, one CPU thread ({calls} batches per timed round, {max(2, calls // 10)} "
          f"for MiniLM; median of {repeats})")
    print(f"{'model':12s} {'torch eager':>12s} {'ORT fp32':>10s} {'ORT int8':>10s} {'fp32 vs torch':>14s} "
          f"{'int8 vs torch':>14s} {'int8 vs fp32':>13s}  target")
    results = {}
    for name in names:
        task = get_task(name)
        train, test = task.load_reference_data(0)
        model = task.build_model(seed=0)
        layers = ("layer5", "head") if name == "text" else task.layer_groups(model)
        train_layers(task, model, layers, train, steps=30 if name == "text" else 200, batch_size=32, lr=2e-3,
                     seed=0)
        files = export_version(name, 1, model_weights(model), workdir / name, calibration=train.x[:256])
        x = np.ascontiguousarray(np.resize(test.x, (32, *test.x.shape[1:])))
        eager = TorchPredictor(task, model=model)
        fp32 = OrtPredictor(files.fp32, ExecutionProvider.CPU, ModelVariant.FP32, threads=1)
        int8 = OrtPredictor(files.int8, ExecutionProvider.CPU, ModelVariant.INT8, threads=1)
        ref = eager(x)
        np.testing.assert_allclose(fp32(x), ref, rtol=1e-3, atol=1e-3)
        agree = float(np.mean(int8(x).argmax(1) == ref.argmax(1)))
        assert agree >= 0.9, f"{name}: int8 agrees with torch on only {agree:.0%} of the classes"

        n = max(2, calls // 10) if name == "text" else calls  # MiniLM takes ~0.5 s a batch here

        def loop(predict, n=n):
            return Case(run=lambda _s: [predict(x) for _ in range(n)])

        t = measure_interleaved({"torch": loop(eager), "fp32": loop(fp32), "int8": loop(int8)},
                                repeats=repeats, warmup=warmup)
        per = {k: v.median / n for k, v in t.items()}
        s_fp32, s_int8, q = per["torch"] / per["fp32"], per["torch"] / per["int8"], per["fp32"] / per["int8"]
        target = SPEEDUP_TARGET if name != "text" else 1.0
        met = "met" if s_fp32 >= target else "NOT met"
        print(f"{name:12s} {per['torch'] * 1e3:10.3f}ms {per['fp32'] * 1e3:8.3f}ms {per['int8'] * 1e3:8.3f}ms "
              f"{s_fp32:13.2f}x {s_int8:13.2f}x {q:12.2f}x  fp32 >= {target:g}x torch: {met}")
        results[name] = {"ms_per_batch": {k: v * 1e3 for k, v in per.items()}, "timings": t,
                         "speedup_fp32_vs_torch": s_fp32, "speedup_int8_vs_torch": s_int8, "int8_vs_fp32": q,
                         "int8_argmax_agreement": agree, "quantization": files.quantization, "target": target}
        del eager, fp32, int8, model
    return results


# ---------------------------------------------------------------------------------------------- 3. telemetry


class Counter:
    def __init__(self, port: int, topic: str, name: str) -> None:
        import paho.mqtt.client as mqtt

        self.seen: dict[tuple[str, int], int] = {}
        self.last = 0.0
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("subscription not confirmed")

    def _on_message(self, client, userdata, msg) -> None:
        data = json.loads(msg.payload)
        key = (data["device_id"], data["seq"])
        with self.lock:
            self.seen[key] = self.seen.get(key, 0) + 1
            self.last = time.perf_counter()

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def telemetry_run(port: int, devices: int, total: int, subscribers: int) -> dict:
    import dataclasses

    from hyprstream.agent.monitor import ResourceSample
    from hyprstream.agent.profile import ExecutionProvider, ModelVariant, Strategy, TelemetrySettings
    from hyprstream.agent.publisher import BrokerConfig, MqttPublisher
    from hyprstream.telemetry.records import (
        ModelState,
        PrivacyState,
        StrategyState,
        Telemetry,
        to_wire,
    )

    settings = TelemetrySettings(qos=1, offline_buffer_max_messages=total)
    counters = [Counter(port, "hyprstream/v1/bench/+/telemetry", f"fog-{i}-{devices}") for i in range(subscribers)]
    pubs = []
    for d in range(devices):
        p = MqttPublisher(BrokerConfig("127.0.0.1", port), fleet="bench", device_id=f"dev-{d:03d}", session="b",
                          settings=settings)
        p.start()
        if not p.wait_connected(10):
            raise RuntimeError("publisher did not connect")
        pubs.append(p)
    base = Telemetry(
        fleet="bench", device_id="dev-000", device_class="raspberry-pi-4", session="b", seq=1, time=time.time(),
        uptime_s=1.0, resources=ResourceSample(time.time(), 12.5, 40.1, 1600.0, 30.0, 51.2, None, None),
        strategy=StrategyState(Strategy.FULL, None, "readings clear the full thresholds by 5", True,
                               ExecutionProvider.CPU, ModelVariant.INT8),
        model=ModelState("digits", 42), privacy=PrivacyState(False, 8.0, 1e-5))
    per_device = total // devices
    payloads = [[to_wire(dataclasses.replace(base, device_id=f"dev-{d:03d}", seq=s + 1)) for s in range(per_device)]
                for d in range(devices)]
    n = per_device * devices
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda p=p, msgs=msgs: [p.publish_payload(m) for m in msgs])
               for p, msgs in zip(pubs, payloads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 120
    while any(c.count() < n for c in counters) and time.monotonic() < deadline:
        time.sleep(0.05)
    out = {"messages": n, "payload_bytes": len(payloads[0][0]), "subscribers": []}
    for c in counters:
        got = c.count()
        dup = sum(v - 1 for v in c.seen.values())
        secs = c.last - start
        out["subscribers"].append({"received": got, "lost": n - got, "duplicates": dup, "seconds": secs,
                                   "msg_per_s": got / secs if secs > 0 else 0.0})
        c.close()
    for p in pubs:
        p.close(timeout_s=5)
    return out


def telemetry(workdir: Path, total: int) -> dict:
    broker = Broker(workdir)
    try:
        single = telemetry_run(broker.port, devices=1, total=total, subscribers=1)
        fleet = telemetry_run(broker.port, devices=20, total=total, subscribers=2)
    finally:
        broker.stop()
    print(f"\n## 3. telemetry through mosquitto, QoS 1 ({single['payload_bytes']}-byte payloads)")
    for label, r in (("1 agent -> 1 fog subscriber", single), ("20 agents -> 2 fog subscribers", fleet)):
        for i, s in enumerate(r["subscribers"]):
            ok = s["msg_per_s"] >= MSG_TARGET and s["lost"] == 0
            print(f"{label:32s} sub {i}: {s['received']}/{r['messages']} in {s['seconds']:.2f} s = "
                  f"{s['msg_per_s']:8.0f} msg/s, lost {s['lost']}, duplicates {s['duplicates']} "
                  f"(target >= {MSG_TARGET:.0f} msg/s, no loss: {'met' if ok else 'NOT met'})")
    return {"single": single, "fleet": fleet}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[], choices=("idle", "inference", "telemetry"))
    parser.add_argument("--no-text", action="store_true", help="leave the MiniLM model out of part 2")
    args = parser.parse_args()
    header("edge agent: idle footprint, inference, telemetry")
    repeats = args.repeats or (3 if args.quick else 7)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        work = Path(tmp)
        if "idle" not in args.skip:
            if MOSQUITTO is None:
                print("idle part skipped: mosquitto is not installed")
            else:
                (work / "idle").mkdir()
                result["idle"] = idle(work / "idle", 10.0 if args.quick else 60.0)
        if "inference" not in args.skip:
            (work / "inference").mkdir()
            result["inference"] = inference(work / "inference", repeats, args.warmup, 5 if args.quick else 50,
                                            text=not args.no_text)
        if "telemetry" not in args.skip and MOSQUITTO is not None:
            (work / "telemetry").mkdir()
            result["telemetry"] = telemetry(work / "telemetry", 2_000 if args.quick else 20_000)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(f"\npeak RSS of this benchmark process: {result['peak_rss_bytes'] / 1e6:.0f} MB")
    emit(result)


if __name__ == "__main__":
    main()
