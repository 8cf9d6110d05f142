"""Errors of the privacy package: where they sit in Hyprstream's one exception tree.

    HyprstreamError
    +-- ValidationError
    |   +-- PrivacyViolation     a privacy rule would break: the operation was refused, nothing changed
    |       +-- BudgetExceeded   training would spend more privacy budget than the device or model has
    |       +-- RangeOverflow    a value does not fit the range the secure-aggregation field was sized for
    +-- SecAggAborted            a secure-aggregation round cannot complete (too few clients or shares,
                                 a stage timed out); no partial or unmasked result is released

Every one of them is raised on purpose and says why in one line; an agent that catches
``HyprstreamError`` around training turns it into a ``declined`` reply with that line as the reason.
"""

from __future__ import annotations

from hyprstream.errors import HyprstreamError, ValidationError


class PrivacyViolation(ValidationError):
    """Doing what was asked would break a privacy rule; it was refused."""


class BudgetExceeded(PrivacyViolation):
    """The privacy budget would be exceeded; ``spent`` and ``budget`` are epsilons at the ledger's delta."""

    def __init__(self, message: str, *, spent: float, would_be: float, budget: float) -> None:
        self.spent = spent
        self.would_be = would_be
        self.budget = budget
        super().__init__(message)


class RangeOverflow(PrivacyViolation):
    """A quantized value lies outside the range the modular field was configured for."""


class SecAggAborted(HyprstreamError):
    """A secure-aggregation round stopped; nothing was unmasked or released."""


__all__ = ["BudgetExceeded", "PrivacyViolation", "RangeOverflow", "SecAggAborted"]
