"""``hyprstream dashboard``: the fleet dashboard's command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from hyprstream.errors import ConfigError

MQTT_PASSWORD_ENV = "HYPRSTREAM_MQTT_PASSWORD"
DEFAULT_LISTEN = "127.0.0.1:9470"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "dashboard", help="serve the fleet dashboard (a web page over core and the fleets' telemetry)",
        description="Serve one web page over a running federation: devices (strategy, battery, online, last seen, "
                    "privacy budget) from the fleets' MQTT telemetry; versions over time (accuracy, participants, "
                    "bytes), per-layer clocks and staleness, and the audit log's tail with its verification, from "
                    "core. Viewers sign in with their own core token (role reader, auditor or admin); the "
                    "dashboard asks core with it, so the role decides what the page shows.")
    p.add_argument("--core", required=True, metavar="LOCATION", help="core's Flight location (grpc+tls://HOST:PORT)")
    p.add_argument("--ca", type=Path, metavar="PEM", help="CA certificate of core's TLS certificate")
    p.add_argument("--cert", type=Path, metavar="PEM", help="client certificate for core (with tls.client_ca)")
    p.add_argument("--key", type=Path, metavar="PEM", help="the client certificate's key")
    p.add_argument("--audit-key", type=Path, metavar="PUB",
                   help="core's audit public key (audit-signing.pub): the log verifies only if core signed it "
                        "(without: against the key the log's first entry names)")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker of the fleets' telemetry")
    p.add_argument("--mqtt-ca", type=Path, metavar="PEM", help="CA certificate of the broker (turns TLS on)")
    p.add_argument("--mqtt-user", metavar="NAME", help=f"MQTT user name (password from ${MQTT_PASSWORD_ENV})")
    p.add_argument("--fleet", action="append", default=[], metavar="NAME", help="a fleet to show (repeatable)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help="where the page is served (default: %(default)s; another host than loopback needs "
                        "--tls-cert and --tls-key)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="HTTPS certificate of the page")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="its key")
    p.set_defaults(func=run)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what}: {exc}", source=str(path)) from None


def run(args: argparse.Namespace) -> int:
    from hyprstream.core import signing
    from hyprstream.dashboard.server import Dashboard, DashboardServer
    from hyprstream.fog.fleet import FleetView
    from hyprstream.observe import split_listen
    from hyprstream.telemetry.broker import parse_broker

    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together", source="dashboard")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", source="dashboard")
    if args.fleet and not args.mqtt:
        raise ConfigError("--fleet needs --mqtt (the broker of the fleets' telemetry)", source="dashboard")
    client = {k: v for k, v in (("tls_root_certs", _read(args.ca, "CA certificate")),
                                ("cert_chain", _read(args.cert, "client certificate")),
                                ("private_key", _read(args.key, "client key"))) if v is not None}
    audit_key = None
    if args.audit_key is not None:
        try:
            audit_key = signing.load_public_key(args.audit_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the audit public key: {exc}", source=str(args.audit_key)) from None
    fleets = []
    if args.fleet:
        broker = parse_broker(args.mqtt, ca_file=args.mqtt_ca, username=args.mqtt_user,
                              password=os.environ.get(MQTT_PASSWORD_ENV) if args.mqtt_user else None)
        fleets = [FleetView(name, broker, client_id=f"hyprstream-dashboard-{name}-{os.getpid()}").start()
                  for name in args.fleet]
    host, port = split_listen(args.listen)
    server = DashboardServer(Dashboard(args.core, fleets=fleets, audit_key=audit_key, client_kwargs=client), host,
                             port, tls=(str(args.tls_cert), str(args.tls_key)) if args.tls_cert else None).start()
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    print(f"hyprstream dashboard: serving on {server.url} (sign in with a core token, or open "
          f"{server.url}#token=<token>)", flush=True)
    try:
        while not stop.wait(0.5):
            continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.stop()
        for fleet in fleets:
            fleet.close()
    print("hyprstream dashboard: stopped", file=sys.stderr, flush=True)
    return 0
