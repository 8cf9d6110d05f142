"""Core's Arrow Flight server: master weights in, master weights out, every call authenticated."""

from __future__ import annotations

import json
import logging
import threading

import pyarrow as pa
import pyarrow.flight as flight

from hyprstream.config import parse
from hyprstream.core import commands as cmd
from hyprstream.core.auth import BearerAuthFactory, Permission, TokenRegistry, principal_of
from hyprstream.core.consistency import ConsistencyPolicy
from hyprstream.core.repository import ModelRepository, ModelSettings
from hyprstream.core.vector_clock import clocks_to_json
from hyprstream.errors import ConfigError, HyprstreamError, ValidationError

log = logging.getLogger("hyprstream.core")

ACTIONS = {
    "head": "Current version of a model with its layers and per-layer vector clocks.",
    "list_versions": "Lineage of a model: every version with parent, actor, layers, participants, staleness.",
    "list_models": "Names of the registered models.",
}


class CoreFlightServer(flight.FlightServerBase):
    """Serves :class:`ModelRepository` over Flight. See ``docs/api.md`` for the commands."""

    def __init__(self, repository: ModelRepository, tokens: TokenRegistry,
                 location: str = "grpc://127.0.0.1:0", **kwargs) -> None:
        super().__init__(location, middleware={"auth": BearerAuthFactory(tokens)}, **kwargs)
        self.repository = repository
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start_background(self) -> str:
        """Serve in a daemon thread; returns the location clients connect to."""
        self._thread = threading.Thread(target=self.serve, name="hyprstream-core-flight", daemon=True)
        self._thread.start()
        return f"grpc://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- Flight methods --------------------------------------------------------------------------

    def do_get(self, context, ticket):
        request = _decode(ticket.ticket, (cmd.GetWeights,))
        _authorize(context, Permission.READ)
        snap = _call(self.repository.get, request.model, request.version, request.layers)
        meta = {cmd.META_MODEL: snap.model, cmd.META_VERSION: str(snap.version),
                cmd.META_CLOCKS: json.dumps(clocks_to_json(snap.clocks))}
        table = snap.table.replace_schema_metadata(meta)
        return flight.RecordBatchStream(table)

    def do_put(self, context, descriptor, reader, writer):
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise flight.FlightServerError("do_put needs a command descriptor (FlightDescriptor.for_command)")
        request = _decode(descriptor.command, (cmd.RegisterModel, cmd.PushDelta))
        principal = principal_of(context)
        if isinstance(request, cmd.RegisterModel):
            _authorize(context, Permission.REGISTER)
            table = reader.read_all()
            try:
                settings = ModelSettings(
                    consistency=parse(ConsistencyPolicy, request.consistency, source="register_model",
                                      key="consistency"),
                    max_update_norm=request.max_update_norm,
                )
            except ConfigError as exc:
                raise flight.FlightServerError(f"invalid argument: {exc}") from None
            version = _call(self.repository.register, request.model, table, settings, actor=principal.identity)
            result = {"model": request.model, "version": version}
        else:
            _authorize(context, Permission.PUSH)
            if request.fog != principal.identity and principal.role.value != "admin":
                raise flight.FlightUnauthorizedError(
                    f"identity {principal.identity!r} may not push as fog {request.fog!r}")
            table = reader.read_all()
            res = _call(self.repository.push_delta, request.model, table, fog=request.fog, seq=request.seq,
                        base_clocks=request.base_clocks, participants=request.participants)
            result = {"model": request.model, "version": res.version, "staleness": res.staleness,
                      "weight": res.weight, "update_norm": res.update_norm}
        writer.write(pa.py_buffer(json.dumps(result).encode()))

    def list_actions(self, context):
        return list(ACTIONS.items())

    def do_action(self, context, action):
        if action.type not in ACTIONS:
            raise flight.FlightServerError(f"unknown action {action.type!r} (known: {', '.join(ACTIONS)})")
        body = action.body.to_pybytes() if action.body is not None else b""
        raw = json.loads(body or b"{}") if body else {}
        if not isinstance(raw, dict):
            raise flight.FlightServerError("invalid argument: action body must be a JSON object")
        request = _decode(json.dumps({**raw, "schema": raw.get("schema", cmd.SCHEMA), "command": action.type}).encode(),
                          (cmd.Head, cmd.ListVersions, cmd.ListModels))
        _authorize(context, Permission.READ)
        if isinstance(request, cmd.Head):
            out = _call(self.repository.head, request.model)
        elif isinstance(request, cmd.ListVersions):
            out = [vars(v) | {"layers": list(v.layers), "staleness": dict(v.staleness)}
                   for v in _call(self.repository.versions, request.model)]
        else:
            out = self.repository.models()
        yield flight.Result(json.dumps(out).encode())


def _decode(raw: bytes, expect):
    try:
        return cmd.decode(raw, expect=expect)
    except ValidationError as exc:
        raise flight.FlightServerError(f"invalid argument: {exc}") from None


def _authorize(context, permission: Permission) -> None:
    principal = principal_of(context)
    if not principal.may(permission):
        log.warning("refused %s to %s (role %s)", permission.value, principal.identity, principal.role.value)
        raise flight.FlightUnauthorizedError(
            f"role {principal.role.value!r} of {principal.identity!r} may not {permission.value}")


def _call(fn, *args, **kwargs):
    """Run a repository call, turning Hyprstream errors into Flight errors with the same message."""
    try:
        return fn(*args, **kwargs)
    except (ValidationError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        log.warning("refused %s: %s", fn.__name__, exc)
        raise flight.FlightServerError(f"invalid argument: {exc}") from None
    except HyprstreamError as exc:
        raise flight.FlightServerError(str(exc)) from None
