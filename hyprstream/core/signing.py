"""Ed25519 signing keys of core: the audit-log key and the token key.

Keys are PEM files (PKCS#8 private keys, SubjectPublicKeyInfo public keys) made with ``cryptography``.
Private keys are created with mode 0600 and never overwritten; errors name the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hyprstream import durable
from hyprstream.errors import ConfigError

__all__ = [
    "Ed25519PrivateKey", "Ed25519PublicKey", "b64decode", "b64encode", "fingerprint", "generate_key", "load_private_key",
    "load_public_key", "public_key_from_text", "public_key_text", "verify",
    "write_private_key", "write_public_key",
]


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def b64encode(data: bytes, *, urlsafe: bool = False) -> str:
    """``data`` as base64 text: standard and padded, or (``urlsafe``) base64url without padding."""
    if urlsafe:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    return base64.b64encode(data).decode()


def b64decode(text: str, *, urlsafe: bool = False) -> bytes:
    """The bytes of ``text`` if it is exactly what :func:`b64encode` writes for them; ValueError otherwise.

    Every signature, key and token part is read through here. Plain decoding ignores the unused low
    bits of the last digit (and tolerates missing padding), so several texts decode to the same bytes;
    accepting only the canonical one makes every changed character of a signed record detectable.
    """
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not canonical base64: not ASCII text")
    try:
        padded = text + "=" * (-len(text) % 4) if urlsafe else text
        data = base64.b64decode(padded, altchars=b"-_" if urlsafe else None, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not canonical base64: {exc}") from None
    if b64encode(data, urlsafe=urlsafe) != text:
        raise ValueError("not canonical base64: another spelling of the same bytes")
    return data


def public_key_text(key: Ed25519PublicKey) -> str:
    """The 32 raw public-key bytes, base64 (how audit entries and checkpoints name a key)."""
    return b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def public_key_from_text(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(b64decode(text))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a base64 Ed25519 public key: {exc}") from None


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``sha256:<first 16 hex digits>`` of the raw public key: short, printable, stable."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def write_private_key(path: str | os.PathLike[str], key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    durable.write_private_file(path, pem)


def write_public_key(path: str | os.PathLike[str], key: Ed25519PublicKey) -> None:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    durable.write_public_file(path, pem)


def _read(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("key file not found", source=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read key file: {exc.strerror or exc}", source=str(p)) from None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; refuses files readable by group or others."""
    p = Path(path)
    data = _read(p)
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"private key is accessible by group or others (mode {mode:o}): chmod 600 it",
                          source=str(p))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a PEM private key: {exc}", source=str(p)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("expected an Ed25519 private key", source=str(p))
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (a private key file gives its public half)."""
    data = _read(path)
    try:
        if b"PRIVATE KEY" in data:
            key = load_private_key(path).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a PEM public key: {exc}", source=str(path)) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("expected an Ed25519 public key", source=str(path))
    return key
