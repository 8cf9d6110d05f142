"""Cryptographic building blocks of secure aggregation, all from ``cryptography`` (no hand-made ciphers).

* Key agreement: X25519 key pairs; :func:`agree` runs ECDH and derives a 32-byte key with
  HKDF-SHA256 (RFC 5869, computed with the standard library's HMAC; equal to ``cryptography``'s
  ``HKDF``, tested) bound to a purpose label and the round's context (so keys never repeat across
  rounds or purposes).
* Mask expansion: :func:`expand_mask` is the AES-128-CTR keystream of a 32-byte seed (the first 16
  bytes the key, the last 16 the initial counter block), read as unsigned integers of the field's
  width; :class:`MaskStream` adds or subtracts such masks in place through reused buffers. Each seed
  is used for one round and one purpose only. AES-128 in counter mode is the usual PRG of secure
  aggregation and multi-party computation (128-bit security), and expands a quarter faster than
  AES-256, which matters: a client expands k + 1 masks of its whole input every round.
* Share transport: :func:`seal` / :func:`open_sealed` encrypt a share for one neighbour with
  ChaCha20-Poly1305 (random 96-bit nonce), with the round, sender and recipient as associated data:
  the fog that relays the ciphertext can neither read nor redirect it.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from hyprstream.errors import ValidationError

PROTOCOL = b"hyprstream.secagg/1"
MASK_PURPOSE = b"pairwise-mask"
SHARE_PURPOSE = b"share-channel"
CONFIRM_PURPOSE = b"survivor-confirmation"
KEY_BYTES = 32
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


def exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The raw X25519 secret of ``private`` and ``peer_public``; ValidationError for a degenerate key."""
    try:
        return private.exchange(load_public(peer_public))
    except ValueError as exc:  # e.g. a low-order point
        raise ValidationError(f"key agreement failed: {exc}") from None


def derive(secret: bytes, purpose: bytes, context: bytes) -> bytes:
    """A 32-byte key from an agreed ``secret``, bound to ``purpose`` and ``context``."""
    return hkdf_sha256(secret, PROTOCOL + b"|" + purpose + b"|" + context)


def derive_each(secret: bytes, purposes: tuple[bytes, ...], context: bytes) -> tuple[bytes, ...]:
    """:func:`derive` of one ``secret`` for each of ``purposes`` (the same keys), extracting once."""
    prk = hmac.digest(_HKDF_SALT, secret, "sha256")
    return tuple(hmac.digest(prk, PROTOCOL + b"|" + p + b"|" + context + b"\x01", "sha256") for p in purposes)


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """A 32-byte key shared by the two ends, bound to ``purpose`` and ``context``."""
    return derive(exchange(private, peer_public), purpose, context)


def _check_mask_args(seed: bytes, dtype: np.dtype) -> np.dtype:
    if len(seed) != KEY_BYTES:
        raise ValueError("a mask seed is 32 bytes")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"masks are uint16, uint32 or uint64, not {dtype}")
    return dtype


def _keystream(seed: bytes):
    """The mask PRG of ``seed``: AES-128-CTR keyed by its first 16 bytes, counting from its last 16 (one
    seed, one mask: no counter block is ever reused under a key)."""
    return Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor()


def expand_mask(seed: bytes, n: int, dtype: np.dtype) -> np.ndarray:
    """``n`` uniform field elements of ``dtype`` (uint16, uint32 or uint64) from the mask PRG's keystream of
    ``seed`` (AES-128-CTR, :func:`_keystream`)."""
    dtype = _check_mask_args(seed, dtype)
    # Encrypt a zeroed buffer in place: the keystream lands in the array without a copy. update_into
    # wants room for one block more than the input, hence the spare elements (dropped by the slice).
    nbytes = n * dtype.itemsize
    out = np.zeros(n + 16 // dtype.itemsize, dtype=dtype)
    view = memoryview(out).cast("B")
    _keystream(seed).update_into(view[:nbytes], view)
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
        _keystream(seed).update_into(self._zeros, self._out)
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


# -- many masks at once, the expansion spread over threads

# Threads (the caller's included) that apply_masks spreads the keystream expansion over. AES-CTR
# (``update_into``) and numpy's additions release the GIL, so on an otherwise idle multi-core device
# the masks of one client's input can expand side by side (key agreement cannot: X25519 holds the
# GIL). The default is 1, strictly single-threaded: on a shared or busy machine a helper thread only
# competes for the same cores, and a cost measured with one thread is the cost.
THREADS = 1
_MIN_PARALLEL_BYTES = 1 << 16  # below this a mask expands in microseconds: one thread
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # the process the pool's threads belong to: a forked child makes its own
_pool_lock = threading.Lock()


def _helpers() -> ThreadPoolExecutor:
    """The helper threads (made when first needed, reused; idle threads cost nothing)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hyprstream-masks")
            _pool_pid = os.getpid()
        return _pool


def _apply(acc: np.ndarray, stream: MaskStream, jobs) -> None:
    for add, seed in jobs:  # ``jobs`` may be shared between threads: each job is taken once
        (stream.add if add else stream.sub)(acc, seed)


def _apply_apart(jobs, n: int, dtype: np.dtype) -> np.ndarray | None:
    """A helper thread's share of ``jobs``, summed into a vector of its own (None when it got none)."""
    stream, part = None, None
    for add, seed in jobs:
        if stream is None:
            stream, part = MaskStream(n, dtype), np.zeros(n, dtype=dtype)
        (stream.add if add else stream.sub)(part, seed)
    if stream is not None:
        stream.close()
    return part


def apply_masks(acc: np.ndarray, jobs: Iterable[tuple[bool, bytes]], *, threads: int | None = None) -> None:
    """``acc += mask(seed)`` for each ``(True, seed)`` and ``acc -= mask(seed)`` for each ``(False, seed)``
    of ``jobs``, modulo 2**bits, in place: the same result as :class:`MaskStream`'s add / sub in any order
    (the field's addition commutes).

    With ``threads`` > 1 (default :data:`THREADS`) the masks are expanded and summed by that many
    threads at once, each helper into a zeroed vector of its own that is added into ``acc`` and wiped
    at the end; the seeds and keystreams are the same, only the order of the additions differs.
    """
    if not isinstance(acc, np.ndarray) or acc.ndim != 1:
        raise ValueError("masks are applied to a one-dimensional field vector")
    jobs = list(jobs)
    stream = MaskStream(acc.shape[0], acc.dtype)  # checks the dtype
    for job in jobs:
        if len(job[1]) != KEY_BYTES:
            raise ValueError("a mask seed is 32 bytes")
    workers = min(THREADS if threads is None else threads, len(jobs), 8) - 1
    try:
        if workers < 1 or acc.nbytes < _MIN_PARALLEL_BYTES:
            _apply(acc, stream, jobs)
            return
        shared = iter(jobs)  # next() on a list iterator is atomic under the GIL
        pool = _helpers()
        parts = [pool.submit(_apply_apart, shared, stream.n, stream.dtype) for _ in range(workers)]
        try:
            _apply(acc, stream, shared)
        finally:
            results = [f.result() for f in parts]  # waits for every helper (and re-raises its error)
        for part in results:
            if part is not None:
                np.add(acc, part, out=acc)
                part.fill(0)
    finally:
        stream.close()


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
    "THREADS",
    "agree",
    "apply_masks",
    "derive",
    "exchange",
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
