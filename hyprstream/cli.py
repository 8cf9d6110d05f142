"""The ``hyprstream`` command line. Errors are one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hyprstream import __version__
from hyprstream.errors import ConfigError, HyprstreamError
from hyprstream.runtime import LOG_FORMAT, LOG_FORMAT_ENV, log_formatter

DEFAULT_EXPERIMENT = "quickstart"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format is not None:
        os.environ[LOG_FORMAT_ENV] = args.log_format  # the fog's ServerApp, the agent's SuperNode tasks: the same
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"hyprstream: config error: {exc}", file=sys.stderr)
        return 2
    except HyprstreamError as exc:
        print(f"hyprstream: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hyprstream: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyprstream",
        description="Federated edge/fog learning: device agents, fog aggregators, a versioned core.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="log lines as text (default) or as JSON objects with the round, model version and "
                             "fog / device as fields, for machines (also HYPRSTREAM_LOG_FORMAT; inherited by "
                             "the processes a command starts)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("version", help="print the version", description="Print Hyprstream's version.")
    p.set_defaults(func=_cmd_version)

    p = sub.add_parser("config", help="work with configuration files",
                       description="Validate Hyprstream TOML files (device profiles, experiments).")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    v = csub.add_parser("validate", help="validate TOML files",
                        description="Parse and validate each file by its top-level 'kind' "
                                    "(device, experiment, fog, core), and load every key, certificate and token "
                                    "file it names. Prints one line per file; exits 2 if any is invalid.")
    v.add_argument("files", nargs="+", type=Path, metavar="FILE")
    v.set_defaults(func=_cmd_config_validate)

    from hyprstream.agent.cli import add_parser as add_agent_parser
    from hyprstream.core.cli import add_parser as add_core_parser
    from hyprstream.dashboard.cli import add_parser as add_dashboard_parser
    from hyprstream.fog.cli import add_parser as add_fog_parser
    from hyprstream.store.cli import add_parser as add_store_parser

    add_agent_parser(sub)
    add_core_parser(sub)
    add_dashboard_parser(sub)
    add_fog_parser(sub)
    add_store_parser(sub)

    p = sub.add_parser("deploy", help="stand up a local federation to try Hyprstream",
                       description="Deployments made for you. 'deploy poc' starts a whole federation on this host "
                                   "(CA and certificates, tokens, core, N fogs, M agents per fog with their data, "
                                   "mosquitto; TLS and authentication on every link), prints where each piece "
                                   "listens and how to watch it, and returns; 'deploy poc --stop' stops it.")
    dsub = p.add_subparsers(dest="deploy_command", required=True, metavar="SUBCOMMAND")
    poc = dsub.add_parser("poc", help="a proof-of-concept federation on this host",
                          description="Start (or with --stop, stop) a federation on 127.0.0.1 under --dir: core, "
                                      "--fogs fogs and --agents agents per fog training the digits model. Needs "
                                      "mosquitto, mosquitto_passwd and ssh-keygen.")
    poc.add_argument("--dir", type=Path, default=Path("hyprstream-poc"), help="where its files go (default: %(default)s)")
    poc.add_argument("--fogs", type=int, default=2, help="fogs (default: %(default)s)")
    poc.add_argument("--agents", type=int, default=3, help="agents per fog (default: %(default)s)")
    poc.add_argument("--local-steps", type=int, default=15, help="local steps per round (default: %(default)s)")
    poc.add_argument("--stop", action="store_true", help="stop the federation under --dir")
    poc.set_defaults(func=_cmd_deploy_poc)

    p = sub.add_parser("simulate", help="run a simulated fleet experiment, or compare two runs",
                       description="Run an experiment on Flower's simulation engine with a real core Flight "
                                   "server and fog loops in this process. Writes metrics.parquet, report.md "
                                   "and plots into --out. 'hyprstream simulate compare RUN_A RUN_B' puts two "
                                   "finished runs side by side. 'hyprstream simulate trace FILE' writes a "
                                   "synthetic availability trace ([fleet] availability_trace) as Parquet or CSV.",
                       usage="hyprstream simulate [EXPERIMENT] [options]\n"
                             "       hyprstream simulate compare RUN_A RUN_B [--out DIR]\n"
                             "       hyprstream simulate trace FILE --devices N [--duration-s S] "
                             "[--mean-online-s S] [--mean-offline-s S] [--seed N]")
    p.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT,
                   help="experiment TOML file, or the name of one in simulations/ (default: %(default)s)")
    p.add_argument("runs", nargs="*", metavar="RUN", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true",
                   help="reduced size for smoke runs: at most 2 global steps, 3 agents per fog, 10 local steps")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/<timestamp>)")
    p.add_argument("--global-steps", type=int, default=None, help="override training.global_steps")
    p.add_argument("--quiet", action="store_true", help="no progress display or per-step table")
    p.add_argument("--baseline", choices=["flat", "central"], default=None,
                   help="run the experiment as a baseline instead: 'flat' is Flower's FedAvg over the same "
                        "agents, data, model and seed, every layer in fp32, no fogs and no core; 'central' "
                        "trains the same model on all the agents' data in one place")
    trace = p.add_argument_group("simulate trace FILE (a synthetic availability trace)")
    trace.add_argument("--devices", type=int, default=None, help="devices in the trace (the fleet's agents)")
    trace.add_argument("--duration-s", type=float, default=86400.0, help="simulated seconds covered (default 1 day)")
    trace.add_argument("--mean-online-s", type=float, default=3600.0, help="mean online session (default 1 h)")
    trace.add_argument("--mean-offline-s", type=float, default=1800.0, help="mean offline gap (default 30 min)")
    trace.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_simulate)
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(log_formatter())
    # Flower's logger has its own handler and propagates to root: keep one copy, at our level.
    flwr = logging.getLogger("flwr")
    flwr.setLevel(logging.ERROR if verbose == 0 else level)
    flwr.propagate = False


def _cmd_deploy_poc(args: argparse.Namespace) -> int:
    from hyprstream import poc

    root = args.dir.resolve()
    if args.stop:
        stopped = poc.stop(root)
        print(f"hyprstream poc: stopped {len(stopped)} process(es): {', '.join(stopped) or 'none was running'}")
        return 0
    federation = poc.Poc(root, fogs=args.fogs, agents=args.agents, local_steps=args.local_steps)
    try:
        endpoints = federation.up()
    except BaseException:
        if (root / poc.STATE).exists():
            poc.stop(root)  # nothing half-started is left running
        raise
    print(poc.summary(root, endpoints))
    return 0


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"hyprstream {__version__}")
    return 0


def _cmd_config_validate(args: argparse.Namespace) -> int:
    from hyprstream.config import check_files, read_toml

    loaders = _config_loaders()
    bad = 0
    for path in args.files:
        try:
            kind = read_toml(path).get("kind")
            if kind not in loaders:
                raise ConfigError(f"must be one of {', '.join(map(repr, loaders))}, got {kind!r}",
                                  source=str(path), key="kind")
            check_files(loaders[kind](path), source=str(path))
            print(f"ok      {path} ({kind})")
        except ConfigError as exc:
            bad += 1
            print(f"invalid {exc}", file=sys.stderr)
    return 2 if bad else 0


def _config_loaders():
    from hyprstream.agent.profile import load_profile
    from hyprstream.core.config import load_core_config
    from hyprstream.fog.config import load_fog_config
    from hyprstream.sim.experiment import load_experiment

    return {"device": load_profile, "experiment": load_experiment, "fog": load_fog_config,
            "core": load_core_config}


def resolve_experiment(name: str) -> Path:
    """A path as given, else ``simulations/<name>.toml`` under the working directory or the source tree."""
    candidates = [Path(name)]
    if not name.endswith(".toml"):
        candidates += [Path("simulations") / f"{name}.toml",
                       Path(__file__).resolve().parents[1] / "simulations" / f"{name}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"experiment {name!r} not found (looked for {', '.join(map(str, candidates))})")


def _write_trace(args: argparse.Namespace) -> int:
    from hyprstream.sim import traces

    if len(args.runs) != 1 or args.devices is None:
        raise ConfigError("usage: hyprstream simulate trace FILE --devices N", source="simulate trace")
    try:
        table = traces.synthetic(args.devices, args.duration_s, mean_online_s=args.mean_online_s,
                                 mean_offline_s=args.mean_offline_s, seed=args.seed)
        path = traces.write(table, Path(args.runs[0]))
    except ValueError as exc:
        raise ConfigError(str(exc), source="simulate trace") from None
    trace = traces.AvailabilityTrace.from_table(table, args.devices, period_s=args.duration_s)
    share = trace.fraction_online()
    print(f"wrote {path}: {table.num_rows} online intervals of {args.devices} devices over {args.duration_s:g} s; "
          f"online {share.mean():.1%} of the time on average ({share.min():.1%} to {share.max():.1%})")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    import dataclasses

    from hyprstream.sim.experiment import load_experiment, reduced

    if args.experiment == "compare":
        from hyprstream.sim.compare import compare_runs

        if len(args.runs) != 2:
            raise ConfigError("usage: hyprstream simulate compare RUN_A RUN_B", source="simulate compare")
        print(compare_runs(Path(args.runs[0]), Path(args.runs[1]), out=args.out))
        return 0
    if args.experiment == "trace":
        return _write_trace(args)
    if args.runs:
        raise ConfigError(f"unexpected arguments {args.runs}", source="simulate")
    path = resolve_experiment(args.experiment)
    exp = load_experiment(path)
    if args.quick:
        exp = reduced(exp)
    if args.global_steps is not None:
        if args.global_steps < 1:
            raise ConfigError("must be >= 1", source="--global-steps")
        exp = dataclasses.replace(exp, training=dataclasses.replace(exp.training, global_steps=args.global_steps))
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    from hyprstream.sim.console import run_with_console

    run_with_console(exp, out, source=path, quiet=args.quiet, baseline=args.baseline)
    return 0


def agent_main(argv: Sequence[str] | None = None) -> int:
    """``hyprstream-agent ARGS`` is ``hyprstream agent ARGS``."""
    return main(["agent", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
