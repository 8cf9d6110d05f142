"""``hyprstream agent ...``: the edge agent's commands (also ``hyprstream-agent ...``).

``agent run`` is the daemon (:mod:`hyprstream.agent.daemon`); ``agent trace`` records this machine's
resources into a trace file and shows what the policy would decide.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from hyprstream.errors import ConfigError

__all__ = ["add_parser"]

DEFAULT_STORE = Path("/var/lib/hyprstream/agent/store")
DEFAULT_PORT = 9467  # the record API with /metrics, /healthz, /readyz on 127.0.0.1, unless --socket or --no-listen
MQTT_PASSWORD_ENV = "HYPRSTREAM_MQTT_PASSWORD"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``agent`` and its subcommands on the main CLI's subparsers."""
    p = subparsers.add_parser("agent", help="run the edge agent on a device",
                              description="The edge agent: local store, ingestion, inference, resource policy, "
                                          "MQTT telemetry and a Flower SuperNode to the fog.")
    sub = p.add_subparsers(dest="agent_command", required=True, metavar="SUBCOMMAND")

    r = sub.add_parser(
        "run", help="run the agent daemon",
        description="Run the agent until SIGTERM or SIGINT, then shut down cleanly (retained 'offline' status, "
                    "SuperNode stopped, store closed). Ingestion: --watch, --listen, --socket, --subscribe.",
        epilog=f"The MQTT password, if any, is read from ${MQTT_PASSWORD_ENV}; the store key from --store-key "
               "or $HYPRSTREAM_STORE_KEY.")
    r.add_argument("--config", required=True, type=Path, metavar="PATH",
                   help="device profile (firmware-configs/<device>.toml)")
    r.add_argument("--fog", metavar="HOST:PORT", help="the fog's Flower SuperLink (starts a SuperNode)")
    r.add_argument("--fog-ca", type=Path, metavar="PEM", help="CA certificate of the SuperLink (TLS)")
    r.add_argument("--fog-insecure", action="store_true", help="no TLS to the SuperLink (trusted networks only)")
    r.add_argument("--fog-auth-key", type=Path, metavar="KEY",
                   help="this node's private key for SuperNode authentication")
    r.add_argument("--supernode-port", type=int, metavar="PORT",
                   help="local port of the SuperNode's Runtime API (default: a free loopback port)")
    r.add_argument("--offload", metavar="URL",
                   help="the fog's inference offload endpoint (https://HOST:PORT/v1/infer), used in the minimal "
                        "strategy")
    r.add_argument("--offload-token", type=Path, metavar="FILE", help="bearer token file for --offload")
    r.add_argument("--offload-ca", type=Path, metavar="PEM", help="CA certificate of the offload endpoint (https)")
    r.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker for telemetry (and --subscribe)")
    r.add_argument("--mqtt-ca", type=Path, metavar="PEM", help="CA certificate of the broker (turns TLS on)")
    r.add_argument("--mqtt-cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    r.add_argument("--mqtt-key", type=Path, metavar="PEM", help="client certificate's key")
    r.add_argument("--mqtt-user", metavar="NAME", help=f"MQTT user name (password from ${MQTT_PASSWORD_ENV})")
    r.add_argument("--fleet", default="default", help="fleet name in the MQTT topics (default: %(default)s)")
    r.add_argument("--device-id", help="device ID in the MQTT topics (default: the host name)")
    r.add_argument("--store", type=Path, default=DEFAULT_STORE, metavar="DIR",
                   help="the device's local store (default: %(default)s)")
    r.add_argument("--state", type=Path, metavar="DIR", help="agent state: policy hand-off, models, SuperNode log "
                                                             "(default: <store>.state)")
    r.add_argument("--store-key", type=Path, metavar="FILE", help="store encryption key file")
    r.add_argument("--task", default="digits", help="task plugin (default: %(default)s)")
    r.add_argument("--watch", type=Path, action="append", default=[], metavar="DIR",
                   help="take record files dropped into DIR (repeatable)")
    r.add_argument("--listen", type=int, metavar="PORT",
                   help=f"HTTP record endpoint with /metrics and /healthz on 127.0.0.1:PORT (default: {DEFAULT_PORT} "
                        "unless --socket is given; 0: any free port)")
    r.add_argument("--no-listen", action="store_true", help="no HTTP endpoint on loopback")
    r.add_argument("--socket", type=Path, metavar="PATH", help="HTTP record endpoint on a Unix socket")
    r.add_argument("--subscribe", action="append", default=[], metavar="TOPIC",
                   help="take JSON records from an MQTT topic on --mqtt (repeatable)")
    r.add_argument("--log-level", choices=("debug", "info", "warning"),
                   help="log level of the agent (default: info, or what hyprstream -v asks for)")
    r.set_defaults(func=_cmd_run)

    t = sub.add_parser("trace", help="record this machine's resources and the policy's decisions",
                       description="Sample the resources every --interval seconds, write them as a trace CSV "
                                   "(replayable in policy tests) and print the strategy the profile's policy picks.")
    t.add_argument("--config", required=True, type=Path, metavar="PATH", help="device profile")
    t.add_argument("--out", required=True, type=Path, metavar="CSV")
    t.add_argument("--samples", type=int, default=12)
    t.add_argument("--interval", type=float, default=5.0, metavar="SECONDS")
    t.set_defaults(func=_cmd_trace)
    return p


def default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._") or "device"
    return name[:128]


def build_config(args: argparse.Namespace):
    """The checked :class:`~hyprstream.agent.daemon.AgentConfig` of ``agent run``'s arguments."""
    from hyprstream.agent.daemon import AgentConfig, FogLink, IngestConfig, OffloadLink
    from hyprstream.agent.profile import load_profile
    from hyprstream.agent.publisher import parse_broker
    from hyprstream.learning.task import task_names
    from hyprstream.store import load_key

    profile = load_profile(args.config)
    if args.task not in task_names():
        raise ConfigError(f"unknown task {args.task!r} (known: {', '.join(task_names())})", source="--task")
    fog = None
    if args.fog:
        fog = FogLink(args.fog, ca_file=args.fog_ca, insecure=args.fog_insecure, auth_key=args.fog_auth_key,
                      runtime_port=args.supernode_port)
    elif args.fog_ca or args.fog_insecure or args.fog_auth_key:
        raise ConfigError("--fog-ca, --fog-insecure and --fog-auth-key need --fog", source="--fog")
    mqtt = None
    if args.mqtt:
        mqtt = parse_broker(args.mqtt, ca_file=args.mqtt_ca, cert_file=args.mqtt_cert, key_file=args.mqtt_key,
                            username=args.mqtt_user,
                            password=os.environ.get(MQTT_PASSWORD_ENV) if args.mqtt_user else None)
    offload = None
    if args.offload:
        if args.offload_token is None:
            raise ConfigError("--offload needs --offload-token FILE", source="--offload")
        offload = OffloadLink(args.offload, args.offload_token, args.offload_ca)
        offload.client()  # checks the URL, the token file and the CA now, not at the first request
    elif args.offload_token or args.offload_ca:
        raise ConfigError("--offload-token and --offload-ca need --offload", source="--offload")
    if args.listen is not None and not 0 <= args.listen < 65536:
        raise ConfigError(f"must be a port in 0..65535, got {args.listen}", source="--listen")
    if args.no_listen and args.listen is not None:
        raise ConfigError("--listen and --no-listen exclude each other", source="--no-listen")
    listen = args.listen
    if listen is None and args.socket is None and not args.no_listen:
        listen = DEFAULT_PORT
    store = args.store
    state = args.state or store.with_name(store.name + ".state")
    key = load_key(args.store_key) if profile.store.encrypt_at_rest else None
    return AgentConfig(
        profile_path=args.config, profile=profile, fleet=args.fleet, device_id=args.device_id or default_device_id(),
        store_dir=store, state_dir=state, task=args.task, fog=fog, mqtt=mqtt, offload=offload,
        ingest=IngestConfig(tuple(args.watch), listen, args.socket, tuple(args.subscribe)), store_key=key)


def _cmd_run(args: argparse.Namespace) -> int:
    from hyprstream.agent.daemon import Agent

    agent_log = logging.getLogger("hyprstream")
    if args.log_level is not None:
        agent_log.setLevel(args.log_level.upper())
    elif agent_log.getEffectiveLevel() > logging.INFO:  # a daemon says what it decides
        agent_log.setLevel(logging.INFO)
    config = build_config(args)
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        logging.getLogger("hyprstream.agent").info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        Agent(config).run(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from hyprstream.agent.monitor import ResourceMonitor, write_trace
    from hyprstream.agent.policy import AdaptivePolicy
    from hyprstream.agent.profile import load_profile

    if args.samples < 1 or args.interval <= 0:
        raise ConfigError("--samples must be >= 1 and --interval > 0")
    profile = load_profile(args.config)
    policy = AdaptivePolicy(profile.policy, battery_powered=profile.resources.battery)
    monitor = ResourceMonitor("/")
    samples = []
    try:
        for i in range(args.samples):
            time.sleep(args.interval)
            s = monitor.sample()
            d = policy.observe(s)
            samples.append(s)
            gpu = f" gpu {s.gpu.util_percent:.0f}%" if s.gpu else ""
            print(f"{i + 1:4d} cpu {s.cpu_percent:5.1f}% mem {s.memory_percent:5.1f}%{gpu} -> "
                  f"{d.strategy.value:8s} {d.reason}", flush=True)
    finally:
        monitor.close()
        write_trace(args.out, samples)
    print(f"wrote {len(samples)} sample(s) to {args.out}", file=sys.stderr)
    return 0
