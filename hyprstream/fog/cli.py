"""``hyprstream fog run --config fog.toml``."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any


def cmd_run(args: argparse.Namespace) -> int:
    from hyprstream.config import check_files
    from hyprstream.fog.config import load_fog_config
    from hyprstream.fog.service import FogService

    cfg = load_fog_config(args.config)
    check_files(cfg, source=str(args.config))
    service = FogService(cfg, args.config)

    def terminate(signum, frame) -> None:
        # Waiting for a child here, while the main thread waits for it too, cannot finish (Python's
        # wait lock): end the run, and let the main thread's ``finally`` stop the rest.
        if service.run is not None and service.run.poll() is None:
            service.run.send_signal(signal.SIGTERM)
        else:
            raise SystemExit(0)

    previous = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.start()
        print(f"fog {cfg.name}: SuperLink on {service.address} (Fleet API only; Control and ServerAppIo APIs on "
              f"127.0.0.1:{service.local_port}); state in {service.state}", flush=True)
        code = service.wait()
    finally:
        service.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if code in (0, -signal.SIGTERM) else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    fog = subparsers.add_parser("fog", help="run a fog aggregator",
                                description="The fog tier: a Flower SuperLink for its agents and the fog's "
                                            "round loop (pull from core, train, aggregate, push).")
    sub = fog.add_subparsers(dest="fog_command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="start the SuperLink and the fog's ServerApp",
                       description="Start a Flower SuperLink (TLS and SuperNode authentication when "
                                   "configured) and run the fog's rounds until max_rounds or SIGTERM.")
    p.add_argument("--config", type=Path, required=True, help="fog TOML file (kind = \"fog\")")
    p.set_defaults(func=cmd_run)
    return fog
