"""Command line of core: ``core run|versions|pull``, ``audit verify|report``, ``certs init``, ``token create|revoke``.

:func:`add_parser` registers them on the ``hyprstream`` parser. Handlers take the parsed
``argparse.Namespace`` and return an exit code; errors are raised as HyprstreamError subclasses
(the main CLI prints them as one line).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import sys
import time
from pathlib import Path

from hyprstream.errors import ConfigError, ValidationError

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 3600, 90m, 24h or 30d, got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _when(text: str) -> dt.datetime:
    from hyprstream.core.audit import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 date or date-time, got {text!r}") from None


def _core_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--core", required=True, metavar="LOCATION",
                   help="core's Flight location, e.g. grpc+tls://core.example.org:8815")
    p.add_argument("--ca", type=Path, default=None, metavar="PEM",
                   help="the CA certificate core's TLS certificate comes from (the deployment's ca.pem)")
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help=f"a file holding the bearer token (default: the {TOKEN_ENV} environment variable)")


TOKEN_ENV = "HYPRSTREAM_TOKEN"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``core``, ``audit``, ``certs`` and ``token`` on the ``hyprstream`` parser."""
    p = subparsers.add_parser("core", help="run the core service",
                              description="Core: versioned master weights over Arrow Flight, with vector clocks, "
                                          "consistency modes, a signed audit log and role-based access.")
    sub = p.add_subparsers(dest="core_command", required=True, metavar="SUBCOMMAND")
    r = sub.add_parser("run", help="serve core's Flight API",
                       description="Start core from a core.toml (kind = \"core\"): open the audit log, recover "
                                   "the repository, serve until SIGTERM/SIGINT. Prints 'hyprstream core: "
                                   "serving on <location>' when ready.")
    r.add_argument("--config", required=True, type=Path, metavar="CORE_TOML", help="the core.toml to run")
    r.set_defaults(func=cmd_core_run)
    ls = sub.add_parser("versions", help="list a model's versions at a running core",
                        description="The lineage of MODEL: each version with when it was committed, the fog and "
                                    "push that made it, the layer groups it changed, participants, the weight core "
                                    "applied (mixing and staleness), the update's norm and the privacy its round "
                                    "spent. Needs a token of role reader (or fog, admin).")
    ls.add_argument("model", metavar="MODEL")
    ls.add_argument("--format", choices=("table", "json"), default="table", help="default: %(default)s")
    _core_client_args(ls)
    ls.set_defaults(func=cmd_core_versions)
    pl = sub.add_parser("pull", help="write one version of a model to a file",
                        description="Fetch a version of MODEL (default: the current one) from a running core and "
                                    "write it to --out: the layer table as an Arrow IPC file (the model, version "
                                    "and layer clocks in its schema metadata), or with --onnx TASK the task's "
                                    "model with these weights as ONNX. Needs a token of role reader (or fog, "
                                    "admin).")
    pl.add_argument("model", metavar="MODEL")
    pl.add_argument("--version", type=int, default=None, help="the version (default: the current one)")
    pl.add_argument("--out", required=True, type=Path, help="the file to write (replaced atomically)")
    pl.add_argument("--onnx", metavar="TASK", default=None,
                    help="write ONNX: build TASK's model (e.g. digits) and load the weights into it")
    _core_client_args(pl)
    pl.set_defaults(func=cmd_core_pull)

    p = subparsers.add_parser("audit", help="check and summarise core's audit log",
                              description="Work with core's audit log (JSON Lines, hash-chained, Ed25519-signed).")
    sub = p.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    v = sub.add_parser("verify", help="check that an audit log is intact",
                       description="Check every entry (canonical form, seq order, hash chain, signature) and the "
                                   "signed head checkpoint. Exits 0 when intact, 1 naming the first bad seq "
                                   "otherwise, 2 on a usage or key error.")
    v.add_argument("path", type=Path, metavar="PATH", help="the audit log (audit.jsonl)")
    v.add_argument("--key", type=Path, default=None,
                   help="core's audit public key (PEM); default: the key recorded by entry 1")
    v.add_argument("--head", type=Path, default=None, help="the head checkpoint (default: PATH.head)")
    v.set_defaults(func=cmd_audit_verify)
    rep = sub.add_parser("report", help="summarise operations per actor and action",
                         description="Verify the log, then count operations per actor and action (ok / refused / "
                                     "failed) in [--since, --until). Exits 1 if the log is not intact (the report "
                                     "then covers only its intact prefix).")
    rep.add_argument("path", type=Path, metavar="PATH", help="the audit log (audit.jsonl)")
    rep.add_argument("--since", type=_when, default=None, help="ISO date or date-time (inclusive, UTC if naive)")
    rep.add_argument("--until", type=_when, default=None, help="ISO date or date-time (exclusive, UTC if naive)")
    rep.add_argument("--format", choices=("markdown", "json"), default="markdown", help="default: %(default)s")
    rep.add_argument("--key", type=Path, default=None, help="core's audit public key (PEM)")
    rep.set_defaults(func=cmd_audit_report)

    p = subparsers.add_parser("certs", help="create keys and certificates for a deployment",
                              description="Create a deployment's TLS material and signing keys.")
    sub = p.add_subparsers(dest="certs_command", required=True, metavar="SUBCOMMAND")
    i = sub.add_parser("init", help="create a CA, server and client certificates, audit and token keys",
                       description="Create, in --out: ca.pem/ca.key, server.pem/server.key, client-<name>.pem/.key "
                                   "per --client, audit-signing.key/.pub and token-signing.key/.pub. Private keys "
                                   "are mode 0600; existing files are never overwritten.")
    i.add_argument("--out", required=True, type=Path, help="directory to create the files in")
    i.add_argument("--server-name", action="append", default=None, metavar="NAME",
                   help="DNS name or IP address of core (repeatable; default: localhost and 127.0.0.1)")
    i.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="make a TLS client certificate for NAME (repeatable)")
    i.add_argument("--days", type=int, default=365, help="certificate lifetime in days (default: %(default)s)")
    i.set_defaults(func=cmd_certs_init)

    p = subparsers.add_parser("token", help="create and revoke signed bearer tokens",
                              description="Signed, expiring bearer tokens for core (Ed25519 over {sub, role, iat, "
                                          "exp, jti}).")
    sub = p.add_subparsers(dest="token_command", required=True, metavar="SUBCOMMAND")
    t = sub.add_parser("create", help="create a token",
                       description="Print a token for --sub with --role, signed with --key (core's token key). "
                                   "With --audit-log and --audit-key (core stopped) the issue is recorded in the "
                                   "audit log; while core runs, use its issue_token action instead.")
    t.add_argument("--key", required=True, type=Path, help="token signing key (token-signing.key)")
    t.add_argument("--sub", required=True, help="identity (a fog's name for role fog)")
    t.add_argument("--role", required=True, choices=("fog", "reader", "auditor", "admin"))
    t.add_argument("--ttl", type=_duration, default=_duration("24h"),
                   help="lifetime: 3600, 90m, 24h, 30d (default 24h)")
    t.add_argument("--audit-log", type=Path, default=None, help="record the issue in this audit log")
    t.add_argument("--audit-key", type=Path, default=None, help="the audit log's signing key")
    t.set_defaults(func=cmd_token_create)
    rv = sub.add_parser("revoke", help="revoke a token (core stopped)",
                        description="Record in core's audit log (core stopped: it holds the log while it runs) "
                                    "that the signed token with --jti is refused from now on; core reads its "
                                    "revocations from the log when it starts. While core runs, use its "
                                    "revoke_token action instead (docs/api.md).")
    rv.add_argument("--jti", required=True, help="the token's jti (printed by 'token create', answered by "
                                                  "issue_token, recorded in the token.issue audit entry)")
    rv.add_argument("--reason", default="", help="why, for the audit log")
    rv.add_argument("--audit-log", required=True, type=Path, help="core's audit log (audit.jsonl)")
    rv.add_argument("--audit-key", required=True, type=Path, help="the audit log's signing key")
    rv.set_defaults(func=cmd_token_revoke)


# --- handlers --------------------------------------------------------------------------------------

def cmd_core_run(args: argparse.Namespace) -> int:
    from hyprstream.config import check_files
    from hyprstream.core.config import load_core_config
    from hyprstream.core.service import run

    config = load_core_config(args.config)
    check_files(config, source=str(args.config))
    logging.getLogger("hyprstream").setLevel(config.log_level.upper())
    return run(config, config_path=str(args.config))


def _core_client(args: argparse.Namespace):
    import os

    from hyprstream.config import read_file, read_token
    from hyprstream.coreapi.client import CoreClient

    if args.token_file is not None:
        token = read_token(args.token_file)
    elif os.environ.get(TOKEN_ENV, "").strip():
        token = os.environ[TOKEN_ENV].strip()
    else:
        raise ConfigError(f"no token: pass --token-file FILE or set {TOKEN_ENV}", source="core")
    kwargs = {"tls_root_certs": read_file(args.ca)} if args.ca is not None else {}
    if args.core.startswith("grpc+tls://") and args.ca is None:
        print("note: core's certificate is checked against the system's CAs; pass --ca with the deployment's "
              "ca.pem", file=sys.stderr)
    return CoreClient(args.core, token, **kwargs)


def version_rows(versions: list[dict]) -> list[dict]:
    """One flat row per version for ``core versions``: the lineage fields a person compares."""
    from hyprstream.core.audit import format_time
    from hyprstream.coreapi.records import federated_score

    rows = []
    for v in versions:
        privacy = v.get("privacy") or {}
        rows.append({"version": v["version"], "created": format_time(v["created"]), "fog": v.get("fog") or "-",
                     "seq": v.get("seq") if v.get("seq") is not None else "-", "layers": ",".join(v["layers"]) or "-",
                     "participants": v["participants"], "weight": f"{v['weight']:.4g}",
                     "staleness": max(v.get("staleness", {}).values(), default=0),
                     "update_norm": f"{v['update_norm']:.4g}",
                     "epsilon": f"{privacy['epsilon']:.4g}" if "epsilon" in privacy else "-",
                     "accuracy": f"{v['accuracy']:.4f}" if v.get("accuracy") is not None else "-",
                     "federated": f"{fed['accuracy']:.4f}" if (fed := federated_score(v.get("federated"))) else "-"})
    return rows


def cmd_core_versions(args: argparse.Namespace) -> int:
    with _core_client(args) as core:
        versions = core.list_versions(args.model)
    if args.format == "json":
        print(json.dumps(versions, indent=1))
        return 0
    rows = version_rows(versions)
    cols = list(rows[0]) if rows else []
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).rjust(widths[c]) if c not in ("created", "fog", "layers") else str(r[c]).ljust(widths[c])
                        for c in cols))
    return 0


def cmd_core_pull(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from hyprstream.durable import write_atomic

    if args.version is not None and args.version < 0:
        raise ConfigError("--version must be >= 0", source="core pull")
    with _core_client(args) as core:
        snapshot = core.get_weights(args.model, args.version)
    if args.onnx:
        from hyprstream.learning.export import export_onnx
        from hyprstream.learning.task import get_task
        from hyprstream.learning.trainer import load_weights
        from hyprstream.store import to_arrays

        task = get_task(args.onnx)
        model = task.build_model(seed=0)
        try:
            load_weights(model, to_arrays(snapshot.table))
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValidationError(f"version {snapshot.version} of {args.model!r} does not fit task "
                                  f"{args.onnx!r}'s model: {exc}") from None
        tmp = args.out.with_name(f".{args.out.name}.onnx-tmp")
        try:
            export_onnx(task, model, tmp)
            tmp.replace(args.out)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        meta = {b"hyprstream.model": args.model.encode(), b"hyprstream.version": str(snapshot.version).encode(),
                b"hyprstream.clocks": json.dumps({k: c.as_dict() for k, c in snapshot.clocks.items()}).encode()}
        table = snapshot.table.replace_schema_metadata({**(snapshot.table.schema.metadata or {}), **meta})

        def write(fh) -> None:
            with pa.ipc.new_file(fh, table.schema) as writer:
                writer.write_table(table)

        write_atomic(args.out, write)
    print(f"{args.model} version {snapshot.version} -> {args.out}", file=sys.stderr)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from hyprstream.core import signing
    from hyprstream.core.audit import verify_file

    key = signing.load_public_key(args.key) if args.key else None
    result = verify_file(args.path, key, head=args.head)
    if result.ok:
        print(f"{args.path}: {result.message()}")
        if key is None:
            print("note: signatures were checked against the key the log itself names; pass --key "
                  "audit-signing.pub to check who wrote it", file=sys.stderr)
        return 0
    print(f"{args.path}: NOT INTACT: {result.message()}")
    return 1


def cmd_audit_report(args: argparse.Namespace) -> int:
    from hyprstream.core import signing
    from hyprstream.core.audit import iter_entries, summarize, verify_file

    key = signing.load_public_key(args.key) if args.key else None
    result = verify_file(args.path, key)
    entries = (e for e in iter_entries(args.path) if e.seq <= result.last_seq)
    report = summarize(entries, since=args.since, until=args.until)
    if args.format == "json":
        print(json.dumps({**report.to_json(), "intact": result.ok, "verification": result.message()}, indent=1))
    else:
        print(report.to_markdown())
        print(f"Verification: {result.message()}")
    return 0 if result.ok else 1


def cmd_certs_init(args: argparse.Namespace) -> int:
    from hyprstream.core.certs import init_deployment

    created = init_deployment(args.out, server_names=args.server_name or ("localhost", "127.0.0.1"),
                              clients=args.client, days=args.days)
    for c in created:
        print(f"{'private' if c.private else 'public '}  {c.path}  {c.what}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from hyprstream.core import signing, tokens
    from hyprstream.core.audit import AuditLog, format_time
    from hyprstream.core.auth import Role

    if (args.audit_log is None) != (args.audit_key is None):
        raise ConfigError("--audit-log and --audit-key go together", source="token create")
    key = signing.load_private_key(args.key)
    try:
        token, claims = tokens.issue(key, args.sub, Role(args.role), ttl_s=args.ttl, now=time.time())
    except ValidationError as exc:
        raise ConfigError(str(exc), source="token create") from None
    if args.audit_log is not None:
        with AuditLog(args.audit_log, signing.load_private_key(args.audit_key), actor="cli") as alog:
            alog.append("cli", "token.issue", f"identity/{claims.sub}",
                        details={"role": claims.role.value, "exp": claims.exp, "jti": claims.jti,
                                 "key": signing.fingerprint(key), "via": "hyprstream token create"})
    else:
        print("note: this issue is not recorded in core's audit log (pass --audit-log/--audit-key, or use the "
              "issue_token action while core runs)", file=sys.stderr)
    print(f"token for {claims.sub!r} (role {claims.role.value}), expires {format_time(claims.exp)}, "
          f"jti {claims.jti}", file=sys.stderr)
    print(token)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from hyprstream.core import signing
    from hyprstream.coreapi import commands
    from hyprstream.core.audit import AuditError, AuditLog, iter_entries
    from hyprstream.core.auth import revoked_tokens

    body = json.dumps({"jti": args.jti, "reason": args.reason}).encode()
    request = commands.decode(body, expect=(commands.RevokeToken,), action="revoke_token")  # the action's rules
    key = signing.load_private_key(args.audit_key)
    try:
        alog = AuditLog(args.audit_log, key, actor="cli")
    except AuditError as exc:
        raise AuditError(f"{exc}; while core runs, revoke with its revoke_token action") from None
    with alog:
        if request.jti in revoked_tokens(iter_entries(args.audit_log)):
            print(f"token {request.jti} was already revoked", file=sys.stderr)
            return 0
        alog.append("cli", "token.revoke", f"token/{request.jti}",
                    details={"jti": request.jti, "reason": request.reason, "via": "hyprstream token revoke"})
    print(f"revoked token {request.jti}: core refuses it from its next start", file=sys.stderr)
    return 0
