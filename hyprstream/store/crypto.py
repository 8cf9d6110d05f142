"""Encryption at rest for store segments and the write-ahead log (AES-256-GCM).

Every encrypted blob is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``, with a fresh random
nonce per blob and associated data that binds it to its place (segment file name, WAL sequence
number), so a blob moved to another place fails to decrypt. The manifest (table names, schemas,
row counts, time ranges) is not encrypted.

Files kept beside a store (an agent's saved models and ONNX exports) are sealed with the same cipher:
:func:`seal` prefixes the blob with :data:`SEALED_MAGIC`, so :func:`unseal` tells an encrypted file from a
plain one and refuses either where the other is expected.

Keys are 32 random bytes. :func:`load_key` reads one from a file or an environment variable, as raw
bytes, 64 hex digits or base64 text.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hyprstream.errors import StoreError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
KEY_ENV_VAR = "HYPRSTREAM_STORE_KEY"
_CHECK_PLAINTEXT = b"hyprstream.store key check"
SEALED_MAGIC = b"HSSEALED1\n"


class Cipher:
    """AES-256-GCM over whole blobs, with place-binding associated data."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise StoreError(f"store encryption key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    def encrypt(self, data: bytes | memoryview, aad: bytes) -> bytes:
        """``nonce || AES-GCM(data)`` bound to ``aad``."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, bytes(data), aad)

    def decrypt(self, blob: bytes | memoryview, aad: bytes, *, what: str) -> bytes:
        """Inverse of :meth:`encrypt`; StoreError naming ``what`` when the key or data is wrong."""
        blob = memoryview(blob)
        if len(blob) < OVERHEAD:
            raise StoreError(f"{what}: encrypted data is truncated")
        try:
            return self._aead.decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), aad)
        except InvalidTag:
            raise StoreError(f"{what}: cannot decrypt (wrong key or corrupted data)") from None

    def key_check(self) -> bytes:
        """A token that only this key decrypts, kept in the store marker to detect a wrong key."""
        return self.encrypt(_CHECK_PLAINTEXT, b"key-check")

    def verify_key_check(self, token: bytes, *, store: str) -> None:
        """Raise StoreError when ``token`` was not made by :meth:`key_check` with this key."""
        try:
            self.decrypt(token, b"key-check", what=store)
        except StoreError:
            raise StoreError(f"{store}: wrong encryption key for this store") from None


def seal(data: bytes | memoryview, cipher: Cipher, *, aad: bytes) -> bytes:
    """The bytes of a sealed file: :data:`SEALED_MAGIC` then ``data`` encrypted and bound to ``aad``."""
    return SEALED_MAGIC + cipher.encrypt(data, aad)


def unseal(blob: bytes, cipher: Cipher | None, *, aad: bytes, what: str) -> bytes:
    """The contents of a file written plain (``cipher`` None) or with :func:`seal` (``cipher`` given).

    StoreError naming ``what`` when a sealed file is read without a key, a plain file where a sealed
    one is expected (a file put in place of an encrypted one), or the key, place or data are wrong.
    """
    sealed = blob.startswith(SEALED_MAGIC)
    if cipher is None:
        if sealed:
            raise StoreError(f"{what}: file is encrypted; the store key is needed to read it")
        return blob
    if not sealed:
        raise StoreError(f"{what}: file is not encrypted, but the store is (refusing a plaintext file)")
    return cipher.decrypt(memoryview(blob)[len(SEALED_MAGIC):], aad, what=what)


def generate_key() -> bytes:
    """A fresh random 256-bit key."""
    return os.urandom(KEY_BYTES)


def parse_key(text: bytes, *, source: str) -> bytes:
    """A key from raw bytes, hex or base64 text; StoreError naming ``source`` otherwise."""
    if len(text) == KEY_BYTES:
        return bytes(text)
    stripped = text.strip()
    for decode in (binascii.unhexlify, lambda s: base64.b64decode(s, validate=True)):
        try:
            key = decode(stripped)
        except (binascii.Error, ValueError):
            continue
        if len(key) == KEY_BYTES:
            return key
    raise StoreError(f"{source}: not a {KEY_BYTES}-byte key (raw, 64 hex digits or base64)")


def load_key(key_file: str | os.PathLike[str] | None = None, *, env_var: str = KEY_ENV_VAR) -> bytes | None:
    """The store key from ``key_file`` if given, else from ``env_var`` if set, else None."""
    if key_file is not None:
        path = Path(key_file)
        try:
            return parse_key(path.read_bytes(), source=str(path))
        except OSError as exc:
            raise StoreError(f"{path}: cannot read key file: {exc.strerror}") from exc
    value = os.environ.get(env_var)
    if value is None:
        return None
    return parse_key(value.encode(), source=f"environment variable {env_var}")
