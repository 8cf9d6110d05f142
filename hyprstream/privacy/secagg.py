"""SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova 2020): the protocol's math and state, no I/O.

Clients are numbered 1..n for the round (their *index*; Shamir shares are evaluated there). The fog
(:class:`SecAggServer`) links them in a sparse random graph -- a Harary ring of even degree k over a
random permutation, as in the paper -- and each client (:class:`SecAggClient`) only talks (through
the fog) to its k neighbours. Five stages:

0. **advertise**: client u makes two X25519 key pairs, c_u (share channel) and s_u (pairwise masks),
   and a 32-byte self-mask seed b_u; it sends the public keys, a SHA-256 commitment to b_u and its
   identity's credential (:mod:`~hyprstream.privacy.identity`).
1. **share**: u gets its neighbours' adverts and checks each credential (a certificate from the
   deployment CA). For each neighbour v it agrees the pair's secret ``ECDH(c_u, c_v) ||
   ECDH(id_u, id_v)``: the ephemeral half makes it new each round, the static identity half makes it
   a secret of u and v alone, whatever keys the fog relays. From it come the share-channel key and
   the confirmation key. u Shamir-shares b_u and s_u's private key among its neighbours (threshold t)
   and sends each neighbour's two shares sealed (ChaCha20-Poly1305) under the channel key, with a
   digest of u's own advert as associated data; the fog only relays ciphertexts.
2. **mask**: u gets the sealed shares addressed to it; the senders are the neighbours it masks
   with. Each must open under the pair's channel key with the digest of the sender's advert *as
   relayed to u*: a key the fog substituted in either direction fails here, before u masks. u sends
   ``y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)`` modulo 2**bits, where
   s_uv = HKDF(ECDH(s_u, s_v)). The fog adds y_u into a running sum at once.
3. **consistency** (Bonawitz et al. 2017, "ConsistencyCheck"): the fog sends every survivor the set
   U3 of clients whose masked input it holds; u answers, once, with one MAC of (round, u, U3) per
   surviving neighbour, under that pair's confirmation key.
4. **unmask**: the fog forwards to u its neighbours' MACs for u; u reveals only when at least t of
   them are valid on the very U3 it confirmed, and then derives what to reveal from U3 itself: its
   share of b_v for neighbours v in U3 and of s_v's private key for those not in U3 -- never both
   for one client. The fog rebuilds each survivor's b_v and removes PRG(b_v), rebuilds each dropped
   client's s_v and removes the pairwise masks its survivors added for it.

What remains is exactly the sum of the survivors' inputs: pairwise masks cancel between survivors.
Clients dropping after their masked input (before or during unmasking) are recovered as long as t
of each one's neighbours answer. A stage that cannot meet its threshold raises
:class:`~hyprstream.privacy.errors.SecAggAborted` and releases nothing.

Threshold: t is a strict majority of the k neighbours (t >= floor(k/2) + 1; client and server refuse
less). A client's shares are held by its k neighbours only, each of which answers one unmask request
and reveals one kind of share per peer; two disjoint sets of holders cannot both reach t when 2t > k,
so a fog that tells some holders a client survived and others that it dropped never gets both its
self-mask seed and its mask key.

Threat model (see docs/privacy.md): clients follow the protocol; the fog may drop, delay, reorder or
forge any message it relays. With certified identities (the deployment CA) the fog cannot substitute a
neighbour's keys nor forge a confirmation of a survivor set: both are authenticated by a secret only the
two neighbours can compute (one X25519 agreement of their static keys per pair, no signatures).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hyprstream.errors import ValidationError
from hyprstream.privacy import masking, shamir
from hyprstream.privacy.errors import SecAggAborted
from hyprstream.privacy.identity import DeviceIdentity
from hyprstream.privacy.noise import RandomSource
from hyprstream.privacy.quantize import field_add

ROUND_ID_BYTES = 16
_PLAIN = 8 + 2 * shamir.SHARE_BYTES  # src, dst (4 bytes each) and the two shares
TAG_BYTES = 32  # HMAC-SHA256 of a survivor set


# ------------------------------------------------------------------------------------------------
# graph


def plan_graph(n: int, *, threshold_fraction: float = 0.5, expected_dropout: float = 0.1,
               failure_probability: float = 1e-6, degree: int | None = None) -> tuple[int, int]:
    """(degree k, threshold t) for ``n`` clients.

    ``t = min(k, floor(threshold_fraction * k) + 1)``: more than ``threshold_fraction`` of the k
    neighbours, so with the fraction at least 0.5 a strict majority (:func:`majority`). Without ``degree``, k is the smallest even
    degree, at least ``2 * ceil(log2 n)`` (the paper's O(log n) connectivity), such that when each
    client independently drops with probability ``expected_dropout`` the chance that *any* client
    keeps fewer than t of its k neighbours is below ``failure_probability`` (binomial tail, union
    bound over the n clients). k is capped at n - 1 (the complete graph: original SecAgg).
    """
    if n < 2:
        raise ValidationError("secure aggregation needs at least 2 clients")
    if not 0.5 <= threshold_fraction <= 1:
        raise ValidationError(f"threshold_fraction must lie in [0.5, 1], got {threshold_fraction}: a threshold "
                              "of half the neighbourhood or less lets a fog that lies about who dropped "
                              "collect both kinds of a client's shares")
    if not 0 <= expected_dropout < 1:
        raise ValidationError(f"expected_dropout must lie in [0, 1), got {expected_dropout}")

    def threshold(k: int) -> int:
        return min(k, math.floor(threshold_fraction * k) + 1)

    if degree is not None:
        if degree < 1:
            raise ValidationError("degree must be >= 1")
        k = min(n - 1, degree + degree % 2)
        return k, threshold(k)
    k = min(n - 1, 2 * math.ceil(math.log2(n)))
    k += k % 2 if k < n - 1 else 0
    while k < n - 1:
        t = threshold(k)
        keep = 1.0 - expected_dropout
        tail = sum(math.comb(k, j) * keep ** j * expected_dropout ** (k - j) for j in range(t))
        if n * tail <= failure_probability:
            break
        k = min(n - 1, k + 2)
    return k, threshold(k)


def majority(k: int) -> int:
    """The smallest threshold two disjoint sets of a client's k share holders cannot both reach."""
    return k // 2 + 1


def harary_graph(n: int, degree: int, source: RandomSource) -> dict[int, tuple[int, ...]]:
    """Neighbours (indices 1..n) in a Harary ring of degree ``degree`` (even, or n - 1) over a random permutation."""
    if degree >= n - 1:
        return {i: tuple(j for j in range(1, n + 1) if j != i) for i in range(1, n + 1)}
    if degree < 2 or degree % 2:
        raise ValidationError(f"a sparse SecAgg+ graph needs an even degree >= 2, got {degree}")
    # Fisher-Yates with the source's uniform draws
    order = list(range(1, n + 1))
    u = source.uniform(n)
    for i in range(n - 1, 0, -1):
        j = min(i, int(u[i] * (i + 1)))
        order[i], order[j] = order[j], order[i]
    half = degree // 2
    out: dict[int, tuple[int, ...]] = {}
    for pos, node in enumerate(order):
        out[node] = tuple(sorted(order[(pos + d) % n] for d in range(-half, half + 1) if d != 0))
    return out


# ------------------------------------------------------------------------------------------------
# messages (pure records; their Flower form is in secagg_messages.py)


@dataclass(frozen=True)
class KeyAdvert:
    enc_key: bytes  # c_u public key (share channel)
    mask_key: bytes  # s_u public key (pairwise masks)
    commitment: bytes  # SHA-256 of the round, the index and b_u
    credential: bytes = b""  # the identity: a CA-issued certificate (DER) or, uncertified, the raw key


@dataclass(frozen=True)
class NeighbourKeys:
    adverts: Mapping[int, KeyAdvert]  # neighbour index -> its keys


@dataclass(frozen=True)
class SealedShares:
    sealed: Mapping[int, bytes]  # recipient index -> ciphertext (from the sender)


@dataclass(frozen=True)
class MaskedInput:
    vector: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class UnmaskRequest:
    tags: Mapping[int, bytes]  # neighbour index -> its MAC, for the recipient, on the survivor set


@dataclass(frozen=True)
class UnmaskShares:
    self_mask: Mapping[int, bytes]  # survivor index -> this client's share of its b
    mask_key: Mapping[int, bytes]  # dropped index -> this client's share of its s private key


def _idx(i: int) -> bytes:
    return int(i).to_bytes(4, "big")


def _pair_context(round_id: bytes, a: int, b: int) -> bytes:
    return round_id + struct.pack(">II", a, b) if a < b else round_id + struct.pack(">II", b, a)


def _commit(round_id: bytes, index: int, seed: bytes) -> bytes:
    return hashlib.sha256(masking.PROTOCOL + b"|commit|" + round_id + _idx(index) + seed).digest()


def _associated(round_id: bytes, src: int, dst: int) -> bytes:
    return masking.PROTOCOL + b"|share|" + round_id + _idx(src) + _idx(dst)


def _advert_digest(round_id: bytes, index: int, enc_key: bytes, mask_key: bytes, commitment: bytes) -> bytes:
    return hashlib.sha256(masking.PROTOCOL + b"|advert|" + round_id + _idx(index) + enc_key + mask_key
                          + commitment).digest()


def _survivors_bytes(survivors: Sequence[int]) -> bytes:
    return struct.pack(f">{len(survivors)}I", *survivors)


def _survivors_tag(key: bytes, round_id: bytes, index: int, survivors: bytes) -> bytes:
    """Client ``index``'s MAC of the survivor set (:func:`_survivors_bytes`) under one pair's confirmation key."""
    return hmac.digest(key, masking.PROTOCOL + b"|survivors|" + round_id + _idx(index) + survivors, "sha256")


# ------------------------------------------------------------------------------------------------
# client


class SecAggClient:
    """One client's side of one round. Stages must be called in order, each once.

    ``identity`` authenticates this client to its neighbours (its static key enters each pair's keys)
    and vouches for their credentials (:class:`~hyprstream.privacy.identity.DeviceIdentity`); default:
    an uncertified per-round key."""

    STAGES = ("new", "advertised", "shared", "masked", "confirmed", "done")

    def __init__(self, round_id: bytes, index: int, neighbours: Sequence[int], threshold: int, dim: int,
                 dtype: np.dtype, identity: DeviceIdentity | None = None) -> None:
        if len(round_id) != ROUND_ID_BYTES:
            raise ValidationError(f"round id must be {ROUND_ID_BYTES} bytes")
        nb = tuple(sorted(int(v) for v in neighbours))
        if index < 1 or index in nb or len(set(nb)) != len(nb) or any(v < 1 for v in nb):
            raise ValidationError("bad secure-aggregation neighbourhood")
        if not majority(len(nb)) <= threshold <= len(nb):
            raise ValidationError(f"secure aggregation: threshold {threshold} with {len(nb)} neighbours is not a "
                                  f"strict majority (at least {majority(len(nb))}): a fog could collect both kinds "
                                  "of my shares")
        self.round_id = round_id
        self.index = index
        self.neighbours = nb
        self.threshold = threshold
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.identity = identity or DeviceIdentity.uncertified()
        self.stage = "new"
        self._enc_sk: bytes = b""
        self._mask_sk: bytes = b""
        self._own_public: tuple[bytes, bytes] = (b"", b"")  # (enc, mask) public keys, as advertised
        self._seed: bytes = b""
        self._peer_mask_keys: dict[int, bytes] = {}  # neighbour -> its mask public key (from the share stage)
        self._peer_digests: dict[int, bytes] = {}  # neighbour -> digest of its advert as relayed to this client
        self._channels: dict[int, bytes] = {}  # neighbour -> share-channel key (agreed once per pair)
        self._confirm: dict[int, bytes] = {}  # neighbour -> confirmation key (agreed with the channel key)
        self._masked_with: tuple[int, ...] = ()
        self._survivors: tuple[int, ...] = ()  # the survivor set this client confirmed
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (share of b, share of s key)

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise ValidationError(f"secure aggregation: stage out of order (client is at {self.stage!r})")

    def advertise(self) -> KeyAdvert:
        self._expect("new")
        enc, mask = masking.new_private_key(), masking.new_private_key()
        self._enc_sk, self._mask_sk = masking.private_bytes(enc), masking.private_bytes(mask)
        self._own_public = (masking.public_bytes(enc), masking.public_bytes(mask))
        self._seed = os.urandom(shamir.SECRET_BYTES)
        self.stage = "advertised"
        commitment = _commit(self.round_id, self.index, self._seed)
        return KeyAdvert(*self._own_public, commitment, self.identity.credential)

    def share(self, keys: NeighbourKeys, known: MutableMapping[bytes, bytes] | None = None) -> SealedShares:
        """Shares of this client's secrets, sealed for each neighbour. ``known``: the identity's static
        agreements remembered from earlier rounds (:meth:`DeviceIdentity.agree`), updated in place."""
        self._expect("advertised")
        peers = sorted(keys.adverts)
        if not set(peers) <= set(self.neighbours):
            raise ValidationError("secure aggregation: keys of clients that are not my neighbours")
        if len(peers) < self.threshold:
            raise ValidationError(f"secure aggregation: {len(peers)} neighbour(s) left, threshold {self.threshold}")
        own = set(self._own_public)
        seen: set[bytes] = set()
        identities: dict[int, bytes] = {}  # neighbour -> its verified identity public key
        seen_ids = {self.identity.public}
        for v in peers:
            adv = keys.adverts[v]
            if adv.enc_key in own or adv.mask_key in own or adv.enc_key in seen or adv.mask_key in seen:
                raise ValidationError("secure aggregation: repeated public keys")
            seen.update((adv.enc_key, adv.mask_key))
            public = self.identity.verify_peer(adv.credential)
            if public in seen_ids:
                raise ValidationError("secure aggregation: one identity advertised for two clients")
            seen_ids.add(public)
            identities[v] = public
        b_shares = shamir.split(self._seed, self.threshold, peers)
        s_shares = shamir.split(self._mask_sk, self.threshold, peers)
        enc = masking.load_private(self._enc_sk)
        own = _advert_digest(self.round_id, self.index, *self._own_public, _commit(self.round_id, self.index, self._seed))
        sealed = {}
        for v in peers:
            adv = keys.adverts[v]
            # the pair's secret: new each round (ephemeral c keys), known to u and v alone (static identities)
            secret = masking.exchange(enc, adv.enc_key) + self.identity.agree(identities[v], known)
            context = _pair_context(self.round_id, self.index, v)
            self._channels[v], self._confirm[v] = masking.derive_each(
                secret, (masking.SHARE_PURPOSE, masking.CONFIRM_PURPOSE), context)
            self._peer_digests[v] = _advert_digest(self.round_id, v, adv.enc_key, adv.mask_key, adv.commitment)
            plain = _idx(self.index) + _idx(v) + b_shares[v] + s_shares[v]
            sealed[v] = masking.seal(self._channels[v], plain, _associated(self.round_id, self.index, v) + own)
        self._peer_mask_keys = {v: a.mask_key for v, a in keys.adverts.items()}
        self._enc_sk = b""  # the channel keys are derived: the private key is not needed any more
        self.stage = "shared"
        return SealedShares(sealed)

    def mask(self, inbox: SealedShares, encoded: np.ndarray) -> MaskedInput:
        """The masked input; ``inbox.sealed`` maps each sender's index to its ciphertext for this client."""
        self._expect("shared")
        x = np.asarray(encoded)
        if x.dtype != self.dtype or x.shape != (self.dim,):
            raise ValidationError(f"input must be {self.dtype} of length {self.dim}, got {x.dtype}{x.shape}")
        senders = sorted(inbox.sealed)
        if not set(senders) <= set(self._peer_mask_keys):
            raise ValidationError("secure aggregation: shares from clients I did not share keys with")
        if len(senders) < self.threshold:
            raise ValidationError(f"secure aggregation: {len(senders)} neighbour(s) left, threshold {self.threshold}")
        for v in senders:
            # a sender's advert that the fog altered on its way to this client fails authentication here
            plain = masking.open_sealed(self._channels[v], inbox.sealed[v],
                                        _associated(self.round_id, v, self.index) + self._peer_digests[v])
            if len(plain) != _PLAIN or plain[:4] != _idx(v) or plain[4:8] != _idx(self.index):
                raise ValidationError("secure aggregation: a share is addressed to someone else")
            self._held[v] = (plain[8:8 + shamir.SHARE_BYTES], plain[8 + shamir.SHARE_BYTES:])
        # the seeds first (key agreement holds the GIL), then every mask expanded and added at once
        mask_sk = masking.load_private(self._mask_sk)
        jobs = [(True, self._seed)]
        for v in senders:
            jobs.append((self.index < v, masking.agree(mask_sk, self._peer_mask_keys[v], masking.MASK_PURPOSE,
                                                       _pair_context(self.round_id, self.index, v))))
        y = x.copy()
        masking.apply_masks(y, jobs)
        jobs.clear()
        # unmasking needs only the held shares: the secrets that made the masks are not kept
        self._mask_sk = self._seed = b""
        self._channels.clear()
        self._peer_mask_keys, self._peer_digests = {}, {}
        self._confirm = {v: self._confirm[v] for v in senders}
        self._masked_with = tuple(senders)
        self.stage = "masked"
        return MaskedInput(y)

    def confirm_survivors(self, survivors: Sequence[int]) -> dict[int, bytes]:
        """The consistency round (once per round): this client's MAC of the survivor set U3 for each surviving
        neighbour it masked with, under that pair's confirmation key."""
        self._expect("masked")
        u3 = tuple(int(v) for v in survivors)
        if list(u3) != sorted(set(u3)) or (u3 and u3[0] < 1):
            self._refuse("a survivor set must list distinct client indices in order")
        if self.index not in u3:
            self._refuse("the survivor set leaves out this client, which sent its masked input")
        if len(set(u3) & set(self._masked_with)) < self.threshold:
            self._refuse(f"the survivor set keeps fewer than {self.threshold} of my neighbours")
        self._survivors = u3
        self.stage = "confirmed"
        packed, alive = _survivors_bytes(u3), set(u3)
        return {v: _survivors_tag(self._confirm[v], self.round_id, self.index, packed)
                for v in self._masked_with if v in alive}

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Shares of survivors' self-mask seeds and dropped neighbours' mask keys, as the confirmed survivor set
        says (never both for one client), once at least t neighbours' MACs on that very set verify."""
        self._expect("confirmed")
        self.stage = "done"  # one unmask request per round, answered or refused
        valid = 0
        u3, packed = set(self._survivors), _survivors_bytes(self._survivors)
        for v in sorted(request.tags):
            key = self._confirm.get(v)
            if key is None or v not in u3:
                self._refuse(f"unmask request carries a confirmation of client {v}, not a surviving neighbour")
            if hmac.compare_digest(bytes(request.tags[v]), _survivors_tag(key, self.round_id, v, packed)):
                valid += 1
        if valid < self.threshold:
            self._refuse(f"{valid} valid neighbour confirmation(s) of the survivor set I confirmed, "
                         f"threshold {self.threshold}")
        out = UnmaskShares({v: self._held[v][0] for v in self._masked_with if v in u3},
                           {v: self._held[v][1] for v in self._masked_with if v not in u3})
        self._forget()
        return out

    def _refuse(self, reason: str) -> None:
        self.stage = "done"
        self._forget()
        raise ValidationError(f"secure aggregation: {reason} (refusing to unmask)")

    def _forget(self) -> None:
        self._enc_sk = self._mask_sk = self._seed = b""
        self._own_public = (b"", b"")
        self._held.clear()
        self._channels.clear()
        self._confirm.clear()
        self._peer_digests.clear()

    # -- state across processes (a deployed ClientApp is a fresh process per message)

    def _id_sk(self) -> bytes:
        """The per-round key of an uncertified identity, until the pair keys are agreed (a certified one is
        the device's, never stored)."""
        if self.identity.ca is not None or self.stage not in ("new", "advertised"):
            return b""
        return self.identity.key.private_bytes_raw()

    def to_state(self) -> dict[str, object]:
        held = sorted(self._held)
        keys = sorted(self._peer_mask_keys)
        confirm = sorted(self._confirm)
        return {
            "round_id": self.round_id, "index": self.index, "neighbours": list(self.neighbours),
            "threshold": self.threshold, "dim": self.dim, "dtype": self.dtype.str, "stage": self.stage,
            "enc_sk": self._enc_sk, "mask_sk": self._mask_sk, "seed": self._seed,
            "enc_pk": self._own_public[0], "mask_pk": self._own_public[1], "id_sk": self._id_sk(),
            "keys": keys, "keys_mask": [self._peer_mask_keys[k] for k in keys],
            "keys_digest": [self._peer_digests[k] for k in keys] if self._peer_digests else [],
            "channels": [self._channels[k] for k in keys] if self._channels else [],
            "masked_with": list(self._masked_with),
            "held": held, "held_b": [self._held[k][0] for k in held], "held_s": [self._held[k][1] for k in held],
            "confirm": confirm, "confirm_keys": [self._confirm[k] for k in confirm], "survivors": list(self._survivors),
        }

    # The state blob: a fixed header, the client's own secrets and keys (each a length byte and the
    # bytes: empty once forgotten), then index lists (u32 count, u32 each) and tables (u32 count, u32
    # item size, the items back to back), all little-endian. Every length is checked on reading.
    _BLOB = b"hsa5"  # format tag of the state blob
    _HEAD = struct.Struct(f"<4s{ROUND_ID_BYTES}sqqqB")  # tag, round id, index, threshold, dim, stage
    _RAW = ("dtype", "enc_sk", "mask_sk", "seed", "enc_pk", "mask_pk", "id_sk")
    _INTS = ("neighbours", "keys", "masked_with", "held", "confirm", "survivors")
    _TABLES = ("keys_mask", "keys_digest", "channels", "held_b", "held_s", "confirm_keys")

    def to_bytes(self) -> bytes:
        """The state as one compact binary blob for a key-value store (length-prefixed fields)."""
        s = self.to_state()
        s["dtype"] = str(s["dtype"]).encode()
        out = [self._HEAD.pack(self._BLOB, self.round_id, self.index, self.threshold, self.dim,
                               self.STAGES.index(self.stage))]
        for name in self._RAW:
            out += [bytes([len(s[name])]), s[name]]
        for name in self._INTS:
            ints = s[name]
            out.append(struct.pack(f"<I{len(ints)}I", len(ints), *ints))
        for name in self._TABLES:
            items = s[name]
            size = len(items[0]) if items else 0
            if any(len(x) != size for x in items):
                raise ValueError("secure-aggregation state: items of one table differ in length")
            out += [struct.pack("<II", len(items), size), *items]
        return b"".join(out)

    @classmethod
    def from_bytes(cls, blob: bytes, identity: DeviceIdentity | None = None) -> SecAggClient:
        """The client from :meth:`to_bytes`; ``identity``: the device's certified identity, when it has one."""
        blob = bytes(blob)
        try:
            tag, round_id, index, threshold, dim, stage = cls._HEAD.unpack_from(blob)
            if tag != cls._BLOB:
                raise ValueError("unknown format")
            pos = cls._HEAD.size
            s: dict[str, object] = {"round_id": round_id, "index": index, "threshold": threshold, "dim": dim}
            for name in cls._RAW:
                end = pos + 1 + blob[pos]
                if end > len(blob):
                    raise ValueError("truncated")
                s[name] = blob[pos + 1:end]
                pos = end
            for name in cls._INTS:
                (n,) = struct.unpack_from("<I", blob, pos)
                s[name] = struct.unpack_from(f"<{n}I", blob, pos + 4)
                pos += 4 + 4 * n
            for name in cls._TABLES:
                n, size = struct.unpack_from("<II", blob, pos)
                pos += 8
                end = pos + n * size
                if end > len(blob):
                    raise ValueError("truncated")
                s[name] = [blob[i:i + size] for i in range(pos, end, size)] if size else [b""] * n
                pos = end
            if pos != len(blob):
                raise ValueError("trailing bytes")
            if stage >= len(cls.STAGES):
                raise ValueError(f"unknown stage {stage}")
            s["dtype"] = bytes(s["dtype"]).decode()
            s["stage"] = cls.STAGES[stage]
            return cls.from_state(s, identity)
        except (ValueError, TypeError, IndexError, UnicodeDecodeError, struct.error) as exc:
            # (ValidationError, from the constructor's checks, is a ValueError too)
            raise ValidationError(f"corrupt secure-aggregation state: {exc}") from None

    @classmethod
    def from_state(cls, s: Mapping[str, object], identity: DeviceIdentity | None = None) -> SecAggClient:
        id_sk = bytes(s.get("id_sk", b""))
        if identity is None and id_sk:
            identity = DeviceIdentity.from_raw(id_sk)
        c = cls(bytes(s["round_id"]), int(s["index"]), list(s["neighbours"]), int(s["threshold"]),
                int(s["dim"]), np.dtype(str(s["dtype"])), identity)
        c.stage = str(s["stage"])
        if c.stage not in cls.STAGES:
            raise ValidationError(f"unknown secure-aggregation stage {c.stage!r}")
        c._enc_sk, c._mask_sk, c._seed = bytes(s["enc_sk"]), bytes(s["mask_sk"]), bytes(s["seed"])
        c._own_public = (bytes(s["enc_pk"]), bytes(s["mask_pk"]))
        c._peer_mask_keys = dict(zip(map(int, s["keys"]), map(bytes, s["keys_mask"]), strict=True))
        channels, digests = list(s["channels"]), list(s.get("keys_digest", ()))
        if channels:
            c._channels = {int(k): bytes(ch) for k, ch in zip(s["keys"], channels, strict=True)}
        if digests:
            c._peer_digests = {int(k): bytes(d) for k, d in zip(s["keys"], digests, strict=True)}
        c._masked_with = tuple(int(v) for v in s["masked_with"])
        c._held = {int(k): (bytes(b), bytes(x)) for k, b, x in zip(s["held"], s["held_b"], s["held_s"], strict=True)}
        c._confirm = dict(zip(map(int, s.get("confirm", ())), map(bytes, s.get("confirm_keys", ())), strict=True))
        c._survivors = tuple(int(v) for v in s.get("survivors", ()))
        return c


# ------------------------------------------------------------------------------------------------
# server (the fog)


@dataclass(frozen=True)
class SecAggSum:
    """What the fog learns: the sum (modulo 2**bits) of the survivors' inputs, and who they are."""

    total: np.ndarray = field(repr=False)
    survivors: tuple[int, ...]  # indices whose input is in the sum
    dropped_before_masking: tuple[int, ...]  # shared keys, sent no masked input (their masks were removed)
    dropped_after_masking: tuple[int, ...]  # input in the sum, no unmask reply (self masks rebuilt)


class SecAggServer:
    """The fog's side of one round over clients 1..n; the sum is the only input-dependent output."""

    def __init__(self, n: int, *, degree: int, threshold: int, dim: int, dtype: np.dtype, round_id: bytes,
                 source: RandomSource, min_survivors: int = 1) -> None:
        if len(round_id) != ROUND_ID_BYTES:
            raise ValidationError(f"round id must be {ROUND_ID_BYTES} bytes")
        self.n = n
        self.graph = harary_graph(n, degree, source)
        self.degree = len(self.graph[1])
        if not majority(self.degree) <= threshold <= self.degree:
            raise ValidationError(f"threshold {threshold} with degree {self.degree} is not a strict majority "
                                  f"(at least {majority(self.degree)})")
        self.threshold = threshold
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.round_id = round_id
        self.min_survivors = max(1, min_survivors)
        self._adverts: dict[int, KeyAdvert] = {}
        self.advertised: set[int] = set()  # U1
        self.shared: set[int] = set()  # U2
        self._outbox: dict[int, dict[int, bytes]] = {}  # recipient -> sender -> ciphertext
        self.masked: set[int] = set()  # U3
        self._tags: dict[int, dict[int, bytes]] = {}  # U4: survivor -> neighbour -> its MAC on U3 for that neighbour
        self._sum: np.ndarray | None = None

    def neighbours(self, i: int) -> tuple[int, ...]:
        return self.graph[i]

    def survivors(self, alive: set[int]) -> set[int]:
        """Who the round keeps when only ``alive`` answer: clients with fewer than t live neighbours dropped until
        none is left with too few; SecAggAborted below ``min_survivors`` (the batched simulator computes the
        protocol's output with it)."""
        return self._prune(alive)

    def _prune(self, alive: set[int]) -> set[int]:
        """Drop clients with fewer than t live neighbours until none is left with too few."""
        alive = set(alive)
        changed = True
        while changed:
            weak = {i for i in alive if len(set(self.graph[i]) & alive) < self.threshold}
            alive -= weak
            changed = bool(weak)
        if len(alive) < self.min_survivors:
            raise SecAggAborted(f"secure aggregation: {len(alive)} client(s) left, at least {self.min_survivors} needed")
        return alive

    # stage 0 -> 1
    def collect_adverts(self, adverts: Mapping[int, KeyAdvert]) -> set[int]:
        got = {i: a for i, a in adverts.items() if i in self.graph}
        keys = [k for a in got.values() for k in (a.enc_key, a.mask_key)]
        if len(set(keys)) != len(keys):
            raise SecAggAborted("secure aggregation: two clients advertised the same public key")
        self._adverts = got
        self.advertised = self._prune(set(got))
        return set(self.advertised)

    def public_keys(self) -> dict[int, KeyAdvert]:
        """Every client's advertised keys and commitment (public: part of the round's transcript)."""
        return dict(self._adverts)

    def keys_for(self, i: int) -> NeighbourKeys:
        return NeighbourKeys({v: self._adverts[v] for v in self.graph[i] if v in self.advertised})

    # stage 1 -> 2
    def collect_shares(self, replies: Mapping[int, SealedShares]) -> set[int]:
        good: dict[int, SealedShares] = {}
        for i, r in replies.items():
            if i in self.advertised and set(r.sealed) == set(self.keys_for(i).adverts):
                good[i] = r
        alive = self._prune(set(good))
        self._outbox = {i: {} for i in alive}
        for src in alive:
            for dst, c in good[src].sealed.items():
                if dst in alive:
                    self._outbox[dst][src] = c
        self.shared = alive
        return set(alive)

    def inbox_for(self, i: int) -> SealedShares:
        return SealedShares(dict(self._outbox[i]))

    # stage 2 -> 3
    def add_masked(self, i: int, masked: MaskedInput) -> None:
        """Add client ``i``'s masked input into the running sum; the vector is not kept."""
        if i not in self.shared or i in self.masked:
            raise ValidationError(f"secure aggregation: unexpected masked input from client {i}")
        y = np.asarray(masked.vector)
        if y.dtype != self.dtype or y.shape != (self.dim,):
            raise ValidationError(f"masked input must be {self.dtype} of length {self.dim}")
        if self._sum is None:
            self._sum = y.copy()
        else:
            field_add(self._sum, y)
        self.masked.add(i)

    def close_masking(self) -> set[int]:
        """End stage 2; raises SecAggAborted when some client's secrets could not be rebuilt anyway."""
        if len(self.masked) < self.min_survivors:
            raise SecAggAborted(f"secure aggregation: {len(self.masked)} masked input(s), "
                                f"at least {self.min_survivors} needed")
        for v in self.shared:
            holders = set(self._outbox[v]) & self.masked  # neighbours that got v's shares and are still here
            if len(holders) < self.threshold:
                raise SecAggAborted(f"secure aggregation: client {v} has {len(holders)} neighbour(s) left to "
                                    f"rebuild its secrets, threshold {self.threshold}")
        return set(self.masked)

    # stage 3: consistency
    def survivor_set(self) -> tuple[int, ...]:
        """U3, the same for every survivor: each confirms it to its neighbours."""
        return tuple(sorted(self.masked))

    def collect_confirmations(self, tags: Mapping[int, Mapping[int, bytes]]) -> set[int]:
        """Keep the survivors' MACs on U3 (survivor -> neighbour -> MAC; the clients check them); returns who
        confirmed."""
        self._tags = {i: {int(v): bytes(t) for v, t in by.items()} for i, by in tags.items() if i in self.masked}
        return set(self._tags)

    def unmask_request_for(self, i: int) -> UnmaskRequest:
        return UnmaskRequest({v: self._tags[v][i] for v in self.graph[i] if i in self._tags.get(v, {})})

    def _expected(self, i: int) -> tuple[set[int], set[int]]:
        """Whose b shares and whose s-key shares client ``i`` reveals for U3."""
        masked_with = set(self._outbox[i])
        return masked_with & self.masked, masked_with - self.masked

    # stage 3 -> result
    def finish(self, replies: Mapping[int, UnmaskShares]) -> SecAggSum:
        if self._sum is None:
            raise SecAggAborted("secure aggregation: no masked inputs")
        b_shares: dict[int, dict[int, bytes]] = {v: {} for v in self.masked}
        s_shares: dict[int, dict[int, bytes]] = {v: {} for v in self.shared - self.masked}
        for i, r in replies.items():
            if i not in self.masked:
                continue
            survivors, dropped = self._expected(i)
            if set(r.self_mask) != survivors or set(r.mask_key) != dropped:
                continue  # not the shares asked for: ignore this reply
            for v, share in r.self_mask.items():
                b_shares[v][i] = share
            for v, share in r.mask_key.items():
                s_shares[v][i] = share
        total = self._sum
        jobs: list[tuple[bool, bytes]] = []  # (add?, seed): every secret is rebuilt and checked first
        for v, shares in sorted(b_shares.items()):
            seed = self._rebuild(v, shares, "self-mask seed")
            if _commit(self.round_id, v, seed) != self._adverts[v].commitment:
                raise SecAggAborted(f"secure aggregation: rebuilt self mask of client {v} does not match its commitment")
            jobs.append((False, seed))
        for v, shares in sorted(s_shares.items()):
            raw = self._rebuild(v, shares, "mask key")
            sk = masking.load_private(raw)
            if masking.public_bytes(sk) != self._adverts[v].mask_key:
                raise SecAggAborted(f"secure aggregation: rebuilt mask key of client {v} does not match its public key")
            for w in sorted(set(self._outbox[v]) & self.masked):  # survivors that masked with v
                seed = masking.agree(sk, self._adverts[w].mask_key, masking.MASK_PURPOSE,
                                     _pair_context(self.round_id, v, w))
                jobs.append((w > v, seed))  # undo w's term for v (w added it when w < v)
        masking.apply_masks(total, jobs)
        jobs.clear()
        self._sum = None
        after = tuple(sorted(self.masked - set(replies)))
        return SecAggSum(total, tuple(sorted(self.masked)), tuple(sorted(self.shared - self.masked)), after)

    def _rebuild(self, owner: int, shares: Mapping[int, bytes], what: str) -> bytes:
        if len(shares) < self.threshold:
            raise SecAggAborted(f"secure aggregation: {len(shares)} share(s) of client {owner}'s {what}, "
                                f"threshold {self.threshold}")
        try:
            return shamir.combine(shares, self.threshold)
        except ValueError as exc:
            raise SecAggAborted(f"secure aggregation: cannot rebuild client {owner}'s {what}: {exc}") from None


def new_round_id() -> bytes:
    return os.urandom(ROUND_ID_BYTES)


def run_in_memory(inputs: Mapping[int, np.ndarray], *, degree: int, threshold: int, source: RandomSource,
                  drop_before_masking: Iterable[int] = (), drop_after_masking: Iterable[int] = (),
                  round_id: bytes | None = None, identities: Mapping[int, DeviceIdentity] | None = None) -> SecAggSum:
    """The whole protocol between one server and in-process clients (tests and benchmarks).

    ``inputs`` maps indices 1..n to encoded field vectors; the named clients drop right before
    sending their masked input, or right after it (they never confirm the survivor set nor unmask).
    ``identities``: each client's, default uncertified.
    """
    n = len(inputs)
    if sorted(inputs) != list(range(1, n + 1)):
        raise ValueError("inputs must be indexed 1..n")
    first = next(iter(inputs.values()))
    rid = round_id or new_round_id()
    server = SecAggServer(n, degree=degree, threshold=threshold, dim=first.shape[0], dtype=first.dtype,
                          round_id=rid, source=source)
    clients = {i: SecAggClient(rid, i, server.neighbours(i), threshold, first.shape[0], first.dtype,
                               identities[i] if identities else None) for i in inputs}
    server.collect_adverts({i: c.advertise() for i, c in clients.items()})
    server.collect_shares({i: clients[i].share(server.keys_for(i)) for i in sorted(server.advertised)})
    before, after = set(drop_before_masking), set(drop_after_masking)
    for i in sorted(server.shared - before):
        server.add_masked(i, clients[i].mask(server.inbox_for(i), inputs[i]))
    server.close_masking()
    u3 = server.survivor_set()
    confirmed = server.collect_confirmations({i: clients[i].confirm_survivors(u3)
                                              for i in sorted(server.masked - after)})
    replies = {}
    for i in sorted(confirmed):
        try:
            replies[i] = clients[i].unmask(server.unmask_request_for(i))
        except ValidationError:
            continue  # a client refusing (too few of its neighbours confirmed) is silent, as over a grid
    return server.finish(replies)


__all__ = [
    "KeyAdvert",
    "MaskedInput",
    "NeighbourKeys",
    "ROUND_ID_BYTES",
    "SealedShares",
    "SecAggClient",
    "SecAggServer",
    "SecAggSum",
    "UnmaskRequest",
    "UnmaskShares",
    "harary_graph",
    "majority",
    "new_round_id",
    "plan_graph",
    "run_in_memory",
]
