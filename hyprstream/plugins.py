"""Code that installed packages offer hyprstream: tasks (group ``hyprstream.tasks``) and aggregation rules
(group ``hyprstream.aggregators``), found through Python entry points, or named in an operator's config as
``module:attribute``.

Loading runs the plugin's import, so whatever it raises is reported as a :class:`ValidationError` naming
the plugin, where it came from and what went wrong; the caller then checks that the object is what its
group promises.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from hyprstream.errors import ValidationError

_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def entry_points(group: str) -> dict[str, Any]:
    """The entry points of ``group`` on the path now, by name."""
    from importlib.metadata import entry_points as installed

    return {ep.name: ep for ep in installed(group=group)}


def load_entry_point(kind: str, name: str, entry_point) -> tuple[Any, str]:
    """The object ``entry_point`` names and a phrase that names it in errors (``kind`` ``name`` (value,
    from distribution version))."""
    where = f"{kind} {name!r} ({entry_point.value}"
    dist = getattr(entry_point, "dist", None)
    where += f", from {dist.name} {dist.version})" if dist is not None else ")"
    try:
        return entry_point.load(), where
    except Exception as exc:  # noqa: BLE001 -- whatever the plugin raised, said with its name
        raise ValidationError(f"{where} does not load: {type(exc).__name__}: {exc}") from None


def is_reference(text: str) -> bool:
    """Whether ``text`` reads ``package.module:attribute``."""
    return bool(_REFERENCE.match(text))


def load_reference(kind: str, ref: str) -> tuple[Any, str]:
    """The object at ``ref`` (``package.module:attribute``, attributes may be dotted) and a phrase that
    names it in errors."""
    where = f"{kind} {ref!r}"
    if not is_reference(ref):
        raise ValidationError(f"{where} is not of the form package.module:attribute")
    module, _, attribute = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 -- an import error, a missing attribute, or the module's own error
        raise ValidationError(f"{where} does not load: {type(exc).__name__}: {exc}") from None
    return obj, where


__all__ = ["entry_points", "is_reference", "load_entry_point", "load_reference"]
