"""The agent daemon (``hyprstream agent run``): one long-lived process per device.

It opens the device's store, runs the ingestion sources, the ingest pipeline (store, inference,
predictions), the resource monitor and the adaptive policy, publishes telemetry over MQTT, and
supervises a Flower SuperNode (a child process) connected to the fog. Every ``tick_s`` (at most 5 s,
at most the telemetry interval) it

1. samples the resources and lets the policy decide (decisions that change the strategy are logged);
2. writes the decision for the ClientApp (:mod:`hyprstream.agent.handoff`) and switches the
   inference engine's provider and variant to the plan;
3. picks up a global model version that a train request brought and exports it to ONNX in a child
   process (never torch in the daemon);
4. restarts the SuperNode with backoff if it died;
5. publishes telemetry when it is due.

Idle, it is a sleeping loop: no torch, no onnxruntime until a model arrives, no busy threads.
:meth:`Agent.run` returns after a clean shutdown once its ``stop`` event is set (SIGTERM/SIGINT in
the CLI): sources stop, the SuperNode gets SIGTERM, a retained ``offline`` status is published, and
the store is checkpointed and closed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hyprstream.agent.handoff import PolicyState, latest_model, prune_models, write_policy
from hyprstream.agent.monitor import Monitor, ResourceMonitor, ResourceSample
from hyprstream.agent.policy import AdaptivePolicy, Decision, plan_inference
from hyprstream.agent.profile import DeviceProfile, Strategy
from hyprstream.agent.publisher import BrokerConfig, MqttPublisher, TelemetryPublisher
from hyprstream.telemetry.records import (
    InferenceStats,
    IngestStats,
    ModelState,
    PrivacyState,
    StrategyState,
    Telemetry,
    check_topic_part,
)
from hyprstream.durable import write_private_file
from hyprstream.errors import ConfigError, HyprstreamError, StoreError
from hyprstream.runtime import executable, stop_process

__all__ = ["Agent", "AgentConfig", "FogLink", "IngestConfig", "SuperNodeProcess"]

log = logging.getLogger("hyprstream.agent")

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
MAX_TICK_S = 5.0
CALIBRATION_ROWS = 256


@dataclass(frozen=True)
class FogLink:
    """How the SuperNode reaches the fog's SuperLink."""

    address: str  # HOST:PORT of the SuperLink's Fleet API
    ca_file: Path | None = None  # TLS: the CA that signed the SuperLink's certificate
    insecure: bool = False  # plain HTTP (only on a trusted network); excludes ca_file
    auth_key: Path | None = None  # SuperNode authentication: this node's private key
    runtime_port: int | None = None  # the SuperNode's local Runtime API port (default: a free one)

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"expected HOST:PORT, got {self.address!r}", source="--fog")
        if self.insecure and self.ca_file is not None:
            raise ConfigError("give either --fog-ca (TLS) or --fog-insecure, not both", source="--fog")
        if not self.insecure and self.ca_file is None:
            raise ConfigError("the fog link needs --fog-ca CA.pem (TLS), or --fog-insecure on a trusted network",
                              source="--fog")
        for flag, path in (("--fog-ca", self.ca_file), ("--fog-auth-key", self.auth_key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"no such file: {path}", source=flag)

    def command(self, executable: str, node_config: Mapping[str, str], runtime_port: int,
                secret_file: Path) -> list[str]:
        """The ``flower-supernode`` command line (flwr 1.42): its tasks are taken by the warm executor
        (:mod:`hyprstream.agent.executor`), which authenticates with ``secret_file``."""
        cmd = [executable, "--superlink", self.address]
        cmd += ["--insecure"] if self.insecure else ["--root-certificates", str(self.ca_file)]
        if self.auth_key is not None:
            cmd += ["--auth-supernode-private-key", str(self.auth_key)]
        for key, value in node_config.items():
            if '"' in value or "\\" in value:
                raise ConfigError(f"node config {key}: quotes and backslashes are not allowed, got {value!r}")
        cmd += ["--node-config", " ".join(f'{k}="{v}"' for k, v in node_config.items())]
        cmd += ["--host", "127.0.0.1", "--port", str(runtime_port), "--isolation", "process",
                "--superexec-auth-secret-file", str(secret_file)]
        return cmd


@dataclass(frozen=True)
class OffloadLink:
    """The fog's inference offload endpoint (:mod:`hyprstream.fog.offload`), used in ``minimal``."""

    url: str  # https://HOST:PORT/v1/infer (http:// only on a trusted network)
    token_file: Path
    ca_file: Path | None = None

    def client(self):
        from hyprstream.agent.offload import OffloadClient
        from hyprstream.config import read_token

        return OffloadClient(self.url, read_token(str(self.token_file)), self.ca_file)


@dataclass(frozen=True)
class IngestConfig:
    """Ingestion sources: watched directories, HTTP on loopback, a Unix socket, MQTT topics."""

    watch: tuple[Path, ...] = ()
    listen_port: int | None = None  # HTTP on 127.0.0.1 (0: any free port)
    socket: Path | None = None
    topics: tuple[str, ...] = ()  # on the telemetry broker (--mqtt)


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``agent run`` was started with, checked once."""

    profile_path: Path
    profile: DeviceProfile
    fleet: str
    device_id: str
    store_dir: Path
    state_dir: Path
    task: str = "digits"
    fog: FogLink | None = None
    mqtt: BrokerConfig | None = None
    offload: OffloadLink | None = None
    ingest: IngestConfig = IngestConfig()
    store_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            check_topic_part("fleet", self.fleet)
        except HyprstreamError as exc:
            raise ConfigError(str(exc), source="--fleet") from None
        try:
            check_topic_part("device ID", self.device_id)
        except HyprstreamError as exc:
            raise ConfigError(str(exc), source="--device-id") from None
        if self.profile.store.encrypt_at_rest and self.store_key is None:
            raise ConfigError("store.encrypt_at_rest is true: give the store key with --store-key FILE or "
                              "$HYPRSTREAM_STORE_KEY", source=str(self.profile_path))
        if self.ingest.topics and self.mqtt is None:
            raise ConfigError("MQTT ingestion needs a broker (--mqtt)", source="--subscribe")

    @property
    def tick_s(self) -> float:
        return min(MAX_TICK_S, self.profile.telemetry.interval_s)


# ---------------------------------------------------------------------------------------------- SuperNode

_PR_SET_PDEATHSIG = 1
_libc = None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux), even by SIGKILL."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls it
    libc = _libc

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SuperNodeProcess:
    """A supervised ``flower-supernode`` child and its warm executor (:mod:`hyprstream.agent.executor`),
    which runs the SuperNode's ClientApp tasks: both restarted together, with backoff, when either exits."""

    def __init__(self, link: FogLink, *, node_config: Mapping[str, str], env: Mapping[str, str], log_path: Path,
                 clock: Callable[[], float] = time.monotonic, backoff_min_s: float = 2.0,
                 backoff_max_s: float = 60.0) -> None:
        self.link = link
        self.node_config = dict(node_config)
        self.env = dict(env)
        self.log_path = log_path
        self.secret_path = log_path.with_suffix(".secret")  # beside the log, the SuperNode's own
        self._clock = clock
        self._backoff_min, self._backoff_max = backoff_min_s, backoff_max_s
        self._backoff = backoff_min_s
        self._proc: subprocess.Popen | None = None
        self._executor: subprocess.Popen | None = None
        self._restart_at: float | None = None
        self.starts = 0
        try:
            self.executable = executable("flower-supernode")
        except HyprstreamError as exc:
            raise ConfigError(str(exc), source="--fog") from None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        port = self.link.runtime_port or _free_port()
        self.secret_path.unlink(missing_ok=True)
        write_private_file(self.secret_path, secrets.token_bytes(32))  # a new secret at every start
        cmd = self.link.command(self.executable, self.node_config, port, self.secret_path)
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=self.env, preexec_fn=_die_with_parent(os.getpid()))
            self._executor = subprocess.Popen(
                [sys.executable, "-m", "hyprstream.agent.executor", "--runtime-api-address", f"127.0.0.1:{port}",
                 "--secret-file", str(self.secret_path), "--parent-pid", str(self._proc.pid)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                preexec_fn=_die_with_parent(os.getpid()))
        self.starts += 1
        self._started_at = self._clock()
        log.info("SuperNode started (pid %d, executor pid %d) for fog %s; log: %s", self._proc.pid,
                 self._executor.pid, self.link.address, self.log_path)

    def poll(self) -> None:
        """Restart the SuperNode and its executor (after a backoff) if either exited."""
        now = self._clock()
        if self._proc is not None:
            code, executor_code = self._proc.poll(), self._executor.poll()
            if code is None and executor_code is None:
                if now - self._started_at > 60:
                    self._backoff = self._backoff_min  # ran a while: the next failure starts afresh
                return
            if code is not None:
                hint = " (this node is not registered with the fog)" if code == 305 else ""
                log.warning("SuperNode exited with code %d%s; restarting in %.0f s", code, hint, self._backoff)
            else:
                log.warning("the SuperNode's executor exited with code %d; restarting both in %.0f s",
                            executor_code, self._backoff)
            self.stop()
            self._restart_at = now + self._backoff
            self._backoff = min(self._backoff * 2, self._backoff_max)
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """The executor first (it ends the task it is running), then the SuperNode it talks to."""
        executor, supernode, self._executor, self._proc = self._executor, self._proc, None, None
        stop_process(executor, timeout_s)
        stop_process(supernode, timeout_s)


# ---------------------------------------------------------------------------------------------- the agent


class Agent:
    """The daemon's state and loop (see the module docstring)."""

    def __init__(self, config: AgentConfig, *, monitor: Monitor | None = None,
                 publisher: TelemetryPublisher | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.profile = config.profile
        self.session = secrets.token_hex(6)
        self._monitor = monitor
        self._publisher = publisher
        self._clock = clock
        self._seq = 0
        self._started = time.monotonic()
        self._export_thread: threading.Thread | None = None
        self._export_cancel = threading.Event()
        self._export_failed: set[int] = set()
        self.decision: Decision | None = None
        self.sample: ResourceSample | None = None
        self._budget_spent = False  # the last answer read from the privacy ledger (see privacy_state)
        self.last_tick: float | None = None  # wall time of the loop's last step (the health check reads it)
        self.supernode: SuperNodeProcess | None = None

    # .................................................................. run

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; then shut down cleanly (see the module docstring)."""
        from hyprstream.agent.inference import InferenceEngine
        from hyprstream.agent.pipeline import Pipeline, create_tables
        from hyprstream.learning.task import get_task
        from hyprstream.store import Store, StoreConfig

        cfg, prof = self.config, self.profile
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.task = get_task(cfg.task)
        store = Store.open(cfg.store_dir, create=True, key=cfg.store_key,
                           config=StoreConfig(segment_bytes=prof.store.segment_target_mb << 20))
        cleanups: list[Callable[[], None]] = [store.close]
        try:
            create_tables(store, self.task, prof.store)
            self.store = store
            monitor = self._monitor or ResourceMonitor(cfg.store_dir)
            if self._monitor is None:
                cleanups.append(monitor.close)
            self.policy = AdaptivePolicy(prof.policy, battery_powered=prof.resources.battery)
            self.engine = InferenceEngine(self.task, prof.inference, cuda_allowed=prof.resources.has_gpu,
                                          offload=self._offload_client(),
                                          key=cfg.store_key)
            cleanups.append(self.engine.close)
            self.pipeline = Pipeline(self.task, store, self.engine, clock=self._clock)
            publisher = self._publisher
            if publisher is None and cfg.mqtt is not None:
                publisher = MqttPublisher(cfg.mqtt, fleet=cfg.fleet, device_id=cfg.device_id, session=self.session,
                                          settings=prof.telemetry, clock=self._clock)
            if publisher is not None:
                publisher.start()
                cleanups.append(publisher.close)
            self._refresh_model()  # a model saved by an earlier run serves at once
            for source in self._sources():
                source.start()
                cleanups.append(source.stop)
            if cfg.fog is not None:
                supernode = self._supernode()
                supernode.start()
                cleanups.append(supernode.stop)
            else:
                supernode = None
            self.supernode = supernode
            cleanups.append(self._stop_export)
            log.info("agent %s/%s running (profile %s, task %s, session %s)", cfg.fleet, cfg.device_id,
                     prof.device_class, self.task.name, self.session)
            self._loop(stop, monitor, publisher, supernode)
        finally:
            for cleanup in reversed(cleanups):
                try:
                    cleanup()
                except Exception as exc:  # keep shutting down the rest
                    log.warning("shutdown step %s failed: %s", getattr(cleanup, "__qualname__", cleanup), exc)
            log.info("agent stopped")

    def _offload_client(self):
        """The fog's offload client for ``minimal`` inference: None without ``--offload``, and None when the
        profile's ``[privacy.floor] allow_offload = false`` keeps raw rows on the device (minimal inference
        then runs on the local model, or is skipped while there is none)."""
        cfg = self.config
        if cfg.offload is None:
            return None
        if not self.profile.privacy.floor.allow_offload:
            log.warning("not offloading inference to %s: the profile's [privacy.floor] allow_offload = false "
                        "keeps raw rows on the device (minimal inference runs on the local model)", cfg.offload.url)
            return None
        return cfg.offload.client()

    def _loop(self, stop: threading.Event, monitor: Monitor, publisher, supernode) -> None:
        next_telemetry = 0.0
        while not stop.is_set():
            now = self._clock()
            self.tick(monitor)
            if supernode is not None:
                supernode.poll()
            if publisher is not None and now >= next_telemetry:
                publisher.publish(self.telemetry(now))
                next_telemetry = now + self.profile.telemetry.interval_s
            stop.wait(self.config.tick_s)

    def tick(self, monitor: Monitor) -> Decision:
        """One monitor/policy step (also used by tests): decide, hand off, re-plan inference, refresh the model."""
        prof = self.profile
        sample = monitor.sample()
        decision = self.policy.observe(sample)
        if decision.changed:
            log.info("strategy %s -> %s: %s", decision.previous.value, decision.strategy.value, decision.reason)
        elif decision.held:
            log.debug("strategy stays %s: %s", decision.strategy.value, decision.reason)
        self.sample, self.decision = sample, decision
        self.last_tick = time.time()
        gpu_usable = prof.resources.has_gpu and prof.training.allow_gpu
        write_policy(self.config.state_dir, PolicyState(
            decision.strategy, self._clock(), valid_s=3 * self.config.tick_s + 30, gpu_usable=gpu_usable,
            reason=decision.reason, profile=str(self.config.profile_path.resolve())))
        self.engine.apply(plan_inference(decision.strategy, prof.inference, cuda_usable=prof.resources.has_gpu,
                                         offload=self.engine.offload is not None))
        self._refresh_model()
        return decision

    # .................................................................. telemetry

    def telemetry(self, now: float) -> Telemetry:
        prof, d, s = self.profile, self.decision, self.sample
        self._seq += 1
        plan = plan_inference(d.strategy, prof.inference, cuda_usable=prof.resources.has_gpu)
        es = self.engine.stats()
        records, rejected = self.pipeline.stats()
        return Telemetry(
            fleet=self.config.fleet, device_id=self.config.device_id, device_class=prof.device_class,
            session=self.session, seq=self._seq, time=now, uptime_s=round(time.monotonic() - self._started, 3),
            resources=s,
            strategy=StrategyState(d.strategy, self.policy.since, d.reason, d.strategy is not Strategy.MINIMAL,
                                   es.provider or plan.provider, es.variant or plan.variant),
            model=ModelState(self.task.name, es.version),
            privacy=self.privacy_state(),
            inference=InferenceStats(es.requests, es.batches, es.errors),
            ingest=IngestStats(records, rejected),
        )

    def privacy_state(self) -> PrivacyState:
        """Whether the device's sample-level budget is spent: whether, by its privacy ledger (the ClientApp
        charges it), it could not pay even for the cheapest round, one DP-SGD step at batch size 1 over its
        data (for the task's unit of privacy). The epsilon spent stays on the device (it is a function of
        the data size, through the sampling rate). Without ``[privacy.dpsgd]`` nothing spends it, and the
        profile's budget is reported."""
        from hyprstream.privacy.dpsgd import epsilon_floor
        from hyprstream.privacy.ledger import PrivacyLedger, Scope
        from hyprstream.store import Store

        prof = self.profile
        settings = prof.dpsgd()
        if settings is None:
            return PrivacyState(False, prof.training.privacy_epsilon, prof.training.privacy_delta)
        ledger = prof.privacy.ledger_dir(self.config.store_dir.resolve())  # as the SuperNode's node config names it
        table = self.task.table
        rows = self.store.num_rows(table) if table in self.store.tables() else 0
        try:
            if rows and ledger.exists():
                with Store.open(ledger, readonly=True) as store:
                    cheapest = settings.event(rows, 1, 1, group=self.task.examples_per_record)
                    # a group's event can be over the budget alone: then no PLD of its tiny multiplier
                    floor = epsilon_floor(cheapest, settings.budget.delta)
                    would_be = floor if floor > settings.budget.epsilon else PrivacyLedger(store).would_spend(
                        Scope.DEVICE, self.config.device_id, cheapest, settings.budget.delta)
                self._budget_spent = would_be > settings.budget.epsilon
        except HyprstreamError as exc:  # e.g. the ledger is being created: report the last value read
            log.warning("cannot read the privacy ledger %s: %s", ledger, exc)
        return PrivacyState(self._budget_spent, settings.budget.epsilon, settings.budget.delta)

    def health(self) -> dict:
        d = self.decision
        return {"status": "ok", "fleet": self.config.fleet, "device_id": self.config.device_id,
                "task": self.task.name, "strategy": d.strategy.value if d else None,
                "model_version": self.engine.version}

    # .................................................................. parts

    def _sources(self) -> list:
        from hyprstream.agent.ingest import DirectoryWatcher, HttpSource, MqttSource, UnixSocketSource, ingest_token

        from hyprstream.agent.metrics import AgentMetrics

        ing, sink = self.config.ingest, self.pipeline
        sources: list = [DirectoryWatcher(d, sink) for d in ing.watch]
        metrics = AgentMetrics(self)  # /metrics and /healthz beside the record API
        served = dict(health=self.health, metrics=metrics.registry, check=metrics.health)
        if ing.listen_port is not None:
            token = ingest_token(self.config.state_dir)  # apps on the device read it from there
            sources.append(HttpSource(sink, token=token, port=ing.listen_port, **served))
        if ing.socket is not None:
            sources.append(UnixSocketSource(ing.socket, sink, **served))
        if ing.topics:
            sources.append(MqttSource(self.config.mqtt, ing.topics, sink,
                                      client_id=f"hyprstream-{self.config.fleet}-{self.config.device_id}-ingest"))
        self.sources = sources
        return sources

    def _supernode(self) -> SuperNodeProcess:
        cfg, prof = self.config, self.profile
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(cfg.state_dir / "flwr"),
               "HYPRSTREAM_TORCH_THREADS": str(max(1, min(prof.resources.cpu_cores, os.cpu_count() or 1) - 1))}
        if cfg.store_key is not None:
            env["HYPRSTREAM_STORE_KEY"] = cfg.store_key.hex()
        node_config = {"store-dir": str(cfg.store_dir.resolve()), "state-dir": str(cfg.state_dir.resolve()),
                       "device-id": cfg.device_id}
        return SuperNodeProcess(cfg.fog, node_config=node_config, env=env, log_path=cfg.state_dir / "supernode.log",
                                backoff_max_s=prof.telemetry.reconnect_backoff_max_s)

    def _refresh_model(self) -> None:
        """Start exporting the newest saved global model if it is newer than the one served."""
        if self._export_thread is not None and self._export_thread.is_alive():
            return
        found = latest_model(self.config.state_dir, self.task.name)
        if found is None:
            return
        version, path = found
        current = self.engine.version
        if (current is not None and version <= current) or version in self._export_failed:
            return
        out = self.config.state_dir / "onnx" / self.task.name / f"v{version}"
        self._export_thread = threading.Thread(target=self._export, args=(version, path, out),
                                               name="hyprstream-export", daemon=True)
        self._export_thread.start()

    def _calibration(self) -> np.ndarray | None:
        """Recent stored inputs for static int8 calibration (None when the store has too few); asked
        for by the export only when it quantizes statically, and handed over in memory."""
        table = self.store.read(self.task.table)
        if table.num_rows < 16:
            return None
        return self.task.features(table.slice(max(0, table.num_rows - CALIBRATION_ROWS)))

    def _export(self, version: int, weights: Path, out: Path) -> None:
        from hyprstream.agent.export import export_in_subprocess, read_manifest
        from hyprstream.agent.handoff import read_private

        try:
            read_private(weights, self.config.store_key)
            try:
                files = read_manifest(out)  # exported by an earlier run
            except HyprstreamError:
                files = export_in_subprocess(self.task.name, version, weights, out, calibration=self._calibration,
                                             key=self.config.store_key,
                                             threads=max(1, self.profile.inference.intra_op_threads or 1),
                                             cancel=self._export_cancel)
            self.engine.load(files)
        except StoreError as exc:  # changed, or sealed under a key since rotated: the next round brings it again
            log.error("model v%d refused and removed: %s", version, exc)
            weights.unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)
            return
        except HyprstreamError as exc:
            if not self._export_cancel.is_set():
                self._export_failed.add(version)
                log.error("model v%d cannot serve inference: %s", version, exc)
            return
        prune_models(self.config.state_dir, self.task.name, keep=2)
        onnx_root = self.config.state_dir / "onnx" / self.task.name
        for old in onnx_root.iterdir():
            if old.name.startswith("v") and old.name[1:].isdigit() and int(old.name[1:]) < version:
                shutil.rmtree(old, ignore_errors=True)

    def _stop_export(self) -> None:
        self._export_cancel.set()
        if self._export_thread is not None:
            self._export_thread.join(15)
