"""The one exception tree of Hyprstream.

Every error the package raises on purpose derives from :class:`HyprstreamError`. Errors from the
libraries underneath (pyarrow, flwr, grpc, paho) are translated where they enter the package, so a
caller can catch ``HyprstreamError`` and know the failure is described in Hyprstream's own terms.

    HyprstreamError
    +-- ConfigError          a configuration file or value is invalid (names file, key path, reason)
    +-- MissingExtraError    an optional dependency group is not installed (names the extra)
    +-- ValidationError      an input (update, command, payload) was refused; nothing was changed
    |   +-- UpdateRejected   a weight delta was refused by core (shape, dtype, finiteness, layer, ...)
    +-- AuthError            credentials missing, invalid or insufficient
    +-- StoreError           the local Arrow store cannot do what was asked
    +-- TransportError       a peer could not be reached or answered outside the protocol
"""

from __future__ import annotations

import enum


class HyprstreamError(Exception):
    """Base class of every error raised by Hyprstream."""


class ConfigError(HyprstreamError):
    """A configuration is invalid.

    ``str(err)`` reads ``<file>: <key.path>: <reason>`` so that a user can go straight to the line.
    """

    def __init__(self, reason: str, *, source: str | None = None, key: str | None = None) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        parts = [p for p in (source, key) if p]
        super().__init__(": ".join([*parts, reason]))


class MissingExtraError(HyprstreamError, ImportError):
    """An optional feature needs a dependency group that is not installed."""

    def __init__(self, module: str, extra: str, feature: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(
            f"{feature} needs the '{module}' package: install it with "
            f"pip install 'hyprstream[{extra}]'"
        )


class ValidationError(HyprstreamError, ValueError):
    """An input was refused; the state it was meant to change is unchanged."""


class Refusal(enum.Enum):
    """Why core refused a push: a code a caller can act on, carried across the wire apart from the message."""

    INVALID = "invalid"  # the delta is not a layer table, or another malformed input
    EMPTY = "empty"  # the delta has no parameter
    REPLAY = "replay"  # a sequence number or a (base clocks, delta) pair core already committed
    UNKNOWN_PARAMETER = "unknown_parameter"
    WRONG_LAYER = "wrong_layer"  # a parameter named under another layer group than the model's
    SHAPE = "shape"
    DTYPE = "dtype"
    NOT_FINITE = "not_finite"  # NaN, Inf, or a norm that overflows
    NORM = "norm"  # above the model's max_update_norm
    UNKNOWN_BASE = "unknown_base"  # base clocks of no committed version
    CONSISTENCY = "consistency"  # the model's consistency mode refuses the merge (conflict, too stale)
    REGRESSION = "regression"  # the version would score worse than the model's best by more than its guard allows


class UpdateRejected(ValidationError):
    """Core refused a weight delta (unknown layer, wrong shape or dtype, NaN/Inf, stale base, ...);
    ``code`` says which kind of refusal it is."""

    def __init__(self, message: str, code: Refusal = Refusal.INVALID) -> None:
        super().__init__(message)
        self.code = code


class AuthError(HyprstreamError):
    """Missing, invalid or insufficient credentials."""


class AccessDenied(AuthError):
    """Valid credentials whose role may not do what was asked."""


class StoreError(HyprstreamError):
    """The local Arrow store cannot serve the request."""


class TransportError(HyprstreamError):
    """A peer could not be reached, or answered outside the protocol."""
