"""Cryptographic building blocks of secure aggregation, all from ``cryptography`` (no hand-made ciphers).

* Key agreement: X25519 key pairs; :func:`agree` runs ECDH and derives a 32-byte key with
  HKDF-SHA256 (RFC 5869, computed with the standard library's HMAC; equal to ``cryptography``'s
  ``HKDF``, tested) bound to a purpose label and the round's context (so keys never repeat across
  rounds or purposes).
* Mask expansion: :func:`expand_mask` is the AES-256-CTR keystream of a 32-byte seed, read as
  unsigned integers of the field's width; :class:`MaskStream` adds or subtracts such masks in place
  through reused buffers. Each seed is used for one round and one purpose only.
* Share transport: :func:`seal` / :func:`open_sealed` encrypt a share for one neighbour with
  ChaCha20-Poly1305 (random 96-bit nonce), with the round, sender and recipient as associated data:
  the fog that relays the ciphertext can neither read nor redirect it.
"""

from __future__ import annotations

import hmac
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from hyprstream.errors import ValidationError

PROTOCOL = b"hyprstream.secagg/1"
MASK_PURPOSE = b"pairwise-mask"
SHARE_PURPOSE = b"share-channel"
KEY_BYTES = 32
_ZERO_IV = bytes(16)
_HKDF_SALT = bytes(32)  # RFC 5869: no salt means HashLen zero bytes


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes_raw()


def load_private(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise ValidationError("an X25519 private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def load_public(raw: bytes) -> X25519PublicKey:
    if len(raw) != KEY_BYTES:
        raise ValidationError("an X25519 public key is 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


def hkdf_sha256(secret: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) with no salt, 32 bytes of output: one HMAC to extract, one to expand."""
    prk = hmac.digest(_HKDF_SALT, secret, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """A 32-byte key shared by the two ends, bound to ``purpose`` and ``context``."""
    try:
        shared = private.exchange(load_public(peer_public))
    except ValueError as exc:  # e.g. a low-order point
        raise ValidationError(f"key agreement failed: {exc}") from None
    return hkdf_sha256(shared, PROTOCOL + b"|" + purpose + b"|" + context)


def _check_mask_args(seed: bytes, dtype: np.dtype) -> np.dtype:
    if len(seed) != KEY_BYTES:
        raise ValueError("a mask seed is 32 bytes")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"masks are uint32 or uint64, not {dtype}")
    return dtype


def expand_mask(seed: bytes, n: int, dtype: np.dtype) -> np.ndarray:
    """``n`` uniform field elements of ``dtype`` (uint32 or uint64) from the AES-256-CTR keystream of ``seed``."""
    dtype = _check_mask_args(seed, dtype)
    # Encrypt a zeroed buffer in place: the keystream lands in the array without a copy. update_into
    # wants room for one block more than the input, hence the spare elements (dropped by the slice).
    nbytes = n * dtype.itemsize
    out = np.zeros(n + 16 // dtype.itemsize, dtype=dtype)
    view = memoryview(out).cast("B")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    enc.update_into(view[:nbytes], view)
    return out[:n]


class MaskStream:
    """Adds / subtracts masks (:func:`expand_mask`'s values) of one length and dtype into field vectors in place.

    Every mask's keystream goes into one scratch buffer, reused (no allocation per mask); the
    scratch is overwritten by the next mask and zeroed by :meth:`close`.
    """

    def __init__(self, n: int, dtype: np.dtype) -> None:
        self.n = int(n)
        self.dtype = _check_mask_args(bytes(KEY_BYTES), dtype)
        spare = 16 // self.dtype.itemsize
        nbytes = self.n * self.dtype.itemsize
        self._zeros = memoryview(np.zeros(self.n + spare, dtype=self.dtype)).cast("B")[:nbytes]
        self._buf = np.empty(self.n + spare, dtype=self.dtype)
        self._out = memoryview(self._buf).cast("B")

    def _expand(self, seed: bytes) -> np.ndarray:
        if len(seed) != KEY_BYTES:
            raise ValueError("a mask seed is 32 bytes")
        Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor().update_into(self._zeros, self._out)
        return self._buf[:self.n]

    def _check(self, acc: np.ndarray) -> None:
        if acc.dtype != self.dtype or acc.shape != (self.n,):
            raise ValueError(f"field vector {acc.dtype}{acc.shape}, masks are {self.dtype}({self.n},)")

    def add(self, acc: np.ndarray, seed: bytes) -> None:
        """``acc += mask(seed)`` modulo 2**bits, in place."""
        self._check(acc)
        np.add(acc, self._expand(seed), out=acc)

    def sub(self, acc: np.ndarray, seed: bytes) -> None:
        """``acc -= mask(seed)`` modulo 2**bits, in place."""
        self._check(acc)
        np.subtract(acc, self._expand(seed), out=acc)

    def close(self) -> None:
        self._buf.fill(0)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    if len(sealed) < 12 + 16:
        raise ValidationError("sealed share is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], associated)
    except InvalidTag:
        raise ValidationError("sealed share failed authentication (wrong sender, recipient or round)") from None


__all__ = [
    "KEY_BYTES",
    "MaskStream",
    "agree",
    "expand_mask",
    "hkdf_sha256",
    "load_private",
    "load_public",
    "new_private_key",
    "open_sealed",
    "private_bytes",
    "public_bytes",
    "seal",
]
