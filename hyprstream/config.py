"""Typed, frozen configuration objects parsed from TOML and validated once, at start-up.

A component declares its configuration as frozen dataclasses whose fields carry their constraints
(:func:`setting`). :func:`parse` turns a TOML table into that object or raises
:class:`~hyprstream.errors.ConfigError` naming the file, the dotted key path and the reason. Unknown
keys are errors too: a misspelt threshold must not silently fall back to its default.

Logic never reads raw dictionaries: it receives the parsed object.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from hyprstream.errors import ConfigError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    doc: str = "",
    file: Callable[[str], object] | None = None,
) -> Any:
    """A config field with optional numeric bounds. Without ``default`` the key is required.

    ``file`` marks a field naming a file (or a tuple of files) that must exist and load: it is the
    loader, called with the path by :func:`check_files` (such as :func:`pem_certificate`), which
    raises ConfigError naming the file.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc, "file": file}
    if isinstance(default, (dict, list)):
        raise TypeError("mutable defaults: use a tuple or a default_factory dataclass")
    if dataclasses.is_dataclass(default) or getattr(type(default), "__hash__", None) is None:
        # read-only but unhashable defaults (nested configs, MappingProxyType) are shared, not copied
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Checked:
    """Mixin for cross-field rules: ``check`` yields ``(key, reason)`` for each broken rule."""

    def check(self) -> Iterator[tuple[str, str]]:
        return iter(())


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error becomes a ConfigError."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(p)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a TOML file", source=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(p)) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError("invalid TOML: nested too deeply", source=str(p)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", source=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(p)) from None


def read_file(path: str | Path) -> bytes:
    """The bytes of a regular, readable file; ConfigError naming it otherwise."""
    p = Path(path)
    try:
        if not p.is_file():
            raise ConfigError("not a regular file" if p.exists() else "file not found", source=str(p))
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(p)) from None


def pem_certificate(path: str | Path) -> list[x509.Certificate]:
    """The certificates of a PEM file (a chain, or a CA bundle)."""
    try:
        return x509.load_pem_x509_certificates(read_file(path))
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {_first_sentence(exc)}", source=str(path)) from None


def pem_private_key(path: str | Path) -> object:
    """The (unencrypted) private key of a PEM file."""
    try:
        return serialization.load_pem_private_key(read_file(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"not a PEM private key: {_first_sentence(exc)}", source=str(path)) from None


def read_token(path: str | Path) -> str:
    """The text of a token (or password) file, without surrounding white space; it must not be empty."""
    try:
        token = read_file(path).decode().strip()
    except UnicodeDecodeError:
        raise ConfigError("the token file is not UTF-8 text", source=str(path)) from None
    if not token:
        raise ConfigError("the token file is empty", source=str(path))
    return token


def _first_sentence(exc: Exception) -> str:
    return str(exc).split(". ")[0].rstrip(".")


def check_files(obj: Any, *, source: str | None = None, key: str = "") -> None:
    """Load every file that ``obj`` (a parsed config) names in a ``setting(file=...)`` field.

    Empty and None values are settings left unset. The first file that is missing, not a regular
    file, unreadable or not what its field holds raises ConfigError naming the config ``source``, the
    key path, the file and the reason.
    """
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), _join(key, f.name)
        if dataclasses.is_dataclass(value):
            check_files(value, source=source, key=path)
            continue
        loader = f.metadata.get("file")
        if loader is None or not value:
            continue
        for i, name in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
            try:
                loader(name)
            except ConfigError as exc:
                where = path if i is None else f"{path}[{i}]"
                raise ConfigError(f"{exc.source or name}: {exc.reason}", source=source, key=where) from None


def load(cls: type[T], path: str | Path, *, ignore: tuple[str, ...] = ()) -> T:
    """Read ``path`` and parse it as ``cls``; ``ignore`` lists top-level keys to leave out."""
    data = read_toml(path)
    return parse(cls, {k: v for k, v in data.items() if k not in ignore}, source=str(path))


def parse(cls: type[T], data: Mapping[str, Any], *, source: str | None = None, key: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, validating every value."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table, got {_type_name(data)}", source=source, key=key or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(
            f"unknown key (known keys: {known})", source=source, key=_join(key, unknown[0])
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        path = _join(key, name)
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError("required key is missing", source=source, key=path)
            continue
        value = _convert(hints[name], data[name], source=source, key=path)
        _check_bounds(f.metadata, value, source=source, key=path)
        values[name] = value
    obj = cls(**values)
    if isinstance(obj, Checked):
        for sub, reason in obj.check():
            raise ConfigError(reason, source=source, key=_join(key, sub))
    return obj


def to_dict(obj: Any) -> Any:
    """The plain TOML-compatible form of a config object (enums by value, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a float"}.get(type(value), type(value).__name__)


def _convert(tp: Any, value: Any, *, source: str | None, key: str) -> Any:
    def fail(reason: str) -> ConfigError:
        return ConfigError(reason, source=source, key=key)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:
            return _convert(options[0], value, source=source, key=key)
        raise TypeError(f"unsupported union type {tp!r}")
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, source=source, key=key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if not any(type(value) is type(v) and value == v for v in allowed):
            raise fail(f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"expected true or false, got {_type_name(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {_type_name(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"expected a number, got {_type_name(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise fail(f"number out of range, got {value}") from None
        if not math.isfinite(number):
            raise fail(f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise fail(f"expected a string, got {_type_name(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise fail(f"expected an array, got {_type_name(value)}")
        item = args[0]
        return tuple(_convert(item, v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise fail(f"expected a table, got {_type_name(value)}")
        kt, vt = args
        if kt is not str:
            raise TypeError("config mappings must have string keys")
        return types.MappingProxyType(
            {k: _convert(vt, v, source=source, key=_join(key, k)) for k, v in value.items()}
        )
    raise TypeError(f"unsupported config type {tp!r} at {key}")


_COMPARE = {
    "ge": lambda v, b: v >= b,
    "gt": lambda v, b: v > b,
    "le": lambda v, b: v <= b,
    "lt": lambda v, b: v < b,
}


def _check_bounds(meta: Mapping[str, Any], value: Any, *, source: str | None, key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        bound = meta.get(name)
        if bound is not None and not _COMPARE[name](value, bound):
            raise ConfigError(f"must be {op} {bound}, got {value}", source=source, key=key)
