"""Imports of optional dependency groups, failing with a message that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from hyprstream.errors import MissingExtraError


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the module exists but one of its own imports is broken: show that
        raise MissingExtraError(module, extra, feature) from exc
