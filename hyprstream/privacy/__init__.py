"""Privacy mechanisms as pure, testable pieces, and the device-side wrappers that wire them in (the fog's
side of secure aggregation and client-level DP is :mod:`hyprstream.fog.secure`).

What users import (see docs/privacy.md for the guarantees, assumptions and threat model):

* configuration: :class:`PrivacyConfig` (the ``[privacy]`` sections) and :func:`parse_privacy`;
* agent: :data:`secagg_mod` / :func:`make_secagg_mod` (client middleware for ``train.secagg``),
  :class:`DpSgdTrainer` (Opacus DP-SGD of the trained layers, charged to the device's ledger);
* accounting: :class:`PldAccountant` (the ledger's), :class:`RdpAccountant`, :class:`GaussianEvent`,
  :class:`PrivacyLedger`, :class:`Budget`;
* errors: :class:`PrivacyViolation`, :class:`BudgetExceeded`, :class:`RangeOverflow`, :class:`SecAggAborted`.

Heavy parts load lazily: Opacus only when DP-SGD trains, Flower's records only with the secure-aggregation
wire format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hyprstream.privacy.accountant import GaussianEvent, PldAccountant, RdpAccountant
from hyprstream.privacy.config import PrivacyConfig, parse_privacy
from hyprstream.privacy.errors import BudgetExceeded, PrivacyViolation, RangeOverflow, SecAggAborted
from hyprstream.privacy.ledger import Budget, PrivacyLedger

if TYPE_CHECKING:  # pragma: no cover
    from hyprstream.privacy.dpsgd import DpSgdTrainer
    from hyprstream.privacy.secagg_mod import make_secagg_mod, secagg_mod

_LAZY = {
    "secagg_mod": "hyprstream.privacy.secagg_mod",
    "make_secagg_mod": "hyprstream.privacy.secagg_mod",
    "DpSgdTrainer": "hyprstream.privacy.dpsgd",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hyprstream.privacy' has no attribute {name!r}")


__all__ = [
    "Budget",
    "BudgetExceeded",
    "DpSgdTrainer",
    "GaussianEvent",
    "PldAccountant",
    "PrivacyConfig",
    "PrivacyLedger",
    "PrivacyViolation",
    "RangeOverflow",
    "RdpAccountant",
    "SecAggAborted",
    "make_secagg_mod",
    "parse_privacy",
    "secagg_mod",
]
