"""The agent's side of inference offload: send rows to the fog's ``POST /v1/infer`` (see
:mod:`hyprstream.fog.offload`) when the device runs in its ``minimal`` strategy.

Errors are translated where they enter: 401 -> :class:`~hyprstream.errors.AuthError`, 400 and 413 ->
:class:`~hyprstream.errors.ValidationError` (with the fog's message), anything else (unreachable,
5xx, an answer off the protocol) -> :class:`~hyprstream.errors.TransportError`.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyprstream.errors import AuthError, ConfigError, TransportError, ValidationError
from hyprstream.protocol import INFER_SCHEMA


@dataclass(frozen=True)
class OffloadResult:
    model: str
    version: int  # the global model version the predictions came from
    task: str
    predictions: np.ndarray  # int32, one per row
    scores: np.ndarray  # float32, one per row


class OffloadClient:
    def __init__(self, url: str, token: str, tls_root_cert: str | Path | None = None, *,
                 timeout_s: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"offload URL must start with http:// or https://, got {url!r}")
        if not token:
            raise ConfigError("the offload token is empty")
        self.url, self.timeout_s = url, timeout_s
        self._token = token
        self._context = None
        if url.startswith("https://"):
            try:
                self._context = ssl.create_default_context(cafile=str(tls_root_cert) if tls_root_cert else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the CA certificate: {exc}", source=str(tls_root_cert)) from None
        elif tls_root_cert is not None:
            raise ConfigError("tls_root_cert given for a plain http:// offload URL")

    def __repr__(self) -> str:  # never the token
        return f"OffloadClient({self.url!r})"

    def infer(self, task: str, inputs: Sequence | np.ndarray) -> OffloadResult:
        rows = np.asarray(inputs).tolist() if isinstance(inputs, np.ndarray) else list(inputs)
        body = json.dumps({"task": task, "inputs": rows}, allow_nan=False).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self._token}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            if exc.code == 401:
                raise AuthError(f"offload refused: {message}") from None
            if exc.code in (400, 413):
                raise ValidationError(f"offload refused the request: {message}") from None
            raise TransportError(f"offload endpoint answered {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TransportError(f"offload endpoint {self.url} unreachable: {getattr(exc, 'reason', exc)}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TransportError("offload endpoint answered with something other than JSON") from None
        try:
            if answer.get("schema") != INFER_SCHEMA:
                raise ValueError(f"schema {answer.get('schema')!r}")
            result = OffloadResult(str(answer["model"]), int(answer["version"]), str(answer["task"]),
                                   np.asarray(answer["predictions"], dtype=np.int32),
                                   np.asarray(answer["scores"], dtype=np.float32))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise TransportError(f"offload answer off the protocol: {exc}") from None
        if len(result.predictions) != len(rows) or len(result.scores) != len(rows):
            raise TransportError(f"offload answered {len(result.predictions)} predictions for {len(rows)} rows")
        return result


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except Exception:  # noqa: BLE001 - any unreadable error body: fall back to the status line
        return str(exc.reason)


__all__ = ["OffloadClient", "OffloadResult"]
