"""Hyprstream's client for core's Flight API (fogs and tools use it; any Flight client works too)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from hyprstream.coreapi import commands as cmd
from hyprstream.coreapi.records import ModelSettings, PushResult, Snapshot
from hyprstream.config import to_dict
from hyprstream.vector_clock import VectorClock, clocks_from_json
from hyprstream.errors import (AccessDenied, AuthError, HyprstreamError, Refusal, TransportError, UpdateRejected,
                               ValidationError)


class CoreClient:
    """Authenticated connection to a core Flight server. Translates Flight errors into Hyprstream's."""

    def __init__(self, location: str, token: str, *, timeout_s: float = 60.0, **client_kwargs: Any) -> None:
        self.location = location
        self._client = flight.FlightClient(location, **client_kwargs)
        self._options = flight.FlightCallOptions(
            headers=[(b"authorization", f"Bearer {token}".encode())], timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def register_model(self, model: str, table: pa.Table, settings: ModelSettings = ModelSettings()) -> int:
        c = to_dict(settings)
        request = cmd.RegisterModel(model, c["consistency"], c["max_update_norm"])
        return int(self._put(request, table)["version"])

    def get_weights(self, model: str, version: int | None = None, layers: Iterable[str] | None = None) -> Snapshot:
        ticket = flight.Ticket(cmd.encode(cmd.GetWeights(model, version, tuple(layers) if layers else None)))
        with _translated():
            table = self._client.do_get(ticket, self._options).read_all()
        meta = table.schema.metadata or {}
        try:
            version_out = int(meta[cmd.META_VERSION.encode()])
            clocks = clocks_from_json(json.loads(meta[cmd.META_CLOCKS.encode()]))
        except (KeyError, ValueError) as exc:
            raise TransportError(f"core answered without version metadata: {exc}") from None
        return Snapshot(model, version_out, table.replace_schema_metadata(None), clocks)

    def push_delta(self, model: str, delta: pa.Table, *, fog: str, seq: int,
                   base_clocks: Mapping[str, VectorClock], participants: int,
                   privacy: Mapping[str, float] | None = None, transcript_sha256: str | None = None) -> PushResult:
        """:meth:`push` of the record these fields make."""
        return self.push(cmd.PushDelta(model, fog, seq, dict(base_clocks), participants,
                                       None if privacy is None else dict(privacy), transcript_sha256), delta)

    def push(self, push: cmd.PushDelta, delta: pa.Table) -> PushResult:
        """Send ``delta`` with its record ``push`` (the fog's outbox stores that record beside the delta)."""
        r = self._put(push, delta)
        return PushResult(int(r["version"]), dict(r["staleness"]), float(r["weight"]), float(r["update_norm"]))

    def head(self, model: str) -> dict[str, Any]:
        return self._action("head", {"model": model})

    def list_versions(self, model: str) -> list[dict[str, Any]]:
        return self._action("list_versions", {"model": model})

    def list_models(self) -> list[str]:
        return self._action("list_models", {})

    def audit_head(self) -> dict[str, Any]:
        """The signed head checkpoint of core's audit log (roles auditor, admin)."""
        return self._action("audit_head", {})

    def read_audit(self, since_seq: int = 1, limit: int | None = None) -> list[bytes]:
        """Raw audit log lines from ``since_seq`` on (roles auditor, admin), for offline verification."""
        ticket = flight.Ticket(cmd.encode(cmd.ReadAudit(since_seq, limit)))
        with _translated():
            table = self._client.do_get(ticket, self._options).read_all()
        return [line.encode() for line in table.column("line").to_pylist()]

    def report_evaluation(self, model: str, version: int, *, fog: str, loss: float, accuracy: float,
                          devices: int) -> dict[str, Any]:
        """Record a fog's federated evaluation of ``version`` in its lineage entry (role fog, as itself)."""
        request = cmd.ReportEvaluation(model, version, fog, float(loss), float(accuracy), int(devices))
        return self._action("report_evaluation", {k: v for k, v in asdict(request).items() if k != "command"})

    def issue_token(self, sub: str, role: str, ttl_s: int) -> dict[str, Any]:
        """A signed token for ``sub`` (role admin); the answer has ``token`` and its claims."""
        return self._action("issue_token", {"sub": sub, "role": role, "ttl_s": int(ttl_s)})

    def _put(self, request: cmd.Command, table: pa.Table) -> dict[str, Any]:
        descriptor = flight.FlightDescriptor.for_command(cmd.encode(request))
        with _translated(update=isinstance(request, cmd.PushDelta)):
            writer, reader = self._client.do_put(descriptor, table.schema, self._options)
            try:
                writer.write_table(table)
                writer.done_writing()
                buf = reader.read()
            finally:
                writer.close()  # raises the server's error when it refused the call
        if buf is None:
            raise TransportError("core sent no result for the put")
        return json.loads(buf.to_pybytes())

    def _action(self, name: str, body: Mapping[str, Any]) -> Any:
        with _translated():
            results = list(self._client.do_action(flight.Action(name, json.dumps(body).encode()), self._options))
        return json.loads(results[0].body.to_pybytes())


class _translated:
    """Context manager mapping Flight exceptions to the Hyprstream exception tree."""

    def __init__(self, *, update: bool = False) -> None:
        self.update = update

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, HyprstreamError):
            return False
        message = _server_message(exc)
        if isinstance(exc, flight.FlightUnauthorizedError):
            raise AccessDenied(message) from None
        if isinstance(exc, flight.FlightUnauthenticatedError):
            raise AuthError(message) from None
        if isinstance(exc, flight.FlightUnavailableError):
            if message.startswith("rate limit exceeded"):
                raise TransportError(f"core refused the call: {message}") from None
            raise TransportError(f"core unreachable: {message}") from None
        if isinstance(exc, (flight.FlightError, pa.ArrowException)):
            if message.startswith("invalid argument: "):
                reason = message.removeprefix("invalid argument: ")
                if self.update:
                    raise UpdateRejected(reason, _refusal(exc)) from None
                raise ValidationError(reason) from None
            raise TransportError(message) from None
        return False


def _refusal(exc: BaseException) -> Refusal:
    """The refusal code core sent beside its message (``extra_info``); INVALID when there is none."""
    try:
        return Refusal(json.loads(getattr(exc, "extra_info", b"") or b"{}").get("code"))
    except (ValueError, TypeError, AttributeError):
        return Refusal.INVALID


def _server_message(exc: BaseException) -> str:
    """The server's own words, without gRPC's decoration."""
    text = str(exc)
    for prefix in ("Flight error: ", "Flight returned internal error, with message: ",
                   "Flight returned unauthenticated error, with message: ",
                   "Flight returned unauthorized error, with message: ",
                   "Flight returned unavailable error, with message: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text.split(". Detail:")[0].split("\ngRPC client debug context")[0].strip()
