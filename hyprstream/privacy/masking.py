"""Cryptographic building blocks of secure aggregation, all from ``cryptography`` (no hand-made ciphers).

* Key agreement: X25519 key pairs; :func:`agree` runs ECDH and derives a 32-byte key with
  HKDF-SHA256 bound to a purpose label and the round's context (so keys never repeat across rounds
  or purposes).
* Mask expansion: :func:`expand_mask` is the AES-256-CTR keystream of a 32-byte seed, read as
  unsigned integers of the field's width. Each seed is used for one round and one purpose only.
* Share transport: :func:`seal` / :func:`open_sealed` encrypt a share for one neighbour with
  ChaCha20-Poly1305 (random 96-bit nonce), with the round, sender and recipient as associated data:
  the fog that relays the ciphertext can neither read nor redirect it.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hyprstream.errors import ValidationError

PROTOCOL = b"hyprstream.secagg/1"
MASK_PURPOSE = b"pairwise-mask"
SHARE_PURPOSE = b"share-channel"
KEY_BYTES = 32
_ZERO_IV = bytes(16)


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


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """A 32-byte key shared by the two ends, bound to ``purpose`` and ``context``."""
    try:
        shared = private.exchange(load_public(peer_public))
    except ValueError as exc:  # e.g. a low-order point
        raise ValidationError(f"key agreement failed: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=PROTOCOL + b"|" + purpose + b"|" + context).derive(shared)


def expand_mask(seed: bytes, n: int, dtype: np.dtype) -> np.ndarray:
    """``n`` uniform field elements of ``dtype`` (uint32 or uint64) from the AES-256-CTR keystream of ``seed``."""
    if len(seed) != KEY_BYTES:
        raise ValueError("a mask seed is 32 bytes")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"masks are uint32 or uint64, not {dtype}")
    # Encrypt a zeroed buffer in place: the keystream lands in the array without a copy. update_into
    # wants room for one block more than the input, hence the spare elements (dropped by the slice).
    nbytes = n * dtype.itemsize
    out = np.zeros(n + 16 // dtype.itemsize, dtype=dtype)
    view = memoryview(out).cast("B")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    enc.update_into(view[:nbytes], view)
    return out[:n]


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
    "agree",
    "expand_mask",
    "load_private",
    "load_public",
    "new_private_key",
    "open_sealed",
    "private_bytes",
    "public_bytes",
    "seal",
]
