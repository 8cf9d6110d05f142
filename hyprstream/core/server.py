"""Core's Arrow Flight server: master weights in, master weights out, every call authenticated.

With an audit log (``ModelRepository(..., audit=AuditLog(...))``), every read of weights or of the
audit log, every commit, every token issued and every refusal is recorded before the call returns.
A read whose audit entry cannot be written is refused (fail closed).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.flight as flight

from hyprstream.config import parse
from hyprstream.core import commands as cmd
from hyprstream.core.audit import AuditError, Outcome
from hyprstream.core.auth import (Authenticator, BearerAuthFactory, Permission, Principal, Role, TokenRegistry,
                                  principal_of)
from hyprstream.core.consistency import ConsistencyPolicy
from hyprstream.core.ratelimit import RateLimiter, RateLimitPolicy
from hyprstream.core.repository import ModelRepository, ModelSettings, PushRecord
from hyprstream.core.signing import Ed25519PrivateKey, fingerprint
from hyprstream.core.vector_clock import clocks_to_json
from hyprstream.errors import ConfigError, HyprstreamError, ValidationError
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.core")

ACTIONS = {
    "head": "Current version of a model with its layers and per-layer vector clocks.",
    "list_versions": "Lineage of a model: every version with parent, actor, fog, seq, layers, clocks, staleness.",
    "list_models": "Names of the registered models.",
    "audit_head": "The signed head checkpoint of the audit log (role auditor or admin).",
    "issue_token": "Issue a signed, expiring token (role admin; needs the core's token key).",
}
AUDIT_LINES_SCHEMA = pa.schema([pa.field("seq", pa.int64(), nullable=False),
                                pa.field("line", pa.string(), nullable=False)])


class CoreFlightServer(flight.FlightServerBase):
    """Serves :class:`ModelRepository` over Flight. See ``docs/api.md`` for the commands.

    ``tokens`` is a :class:`TokenRegistry` of static tokens (simulator, tests) or an
    :class:`Authenticator` (signed tokens, static tokens or both). ``rate_limit`` bounds each
    identity's request rate; ``token_key`` enables the ``issue_token`` action. Other keyword
    arguments go to ``FlightServerBase`` (``tls_certificates``, ``verify_client``, ``root_certificates``).
    """

    def __init__(self, repository: ModelRepository, tokens: TokenRegistry | Authenticator,
                 location: str = "grpc://127.0.0.1:0", *, rate_limit: RateLimitPolicy | None = None,
                 token_key: Ed25519PrivateKey | None = None, clock: Callable[[], float] = time.time,
                 **kwargs) -> None:
        self.repository = repository
        self.audit = repository.audit
        self.authenticator = tokens if isinstance(tokens, Authenticator) else Authenticator(tokens, clock=clock)
        if token_key is not None:
            self.authenticator = self.authenticator.with_token_key(token_key.public_key())
        self._token_key = token_key
        self._clock = clock
        self.tls = bool(kwargs.get("tls_certificates"))
        limiter = RateLimiter(rate_limit) if rate_limit is not None else None
        factory = BearerAuthFactory(self.authenticator, limiter=limiter, audit=self.audit)
        super().__init__(location, middleware={"auth": factory}, **kwargs)
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start_background(self) -> str:
        """Serve in a daemon thread; returns the location clients connect to."""
        self._thread = threading.Thread(target=self.serve, name="hyprstream-core-flight", daemon=True)
        self._thread.start()
        return f"grpc+tls://localhost:{self.port}" if self.tls else f"grpc://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- auditing --------------------------------------------------------------------------------

    def _audit(self, principal: Principal | str, action: str, subject: str, outcome: Outcome = Outcome.OK,
               **details) -> None:
        if self.audit is None:
            return
        actor = principal.identity if isinstance(principal, Principal) else principal
        try:
            self.audit.append(actor, action, subject, outcome=outcome, details=details)
        except AuditError as exc:
            log.error("audit log unavailable: %s", exc)
            raise flight.FlightServerError(f"core cannot record this call in its audit log: {exc}") from None

    def _refused(self, context, action: str, subject: str, reason: str, **details) -> None:
        self._audit(principal_of(context), action, subject, Outcome.REFUSED, reason=reason, **details)

    def _authorize(self, context, permission: Permission, action: str, subject: str) -> Principal:
        principal = principal_of(context)
        if not principal.may(permission):
            reason = f"role {principal.role.value!r} of {principal.identity!r} may not {permission.value}"
            log.warning("refused %s: %s", action, reason)
            self._audit(principal, "access.refused", subject, Outcome.REFUSED, reason=reason, request=action,
                        role=principal.role.value)
            raise flight.FlightUnauthorizedError(reason)
        return principal

    def _decode(self, context, raw: bytes, expect, action: str):
        try:
            return cmd.decode(raw, expect=expect)
        except ValidationError as exc:
            self._refused(context, "request.refused", "core", str(exc), request=action)
            raise flight.FlightServerError(f"invalid argument: {exc}") from None

    def _call(self, context, action: str, subject: str, fn, *args, details=None, **kwargs):
        """Run a repository call; a refusal is audited and becomes a Flight error with the same message."""
        try:
            return fn(*args, **kwargs)
        except (ValidationError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            log.warning("refused %s: %s", action, exc)
            self._refused(context, action, subject, str(exc), **(details or {}))
            raise flight.FlightServerError(f"invalid argument: {exc}") from None
        except AuditError as exc:
            raise flight.FlightServerError(f"core cannot record this call in its audit log: {exc}") from None
        except (HyprstreamError, OSError) as exc:
            reason = str(exc) if isinstance(exc, HyprstreamError) else f"storage error: {exc}"
            log.error("%s failed: %s", action, reason)
            self._audit(principal_of(context), action, subject, Outcome.FAILED, reason=reason, **(details or {}))
            raise flight.FlightServerError(reason) from None

    # --- Flight methods --------------------------------------------------------------------------

    def do_get(self, context, ticket):
        request = self._decode(context, ticket.ticket, (cmd.GetWeights, cmd.ReadAudit), "do_get")
        if isinstance(request, cmd.ReadAudit):
            principal = self._authorize(context, Permission.AUDIT_READ, "audit.read", "audit")
            if self.audit is None:
                raise flight.FlightServerError("this core has no audit log")
            lines = self.audit.read_lines(request.since_seq, request.limit)
            first = request.since_seq
            self._audit(principal, "audit.read", "audit", since_seq=first, entries=len(lines))
            table = pa.table({"seq": pa.array(range(first, first + len(lines)), pa.int64()),
                              "line": pa.array([x.decode() for x in lines], pa.string())}, schema=AUDIT_LINES_SCHEMA)
            return flight.RecordBatchStream(table)
        subject = f"model/{request.model}"
        principal = self._authorize(context, Permission.READ, "weights.read", subject)
        snap = self._call(context, "weights.read", subject, self.repository.get, request.model, request.version,
                          request.layers, details={"version": request.version, "layers": request.layers})
        self._audit(principal, "weights.read", subject, version=snap.version, layers=sorted(snap.clocks),
                    bytes=lt.nbytes(snap.table))
        meta = {cmd.META_MODEL: snap.model, cmd.META_VERSION: str(snap.version),
                cmd.META_CLOCKS: json.dumps(clocks_to_json(snap.clocks))}
        return flight.RecordBatchStream(snap.table.replace_schema_metadata(meta))

    def do_put(self, context, descriptor, reader, writer):
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            self._refused(context, "request.refused", "core", "do_put needs a command descriptor")
            raise flight.FlightServerError("do_put needs a command descriptor (FlightDescriptor.for_command)")
        request = self._decode(context, descriptor.command, (cmd.RegisterModel, cmd.PushDelta), "do_put")
        subject = f"model/{request.model}"
        if isinstance(request, cmd.RegisterModel):
            principal = self._authorize(context, Permission.REGISTER, "model.register", subject)
            table = reader.read_all()
            try:
                settings = ModelSettings(
                    consistency=parse(ConsistencyPolicy, request.consistency, source="register_model",
                                      key="consistency"),
                    max_update_norm=request.max_update_norm,
                )
            except ConfigError as exc:
                self._refused(context, "model.register", subject, str(exc))
                raise flight.FlightServerError(f"invalid argument: {exc}") from None
            version = self._call(context, "model.register", subject, self.repository.register, request.model,
                                 table, settings, actor=principal.identity)
            result = {"model": request.model, "version": version}
        else:
            principal = self._authorize(context, Permission.PUSH, "model.push", subject)
            details = {"fog": request.fog, "seq": request.seq, "participants": request.participants,
                       "base_clocks": clocks_to_json(request.base_clocks)}
            if request.fog != principal.identity and principal.role is not Role.ADMIN:
                reason = f"identity {principal.identity!r} may not push as fog {request.fog!r}"
                self._audit(principal, "access.refused", subject, Outcome.REFUSED, reason=reason,
                            request="model.push")
                raise flight.FlightUnauthorizedError(reason)
            table = reader.read_all()
            res = self._call(context, "model.push", subject, self.repository.push_delta, request.model, table,
                             fog=request.fog, seq=request.seq, base_clocks=request.base_clocks,
                             participants=request.participants, actor=principal.identity,
                             record=PushRecord(request.privacy, request.transcript_sha256), details=details)
            result = {"model": request.model, "version": res.version, "staleness": res.staleness,
                      "weight": res.weight, "update_norm": res.update_norm}
        writer.write(pa.py_buffer(json.dumps(result).encode()))

    def list_actions(self, context):
        return list(ACTIONS.items())

    def do_action(self, context, action):
        if action.type not in ACTIONS:
            reason = f"unknown action {action.type!r} (known: {', '.join(ACTIONS)})"
            self._refused(context, "request.refused", "core", reason)
            raise flight.FlightServerError(reason)
        body = action.body.to_pybytes() if action.body is not None else b""
        try:
            raw = json.loads(body) if body else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            raw = None
        if not isinstance(raw, dict):
            self._refused(context, "request.refused", "core", "action body must be a JSON object", request=action.type)
            raise flight.FlightServerError("invalid argument: action body must be a JSON object")
        request = self._decode(context, json.dumps({**raw, "schema": raw.get("schema", cmd.SCHEMA),
                                                    "command": action.type}).encode(),
                               (cmd.Head, cmd.ListVersions, cmd.ListModels, cmd.AuditHead, cmd.IssueToken),
                               action.type)
        if isinstance(request, cmd.AuditHead):
            principal = self._authorize(context, Permission.AUDIT_READ, "audit.read", "audit")
            if self.audit is None:
                raise flight.FlightServerError("this core has no audit log")
            self._audit(principal, "audit.read", "audit", what="head")
            out = self.audit.checkpoint().to_json()
        elif isinstance(request, cmd.IssueToken):
            out = self._issue_token(context, request)
        else:
            self._authorize(context, Permission.READ, f"model.{action.type}", "core")
            if isinstance(request, cmd.Head):
                out = self._call(context, "model.head", f"model/{request.model}", self.repository.head,
                                 request.model)
            elif isinstance(request, cmd.ListVersions):
                out = [_version_json(v) for v in self._call(context, "model.list_versions",
                                                            f"model/{request.model}", self.repository.versions,
                                                            request.model)]
            else:
                out = self.repository.models()
        yield flight.Result(json.dumps(out).encode())

    def _issue_token(self, context, request: cmd.IssueToken) -> dict:
        from hyprstream.core import tokens

        subject = f"identity/{request.sub}"
        principal = self._authorize(context, Permission.ISSUE_TOKEN, "token.issue", subject)
        if self._token_key is None:
            self._refused(context, "token.issue", subject, "this core has no token key")
            raise flight.FlightServerError("this core has no token key (auth.token_key) to sign tokens with")
        try:
            if request.role not in {r.value for r in Role}:
                raise ValidationError(f"unknown role {request.role!r} (known: {', '.join(r.value for r in Role)})")
            role = Role(request.role)
            token, claims = tokens.issue(self._token_key, request.sub, role, ttl_s=request.ttl_s, now=self._clock())
        except (ValueError, ValidationError) as exc:
            self._refused(context, "token.issue", subject, str(exc))
            raise flight.FlightServerError(f"invalid argument: {exc}") from None
        self._audit(principal, "token.issue", subject, role=role.value, exp=claims.exp, jti=claims.jti,
                    key=fingerprint(self._token_key))
        return {"token": token, **claims.to_json()}


def _version_json(v) -> dict:
    out = dict(vars(v))
    out["layers"] = list(v.layers)
    out["staleness"] = dict(v.staleness)
    out["clocks"] = {k: dict(c) for k, c in v.clocks.items()}
    return out
