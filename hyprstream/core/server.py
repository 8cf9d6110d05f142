"""Core's Arrow Flight server: master weights in, master weights out, every call authenticated.

With an audit log (``ModelRepository(..., audit=AuditLog(...))``), every read of weights or of the
audit log, every commit, every token issued and every refusal is recorded before the call returns.
A read whose audit entry cannot be written is refused (fail closed).
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.flight as flight

from hyprstream import __version__
from hyprstream.config import parse
from hyprstream.coreapi import commands as cmd
from hyprstream.core.audit import AuditError, Outcome, iter_entries
from hyprstream.core.auth import (Authenticator, BearerAuthFactory, Permission, Principal, Role, TokenRegistry,
                                  principal_of, revoked_tokens)
from hyprstream.consistency import ConsistencyPolicy
from hyprstream.core.ratelimit import RateLimiter, RateLimitPolicy
from hyprstream.core.repository import ModelRepository, ModelSettings
from hyprstream.core.signing import Ed25519PrivateKey, fingerprint
from hyprstream.core import sql
from hyprstream.vector_clock import clocks_to_json
from hyprstream.errors import ConfigError, HyprstreamError, UpdateRejected, ValidationError
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.core")

ACTIONS = {
    "head": "Current version of a model with its layers and per-layer vector clocks.",
    "list_versions": "Lineage of a model: every version with parent, actor, fog, seq, layers, clocks, staleness.",
    "list_models": "Names of the registered models.",
    "audit_head": "The signed head checkpoint of the audit log (role auditor or admin).",
    "issue_token": "Issue a signed, expiring token (role admin; needs the core's token key).",
    "revoke_token": "Refuse a signed token (by its jti) from now on, also after a restart (role admin).",
    "report_evaluation": "A fog's federated evaluation of a version on its agents' held-out data (role fog, "
                         "as itself; admin).",
}
# what each action needs, checked before its body is decoded: (permission, audit action, audit subject)
ACTION_PERMISSIONS = {"head": (Permission.READ, "model.head", "core"),
                      "list_versions": (Permission.READ, "model.list_versions", "core"),
                      "list_models": (Permission.READ, "model.list_models", "core"),
                      "audit_head": (Permission.AUDIT_READ, "audit.read", "audit"),
                      "issue_token": (Permission.ISSUE_TOKEN, "token.issue", "core"),
                      "revoke_token": (Permission.REVOKE_TOKEN, "token.revoke", "core"),
                      "report_evaluation": (Permission.PUSH, "model.evaluation", "core")}
ACTION_COMMANDS = (cmd.Head, cmd.ListVersions, cmd.ListModels, cmd.AuditHead, cmd.IssueToken, cmd.RevokeToken,
                   cmd.ReportEvaluation)
# Flight SQL actions core does not serve: its SQL endpoint is read-only, one query at a time
SQL_REFUSED = ("CreatePreparedSubstraitPlan", "BeginTransaction", "BeginSavepoint", "EndTransaction", "EndSavepoint",
               "CancelQuery", "CancelFlightInfo")
SQL_ACTIONS = ("CreatePreparedStatement", "ClosePreparedStatement", "CloseSession")
# Flight SQL catalog commands core answers (the ticket is the command itself)
SQL_CATALOG = ("CommandGetSqlInfo", "CommandGetCatalogs", "CommandGetDbSchemas", "CommandGetTables",
               "CommandGetTableTypes")
AUDIT_LINES_SCHEMA = pa.schema([pa.field("seq", pa.int64(), nullable=False),
                                pa.field("line", pa.string(), nullable=False)])


def _served(method):
    """Every Flight method of core runs through this: a caller refused at login is refused here (with
    its peer address known), and an exception that is not a Flight error never reaches the client as
    text: it gets ``internal error <id>``; the id, with the traceback, goes to core's log and the
    audit log (outcome ``failed``)."""
    name = method.__name__

    @functools.wraps(method)
    def served(self: CoreFlightServer, context, *args):
        try:
            self.auth.admit(context)
            return method(self, context, *args)
        except flight.FlightError:
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort: whatever it is, the client gets an id only
            raise self._internal_error(context, name, exc) from None

    return served


class CoreFlightServer(flight.FlightServerBase):
    """Serves :class:`ModelRepository` over Flight. See ``docs/api.md`` for the commands.

    ``tokens`` is a :class:`TokenRegistry` of static tokens (simulator, tests) or an
    :class:`Authenticator` (signed tokens, static tokens or both). ``rate_limit`` bounds each
    identity's request rate; ``token_key`` enables the ``issue_token`` action. Other keyword
    arguments go to ``FlightServerBase`` (``tls_certificates``, ``verify_client``, ``root_certificates``).
    The same server answers Flight SQL queries over the federation's history (:mod:`hyprstream.core.sql`),
    bounded by ``sql_limits``; ``sql_sources.metrics`` names the registry whose samples the ``metrics`` table holds.
    """

    def __init__(self, repository: ModelRepository, tokens: TokenRegistry | Authenticator,
                 location: str = "grpc://127.0.0.1:0", *, rate_limit: RateLimitPolicy | None = None,
                 token_key: Ed25519PrivateKey | None = None, clock: Callable[[], float] = time.time,
                 sql_limits: sql.Limits = sql.Limits(), **kwargs) -> None:
        self.repository = repository
        self.audit = repository.audit
        self.authenticator = tokens if isinstance(tokens, Authenticator) else Authenticator(tokens, clock=clock)
        if token_key is not None:
            self.authenticator = self.authenticator.with_token_key(token_key.public_key())
        if self.audit is not None:  # revocations are kept where they are recorded: the audit log
            self.authenticator.revoked.update(revoked_tokens(iter_entries(self.audit.path)))
        self._token_key = token_key
        self._clock = clock
        self.tls = bool(kwargs.get("tls_certificates"))
        limiter = RateLimiter(rate_limit) if rate_limit is not None else None
        self.auth = BearerAuthFactory(self.authenticator, limiter=limiter, audit=self.audit)
        super().__init__(location, middleware={"auth": self.auth}, **kwargs)
        self._thread: threading.Thread | None = None
        self.sql_sources = sql.Sources(repository, self.audit)
        self.sql_limits = sql_limits
        self._sql_results = sql.Handles(sql_limits, "results", once=True)
        self._sql_prepared = sql.Handles(sql_limits, "prepared queries", once=False)

    # --- lifecycle -------------------------------------------------------------------------------

    def start_background(self) -> str:
        """Serve in a daemon thread; returns the location clients connect to."""
        self._thread = threading.Thread(target=self.serve, name="hyprstream-core-flight", daemon=True)
        self._thread.start()
        return f"grpc+tls://localhost:{self.port}" if self.tls else f"grpc://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop serving; the counted entries of refused logins still pending are written."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.auth.refused.flush(all_windows=True)

    # --- auditing --------------------------------------------------------------------------------

    def _audit(self, principal: Principal | str, action: str, subject: str, outcome: Outcome = Outcome.OK,
               **details) -> None:
        if self.audit is None:
            return
        self.auth.refused.flush()  # counted refused logins whose window has passed go first
        actor = principal.identity if isinstance(principal, Principal) else principal
        try:
            self.audit.append(actor, action, subject, outcome=outcome, details=details)
        except AuditError as exc:
            log.error("audit log unavailable: %s", exc)
            raise flight.FlightServerError(f"core cannot record this call in its audit log: {exc}") from None

    def _refused(self, context, action: str, subject: str, reason: str, **details) -> None:
        self._audit(principal_of(context), action, subject, Outcome.REFUSED, reason=reason, **details)

    def _authorize(self, context, permission: Permission | tuple[Permission, ...], action: str,
                   subject: str) -> Principal:
        """The caller, when its role has ``permission`` (one of them, for a tuple); refused and audited otherwise."""
        principal = principal_of(context)
        wanted = permission if isinstance(permission, tuple) else (permission,)
        if not any(principal.may(p) for p in wanted):
            reason = (f"role {principal.role.value!r} of {principal.identity!r} may not "
                      f"{' or '.join(p.value for p in wanted)}")
            log.warning("refused %s: %s", action, reason)
            self._audit(principal, "access.refused", subject, Outcome.REFUSED, reason=reason, request=action,
                        role=principal.role.value)
            raise flight.FlightUnauthorizedError(reason)
        return principal

    def _invalid(self, context, reason: str, action: str = "request.refused", subject: str = "core",
                 **details) -> flight.FlightServerError:
        """Audit a refused request; the error to raise, with the message every refusal starts with."""
        log.warning("refused %s: %s", details.get("request", action), reason)
        self._refused(context, action, subject, reason, **details)
        return flight.FlightServerError(f"invalid argument: {reason}")

    def _decode(self, context, raw: bytes, expect, request: str, *, action: str | None = None):
        try:
            return cmd.decode(raw, expect=expect, action=action)
        except ValidationError as exc:
            raise self._invalid(context, str(exc), request=request) from None

    def _read_table(self, context, reader, action: str, subject: str) -> pa.Table:
        try:
            return reader.read_all()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise self._invalid(context, f"cannot read the uploaded table: {str(exc).splitlines()[0][:200]}",
                                action, subject) from None

    def _internal_error(self, context, request: str, exc: BaseException) -> flight.FlightServerError:
        incident = secrets.token_hex(6)
        log.error("internal error %s in %s", incident, request, exc_info=exc)
        middleware = context.get_middleware("auth")
        actor = middleware.principal if middleware is not None and middleware.principal is not None else "anonymous"
        try:
            self._audit(actor, "request.failed", "core", Outcome.FAILED, incident=incident, request=request,
                        error=type(exc).__name__)
        except flight.FlightServerError:
            pass  # the audit log's failure is logged by _audit; the client still gets only the id
        return flight.FlightServerError(f"internal error {incident} (core's log has the details)")

    def _call(self, context, action: str, subject: str, fn, *args, details=None, **kwargs):
        """Run a repository call; a refusal is audited and becomes a Flight error with the same message."""
        try:
            return fn(*args, **kwargs)
        except (ValidationError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            code = {"code": exc.code.value} if isinstance(exc, UpdateRejected) else {}
            log.warning("refused %s: %s", action, exc, extra={**code, **{k: v for k, v in (details or {}).items()
                                                                          if k in ("fog", "seq")}})
            self._refused(context, action, subject, str(exc), **code, **(details or {}))
            # the refusal's code travels beside the message (Flight's extra_info), for callers to act on
            raise flight.FlightServerError(f"invalid argument: {exc}",
                                           extra_info=json.dumps(code).encode() if code else b"") from None
        except AuditError as exc:
            raise flight.FlightServerError(f"core cannot record this call in its audit log: {exc}") from None
        except (HyprstreamError, OSError) as exc:
            reason = str(exc) if isinstance(exc, HyprstreamError) else f"storage error: {exc}"
            log.error("%s failed: %s", action, reason)
            self._audit(principal_of(context), action, subject, Outcome.FAILED, reason=reason, **(details or {}))
            raise flight.FlightServerError(reason) from None

    # --- Flight methods --------------------------------------------------------------------------

    @_served
    def do_get(self, context, ticket):
        self._authorize(context, (Permission.READ, Permission.AUDIT_READ), "do_get", "core")
        if sql.is_flight_sql(ticket.ticket):
            return flight.RecordBatchStream(self._sql_ticket(context, ticket.ticket))
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

    @_served
    def do_put(self, context, descriptor, reader, writer):
        if descriptor.descriptor_type == flight.DescriptorType.CMD and sql.is_flight_sql(descriptor.command):
            # refused whoever asks; the message tells a SQL client why (nothing of the command is read)
            raise self._invalid(context, "core's SQL endpoint is read-only and binds no parameters: put the values "
                                "in the query", "sql.query", "sql", request="do_put")
        self._authorize(context, (Permission.PUSH, Permission.REGISTER), "do_put", "core")
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise self._invalid(context, "do_put needs a command descriptor (FlightDescriptor.for_command)",
                                request="do_put")
        request = self._decode(context, descriptor.command, (cmd.RegisterModel, cmd.PushDelta), "do_put")
        subject = f"model/{request.model}"
        if isinstance(request, cmd.RegisterModel):
            principal = self._authorize(context, Permission.REGISTER, "model.register", subject)
            table = self._read_table(context, reader, "model.register", subject)
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
            details = cmd.claims(request)
            if request.fog != principal.identity and principal.role is not Role.ADMIN:
                reason = f"identity {principal.identity!r} may not push as fog {request.fog!r}"
                self._audit(principal, "access.refused", subject, Outcome.REFUSED, reason=reason,
                            request="model.push")
                raise flight.FlightUnauthorizedError(reason)
            table = self._read_table(context, reader, "model.push", subject)
            res = self._call(context, "model.push", subject, self.repository.push, request, table,
                             actor=principal.identity, details=details)
            result = {"model": request.model, "version": res.version, "staleness": res.staleness,
                      "weight": res.weight, "update_norm": res.update_norm}
        writer.write(pa.py_buffer(json.dumps(result).encode()))

    @_served
    def list_actions(self, context):
        return list(ACTIONS.items())

    @_served
    def do_action(self, context, action):
        if action.type in SQL_REFUSED:
            raise self._invalid(context, f"core's SQL endpoint is read-only, without transactions: {action.type} "
                                f"is not served", request="do_action")
        if action.type in SQL_ACTIONS:
            return self._sql_action(context, action)
        if action.type not in ACTIONS:
            raise self._invalid(context, f"unknown action {cmd.quote(action.type)} (known: {', '.join(ACTIONS)})",
                                request="do_action")
        self._authorize(context, *ACTION_PERMISSIONS[action.type])
        body = action.body.to_pybytes() if action.body is not None else b""
        request = self._decode(context, body, ACTION_COMMANDS, action.type, action=action.type)
        if isinstance(request, cmd.AuditHead):
            principal = principal_of(context)
            if self.audit is None:
                raise flight.FlightServerError("this core has no audit log")
            self._audit(principal, "audit.read", "audit", what="head")
            out = self.audit.checkpoint().to_json()
        elif isinstance(request, cmd.IssueToken):
            out = self._issue_token(context, request)
        elif isinstance(request, cmd.RevokeToken):
            out = self._revoke_token(context, request)
        elif isinstance(request, cmd.ReportEvaluation):
            out = self._report_evaluation(context, request)
        elif isinstance(request, cmd.Head):
            out = self._call(context, "model.head", f"model/{request.model}", self.repository.head, request.model)
        elif isinstance(request, cmd.ListVersions):
            out = [_version_json(v) for v in self._call(context, "model.list_versions", f"model/{request.model}",
                                                        self.repository.versions, request.model)]
        else:
            out = self.repository.models()
        return [flight.Result(json.dumps(out).encode())]

    @_served
    def list_flights(self, context, criteria):
        raise self._invalid(context, "core does not serve list_flights (see docs/api.md)", request="list_flights")

    @_served
    def get_flight_info(self, context, descriptor):
        if descriptor.descriptor_type == flight.DescriptorType.CMD and sql.is_flight_sql(descriptor.command):
            return self._sql_flight_info(context, descriptor)
        raise self._invalid(context, "core serves get_flight_info for Flight SQL commands only (see docs/api.md)",
                            request="get_flight_info")

    @_served
    def do_exchange(self, context, descriptor, reader, writer):
        raise self._invalid(context, "core does not serve do_exchange (see docs/api.md)", request="do_exchange")

    # --- Flight SQL ------------------------------------------------------------------------------

    def _sql_command(self, context, raw: bytes, request: str) -> tuple[str, dict]:
        try:
            return sql.unpack_any(raw)
        except ValidationError as exc:
            raise self._invalid(context, str(exc), "sql.query", "sql", request=request) from None

    def _sql_text(self, context, fields: dict, number: int) -> str | None:
        try:
            return sql.text_field(fields, number)
        except ValidationError as exc:
            raise self._invalid(context, str(exc), "sql.query", "sql") from None

    def _sql_visible(self, principal: Principal) -> list[str]:
        """The tables ``principal`` may query: audit with the audit permission, the others with read."""
        return [name for name in sql.TABLES if principal.may(Permission.AUDIT_READ if name == sql.AUDIT_TABLE
                                                              else Permission.READ)]

    def _sql_flight_info(self, context, descriptor) -> flight.FlightInfo:
        principal = self._authorize(context, (Permission.READ, Permission.AUDIT_READ), "sql.query", "sql")
        message, fields = self._sql_command(context, descriptor.command, "get_flight_info")
        if message in ("CommandStatementQuery", "CommandPreparedStatementQuery"):
            if message == "CommandPreparedStatementQuery":
                query = self._sql_take(context, self._sql_prepared, principal, fields)
            else:
                query = self._sql_text(context, fields, 1)
            table = self._sql_query(context, principal, query)
            ticket = sql.pack_any("TicketStatementQuery", [(1, self._sql_results.put(principal.identity, table))])
        elif message in SQL_CATALOG:
            table = self._sql_catalog(context, principal, message, fields)
            ticket = descriptor.command
        else:
            raise self._invalid(context, f"Flight SQL command {message} is not served (core answers queries and "
                                f"{', '.join(SQL_CATALOG)})", "sql.query", "sql", request="get_flight_info")
        endpoint = flight.FlightEndpoint(ticket, [])
        return flight.FlightInfo(table.schema, descriptor, [endpoint], table.num_rows, table.nbytes)

    def _sql_take(self, context, handles: sql.Handles, principal: Principal, fields: dict):
        handle = fields.get(1, [b""])[-1]
        try:
            return handles.take(principal.identity, handle if isinstance(handle, bytes) else b"")
        except ValidationError as exc:
            raise self._invalid(context, str(exc), "sql.query", "sql") from None

    def _sql_action(self, context, action) -> list[flight.Result]:
        """Prepared queries (the ADBC driver prepares every query) and the end of a session."""
        principal = self._authorize(context, (Permission.READ, Permission.AUDIT_READ), "sql.query", "sql")
        if action.type == "CloseSession":
            return [flight.Result(sql.encode([(1, 1)]))]  # CloseSessionResult: CLOSED (sessions hold nothing)
        message, fields = self._sql_command(context, action.body.to_pybytes() if action.body else b"", "do_action")
        if action.type == "ClosePreparedStatement":
            handle = fields.get(1, [b""])[-1]
            self._sql_prepared.close(principal.identity, handle if isinstance(handle, bytes) else b"")
            return []
        query = self._sql_text(context, fields, 1)
        if message != "ActionCreatePreparedStatementRequest" or not query:
            raise self._invalid(context, "CreatePreparedStatement needs an ActionCreatePreparedStatementRequest "
                                "with a query", "sql.query", "sql", request="do_action")
        if fields.get(2):
            raise self._invalid(context, "core's SQL endpoint has no transactions", "sql.query", "sql")
        try:
            sql.check_statement(query)
            handle = self._sql_prepared.put(principal.identity, query)
        except ValidationError as exc:
            raise self._invalid(context, str(exc), "sql.query", "sql", query_sha256=sql.query_digest(query)) from None
        return [flight.Result(sql.pack_any("ActionCreatePreparedStatementResult", [(1, handle)]))]

    def _sql_query(self, context, principal: Principal, query: str | None) -> pa.Table:
        if not query:
            raise self._invalid(context, "CommandStatementQuery without a query", "sql.query", "sql")
        digest = sql.query_digest(query)
        visible = self._sql_visible(principal)
        named: list[str] = []

        def build(names: set[str]) -> dict[str, pa.Table]:
            hidden = sorted(names - set(visible))
            if hidden:
                reason = (f"role {principal.role.value!r} of {principal.identity!r} may not read table "
                          f"{', '.join(hidden)}")
                self._audit(principal, "access.refused", "sql", Outcome.REFUSED, reason=reason, request="sql.query",
                            query_sha256=digest)
                raise flight.FlightUnauthorizedError(reason)
            named.extend(sorted(names))
            return {name: self.sql_sources.build(name) for name in names}

        try:
            table = sql.execute(query, visible, build, self.sql_limits)
        except ValidationError as exc:
            raise self._invalid(context, str(exc), "sql.query", "sql", query_sha256=digest) from None
        self._audit(principal, "sql.query", "sql", query_sha256=digest, chars=len(query), tables=named,
                    rows=table.num_rows)
        return table

    def _sql_catalog(self, context, principal: Principal, message: str, fields: dict) -> pa.Table:
        try:
            if message == "CommandGetSqlInfo":
                return sql.sql_info(sql.uint_list(fields, 1), __version__)
            if message == "CommandGetCatalogs":
                return sql.catalogs()
            if message == "CommandGetDbSchemas":
                return sql.db_schemas(fields)
            if message == "CommandGetTableTypes":
                return sql.table_types()
            return sql.tables_listing(self._sql_visible(principal), fields)
        except ValidationError as exc:
            raise self._invalid(context, str(exc), "sql.query", "sql", request=message) from None

    def _sql_ticket(self, context, raw: bytes) -> pa.Table:
        principal = principal_of(context)
        message, fields = self._sql_command(context, raw, "do_get")
        if message == "TicketStatementQuery":
            return self._sql_take(context, self._sql_results, principal, fields)
        if message in SQL_CATALOG:
            return self._sql_catalog(context, principal, message, fields)
        raise self._invalid(context, f"Flight SQL ticket {message} is not served", "sql.query", "sql",
                            request="do_get")

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


    def _report_evaluation(self, context, request: cmd.ReportEvaluation) -> dict:
        subject = f"model/{request.model}"
        principal = principal_of(context)
        if request.fog != principal.identity and principal.role is not Role.ADMIN:
            reason = f"identity {principal.identity!r} may not report as fog {request.fog!r}"
            self._audit(principal, "access.refused", subject, Outcome.REFUSED, reason=reason,
                        request="model.evaluation")
            raise flight.FlightUnauthorizedError(reason)
        self._call(context, "model.evaluation", subject, self.repository.record_evaluation, request,
                   actor=principal.identity, details={"version": request.version, "fog": request.fog})
        return {"model": request.model, "version": request.version, "recorded": True}

    def _revoke_token(self, context, request: cmd.RevokeToken) -> dict:
        """In force at once, and recorded in the audit log, which core reads its revocations from at start."""
        principal = principal_of(context)
        if not self.authenticator.revoke(request.jti):
            return {"jti": request.jti, "revoked": True, "already": True}
        # in force at once; should the entry fail, until a restart (the caller is told it was not recorded)
        self._audit(principal, "token.revoke", f"token/{request.jti}", jti=request.jti, reason=request.reason)
        return {"jti": request.jti, "revoked": True, "already": False}


def _version_json(v) -> dict:
    out = dict(vars(v))
    out["layers"] = list(v.layers)
    out["staleness"] = dict(v.staleness)
    out["clocks"] = {k: dict(c) for k, c in v.clocks.items()}
    out["privacy"] = None if v.privacy is None else dict(v.privacy)
    out["federated"] = None if v.federated is None else {f: dict(s) for f, s in v.federated.items()}
    return out
