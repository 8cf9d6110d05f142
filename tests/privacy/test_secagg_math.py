"""hyprstream.privacy: quantization, Shamir sharing, masking primitives and the SecAgg+ protocol math."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hyprstream.errors import ValidationError
from hyprstream.privacy import masking, shamir
from hyprstream.privacy.clipping import Layout, clip_l2
from hyprstream.privacy.contribution import InputSpec, decode, encode
from hyprstream.privacy.errors import RangeOverflow, SecAggAborted
from hyprstream.privacy.noise import SeededRandom
from hyprstream.privacy.quantize import Quantizer
from hyprstream.privacy.secagg import (
    SecAggClient,
    SecAggServer,
    UnmaskRequest,
    harary_graph,
    majority,
    new_round_id,
    plan_graph,
    run_in_memory,
)

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------------------------
# quantization


def test_quantizer_is_sized_from_clip_and_clients() -> None:
    q = Quantizer.for_clients(clip=2.0, max_clients=100, bits=32)
    assert q.bound == (2 ** 31 - 1) // 100
    assert q.scale == pytest.approx(q.bound / 2.0)
    assert q.bound * q.max_terms < 2 ** 31  # the sum of 100 inputs cannot wrap


def test_quantizer_refuses_ranges_that_could_wrap() -> None:
    with pytest.raises(RangeOverflow):
        Quantizer(bits=32, scale=1.0, bound=2 ** 30, max_terms=2)
    q = Quantizer.for_clients(clip=1.0, max_clients=3, bits=32)
    with pytest.raises(RangeOverflow):
        q.encode(np.array([q.bound + 1]))
    with pytest.raises(RangeOverflow):
        q.decode_sum(np.zeros(1, dtype=np.uint32), terms=4)
    with pytest.raises(RangeOverflow):  # 1e6 coordinates at the resolution of a 2**31 / 1e7 grid
        Quantizer.for_clients(clip=1.0, max_clients=10_000_000, bits=32).inner_clip(1.0, 1_000_000)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([32, 64]), n=st.integers(1, 200), seed=st.integers(0, 2 ** 32 - 1),
       dim=st.integers(1, 300), clip=st.floats(1e-3, 1e3))
def test_clipped_quantized_vector_stays_within_clip(bits: int, n: int, seed: int, dim: int, clip: float) -> None:
    q = Quantizer.for_clients(clip=clip, max_clients=n, bits=bits)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dim) * clip * rng.uniform(0.01, 10)
    inner = clip_l2(x, q.inner_clip(clip, dim)).vector
    ints = q.quantize(inner, SeededRandom(seed))
    assert np.linalg.norm(ints.astype(np.float64)) <= clip * q.scale * (1 + 1e-12)
    # within one grid step (plus float64 rounding of x * scale, which matters for 64-bit fields)
    assert np.max(np.abs(q.dequantize(ints) - inner)) <= q.resolution + 8 * np.finfo(float).eps * clip


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([32, 64]), n=st.integers(1, 50), seed=st.integers(0, 2 ** 32 - 1))
def test_field_sum_decodes_to_the_integer_sum(bits: int, n: int, seed: int) -> None:
    q = Quantizer.for_clients(clip=1.0, max_clients=n, bits=bits)
    rng = np.random.default_rng(seed)
    ints = [rng.integers(-q.bound, q.bound + 1, size=17) for _ in range(n)]
    total = np.zeros(17, dtype=q.dtype)
    for v in ints:
        total += q.encode(v)
    np.testing.assert_array_equal(q.decode_sum(total, n), np.sum(ints, axis=0))


def test_stochastic_rounding_is_unbiased() -> None:
    q = Quantizer(bits=32, scale=1.0, bound=10, max_terms=1)
    x = np.full(200_000, 0.3)
    ints = q.quantize(x, SeededRandom(0))
    assert set(np.unique(ints)) == {0, 1}
    assert abs(ints.mean() - 0.3) < 0.005  # 5 sigma = 0.005


# --------------------------------------------------------------------------------------------
# Shamir


@settings(max_examples=30, deadline=None)
@given(holders=st.integers(1, 40), data=st.data())
def test_any_threshold_shares_rebuild_the_secret(holders: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, holders))
    secret = data.draw(st.binary(min_size=32, max_size=32))
    xs = data.draw(st.lists(st.integers(1, 10_000), min_size=holders, max_size=holders, unique=True))
    shares = shamir.split(secret, t, xs)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=holders, unique=True))
    assert shamir.combine({x: shares[x] for x in subset}, t) == secret


def test_shares_are_field_values_of_a_fresh_random_polynomial() -> None:
    secret = bytes(range(32))
    a, b = shamir.split(secret, 3, [1, 2, 3, 200]), shamir.split(secret, 3, [1, 2, 3, 200])
    assert all(int.from_bytes(v, "big") < shamir.PRIME for v in a.values())
    assert a != b  # new coefficients each time
    assert shamir.combine({1: a[1], 2: a[2], 200: a[200]}, 3) == secret
    assert shamir.combine({1: b[1], 3: b[3], 200: b[200]}, 3) == secret
    # threshold 1: the constant polynomial, every share is the secret
    as_share = int.from_bytes(secret, "big").to_bytes(shamir.SHARE_BYTES, "big")
    assert set(shamir.split(secret, 1, [5, 9]).values()) == {as_share}


def test_too_few_shares_are_refused() -> None:
    shares = shamir.split(bytes(range(32)), 3, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="3 needed"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3)


def test_fewer_than_threshold_shares_are_consistent_with_any_secret() -> None:
    """Two shares of a threshold-3 sharing fit every secret equally: interpolate with a forged third."""
    secret_a, secret_b = bytes(32), bytes([7]) * 32
    shares = shamir.split(secret_a, 3, [1, 2, 3])
    # the polynomial through (0, b), (1, y1), (2, y2) exists for any b: its value at 3 is a valid share
    ys = {x: int.from_bytes(shares[x], "big") for x in (1, 2)}
    b = int.from_bytes(secret_b, "big")
    p = shamir.PRIME
    # Lagrange at x = 3 through (0, b), (1, y1), (2, y2): L0 = 1, L1 = -3, L2 = 3
    y3 = (b * 1 - 3 * ys[1] + 3 * ys[2]) % p
    forged = {1: shares[1], 2: shares[2], 3: y3.to_bytes(shamir.SHARE_BYTES, "big")}
    assert shamir.combine(forged, 3) == secret_b


# --------------------------------------------------------------------------------------------
# primitives


def test_mask_expansion_is_a_deterministic_keystream() -> None:
    seed = bytes(range(32))
    a = masking.expand_mask(seed, 1000, np.uint32)
    np.testing.assert_array_equal(a, masking.expand_mask(seed, 1000, np.uint32))
    assert not np.array_equal(a, masking.expand_mask(bytes(32), 1000, np.uint32))
    # a prefix of a longer expansion (one keystream), 64-bit view of the same bytes
    np.testing.assert_array_equal(masking.expand_mask(seed, 10, np.uint32), a[:10])
    assert masking.expand_mask(seed, 500, np.uint64).tobytes() == a.tobytes()


@pytest.mark.parametrize("start", [bytes(range(16, 32)), b"\xff" * 16])  # the second wraps the counter
def test_mask_is_aes128_of_counter_blocks(start) -> None:
    """The mask PRG against its definition, built from the block cipher alone: block i of the keystream is
    AES-128 (key: the seed's first 16 bytes) of the seed's last 16 bytes plus i, modulo 2**128, big-endian."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(100, 116)) + start
    blocks = 40
    ecb = Cipher(algorithms.AES(seed[:16]), modes.ECB()).encryptor()
    counter = int.from_bytes(seed[16:], "big")
    stream = b"".join(ecb.update(((counter + i) % 2 ** 128).to_bytes(16, "big")) for i in range(blocks))
    want = np.frombuffer(stream, dtype=np.uint32)
    np.testing.assert_array_equal(masking.expand_mask(seed, 4 * blocks, np.uint32), want)
    acc = np.zeros(4 * blocks, np.uint32)
    masking.MaskStream(4 * blocks, np.uint32).add(acc, seed)
    np.testing.assert_array_equal(acc, want)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_mask_stream_adds_and_subtracts_the_expanded_masks(dtype) -> None:
    rng = np.random.default_rng(0)
    n = 1001
    seeds = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(4)]
    x = rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    expected = x.copy()
    for s in seeds[:2]:
        expected += masking.expand_mask(s, n, dtype)
    for s in seeds[2:]:
        expected -= masking.expand_mask(s, n, dtype)
    acc = x.copy()
    stream = masking.MaskStream(n, dtype)
    for s in seeds[:2]:
        stream.add(acc, s)
    for s in seeds[2:]:
        stream.sub(acc, s)
    np.testing.assert_array_equal(acc, expected)  # modulo 2**bits, as the field wants
    for s in seeds:  # and the masks cancel
        stream.sub(acc, s) if s in seeds[:2] else stream.add(acc, s)
    np.testing.assert_array_equal(acc, x)
    stream.close()
    with pytest.raises(ValueError):
        stream.add(np.zeros(n + 1, dtype), seeds[0])
    with pytest.raises(ValueError):
        stream.add(np.zeros(n, np.uint16 if dtype is np.uint32 else np.uint32), seeds[0])
    with pytest.raises(ValueError):
        stream.add(acc, b"short")


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_apply_masks_equals_the_stream_one_mask_at_a_time(dtype, threads) -> None:
    rng = np.random.default_rng(threads)
    n = 40_001  # above the size the expansion is spread over threads from
    jobs = [(bool(rng.integers(2)), bytes(rng.integers(0, 256, 32, dtype=np.uint8))) for _ in range(9)]
    x = rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    expected = x.copy()
    stream = masking.MaskStream(n, dtype)
    for add, seed in jobs:
        (stream.add if add else stream.sub)(expected, seed)
    stream.close()
    acc = x.copy()
    masking.apply_masks(acc, jobs, threads=threads)
    np.testing.assert_array_equal(acc, expected)
    masking.apply_masks(acc, [(not add, seed) for add, seed in jobs], threads=threads)  # and they cancel
    np.testing.assert_array_equal(acc, x)
    masking.apply_masks(acc, [], threads=threads)
    np.testing.assert_array_equal(acc, x)
    with pytest.raises(ValueError, match="32 bytes"):
        masking.apply_masks(acc, [(True, b"short")], threads=threads)
    with pytest.raises(ValueError):
        masking.apply_masks(acc.astype(np.int64), jobs, threads=threads)
    with pytest.raises(ValueError):
        masking.apply_masks(acc.reshape(1, -1), jobs, threads=threads)


def test_key_derivation_is_rfc5869_hkdf_sha256() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    rng = np.random.default_rng(1)
    for _ in range(20):
        secret, info = bytes(rng.integers(0, 256, 32, dtype=np.uint8)), bytes(rng.integers(0, 256, 40, dtype=np.uint8))
        reference = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
        assert masking.hkdf_sha256(secret, info) == reference
    # RFC 5869 test case 3 (no salt, no info), first 32 bytes of its OKM
    ikm = bytes([0x0B] * 22)
    assert masking.hkdf_sha256(ikm, b"").hex() == "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
    a, b = masking.new_private_key(), masking.new_private_key()
    ctx = bytes(16)
    assert masking.agree(a, masking.public_bytes(b), masking.MASK_PURPOSE, ctx) == \
        masking.agree(b, masking.public_bytes(a), masking.MASK_PURPOSE, ctx)
    assert masking.agree(a, masking.public_bytes(b), masking.MASK_PURPOSE, ctx) != \
        masking.agree(a, masking.public_bytes(b), masking.SHARE_PURPOSE, ctx)


def test_sealed_shares_bind_round_sender_and_recipient() -> None:
    key = bytes(32)
    sealed = masking.seal(key, b"share", b"round|1|2")
    assert masking.open_sealed(key, sealed, b"round|1|2") == b"share"
    with pytest.raises(ValidationError):
        masking.open_sealed(key, sealed, b"round|1|3")


def test_harary_graph_is_regular_and_symmetric() -> None:
    g = harary_graph(50, 8, SeededRandom(3))
    assert all(len(v) == 8 for v in g.values())
    assert all(i in g[j] for i in g for j in g[i])
    assert harary_graph(5, 4, SeededRandom(0)) == {i: tuple(j for j in range(1, 6) if j != i) for i in range(1, 6)}


def test_plan_graph_grows_the_degree_with_the_expected_dropout() -> None:
    k0, t0 = plan_graph(100, expected_dropout=0.0)
    k1, t1 = plan_graph(100, expected_dropout=0.1)
    k3, t3 = plan_graph(100, expected_dropout=0.3)
    assert k0 == 14 and t0 == 8  # the 2 * ceil(log2 n) floor; t a strict majority of k
    assert k0 < k1 < k3 <= 99
    assert t1 == k1 // 2 + 1
    assert plan_graph(5) == (4, 3)


# --------------------------------------------------------------------------------------------
# the protocol: exact sums with dropouts


def _inputs(n: int, dim: int, bits: int, seed: int) -> tuple[dict[int, np.ndarray], Quantizer, dict[int, np.ndarray]]:
    """Quantized clipped float deltas of n clients, encoded in the field; also their integer values."""
    clip = 1.0
    q = Quantizer.for_clients(clip=clip, max_clients=n, bits=bits)
    spec = InputSpec(Layout.of({"w": (dim,)}), clip, q)
    rng = np.random.default_rng(seed)
    source = SeededRandom(seed)
    encoded, ints = {}, {}
    for i in range(1, n + 1):
        enc = encode({"w": rng.normal(size=dim) * rng.uniform(0.01, 3)}, 1, spec, source)
        encoded[i] = enc.vector
        ints[i] = q.decode_sum(enc.vector, 1)
    return encoded, q, ints


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 30), dim=st.integers(1, 64), bits=st.sampled_from([32, 64]),
       seed=st.integers(0, 2 ** 32 - 1), drop=st.sampled_from([0.0, 0.1, 0.3]),
       when=st.sampled_from(["after", "before", "both"]), data=st.data())
def test_secure_sum_equals_plain_sum_with_dropouts(n: int, dim: int, bits: int, seed: int, drop: float, when: str,
                                                   data: st.DataObject) -> None:
    encoded, q, ints = _inputs(n, dim, bits, seed)
    k, _ = plan_graph(n, expected_dropout=drop)
    graph = harary_graph(n, k, SeededRandom(seed))  # the server builds the same graph from the same seed
    dropped = data.draw(st.lists(st.integers(1, n), min_size=round(drop * n), max_size=round(drop * n), unique=True))
    if when == "after":
        before, after = set(), set(dropped)
    elif when == "before":
        before, after = set(dropped), set()
    else:
        before, after = set(dropped[::2]), set(dropped[1::2])
    survivors = set(range(1, n + 1)) - before
    answering = survivors - after
    # the largest threshold the dropouts allow: every client keeps that many answering neighbours
    feasible = min(len(set(graph[i]) & answering) for i in range(1, n + 1))
    assume(feasible >= majority(k) and survivors)
    t = data.draw(st.integers(majority(k), feasible))
    result = run_in_memory(encoded, degree=k, threshold=t, source=SeededRandom(seed),
                           drop_before_masking=before, drop_after_masking=after)
    assert set(result.survivors) == survivors
    assert set(result.dropped_before_masking) == before
    assert set(result.dropped_after_masking) == after
    plain = np.zeros(dim, dtype=q.dtype)
    for i in survivors:
        plain += encoded[i]
    np.testing.assert_array_equal(result.total, plain)  # exact, modulo 2**bits
    np.testing.assert_array_equal(q.decode_sum(result.total, len(survivors)),
                                  np.sum([ints[i] for i in survivors], axis=0))  # and as integers


@pytest.mark.parametrize("drop", [0.0, 0.1, 0.3])
def test_secure_sum_at_the_planned_degree_for_the_dropout(drop: float) -> None:
    """The fog's own (degree, threshold) plan survives its expected dropout of clients after masking."""
    n, dim = 60, 1000
    encoded, q, _ = _inputs(n, dim, 32, 11)
    k, t = plan_graph(n, expected_dropout=drop)
    rng = np.random.default_rng(5)
    after = set(rng.choice(np.arange(1, n + 1), size=round(drop * n), replace=False).tolist())
    result = run_in_memory(encoded, degree=k, threshold=t, source=SeededRandom(1), drop_after_masking=after)
    plain = np.zeros(dim, dtype=q.dtype)
    for v in encoded.values():
        plain += v
    np.testing.assert_array_equal(result.total, plain)
    assert set(result.dropped_after_masking) == after


def test_too_many_dropouts_abort_without_a_result() -> None:
    encoded, _, _ = _inputs(6, 8, 32, 0)
    with pytest.raises(SecAggAborted, match="threshold"):
        run_in_memory(encoded, degree=4, threshold=4, source=SeededRandom(0), drop_after_masking={1, 2})


def test_decoded_sum_is_the_sum_of_the_quantized_deltas() -> None:
    layout = Layout.of({"a.weight": (3, 2), "a.bias": (3,)})
    q = Quantizer.for_clients(clip=10.0, max_clients=3, bits=32)
    spec = InputSpec(layout, 10.0, q, weighted=True, max_weight=100.0)
    rng = np.random.default_rng(0)
    deltas = [{"a.weight": rng.normal(size=(3, 2)), "a.bias": rng.normal(size=3)} for _ in range(3)]
    examples = [10, 50, 400]  # the last is capped at max_weight
    encoded = {i + 1: encode(d, m, spec, SeededRandom(i)).vector for i, (d, m) in enumerate(zip(deltas, examples))}
    result = run_in_memory(encoded, degree=2, threshold=2, source=SeededRandom(0))
    dec = decode(result.total, 3, spec)
    assert dec.weight == pytest.approx(0.1 + 0.5 + 1.0, abs=3 / q.bound)
    expected = sum(w * layout.flatten(d) for w, d in zip([0.1, 0.5, 1.0], deltas))
    np.testing.assert_allclose(dec.total, expected, atol=3 * q.resolution)


# --------------------------------------------------------------------------------------------
# what the fog sees


def _stage_all(n: int, dim: int, seed: int):
    encoded, q, _ = _inputs(n, dim, 32, seed)
    rid = new_round_id()
    t = majority(n - 1)
    server = SecAggServer(n, degree=n - 1, threshold=t, dim=dim, dtype=q.dtype, round_id=rid, source=SeededRandom(seed))
    clients = {i: SecAggClient(rid, i, server.neighbours(i), t, dim, q.dtype) for i in encoded}
    return encoded, server, clients


def _confirm(server: SecAggServer, clients) -> None:
    """The consistency round, honest: every survivor confirms U3 to its neighbours."""
    u3 = server.survivor_set()
    server.collect_confirmations({i: clients[i].confirm_survivors(u3) for i in sorted(server.masked)})


def _arrays_in(obj, seen=None):
    """Every numpy array reachable from ``obj``'s attributes (the fog's whole state)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays_in(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _arrays_in(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from _arrays_in(vars(obj), seen)


def test_the_fog_only_ever_holds_uniformly_masked_inputs() -> None:
    n, dim = 5, 200_000
    encoded, server, clients = _stage_all(n, dim, 7)
    server.collect_adverts({i: c.advertise() for i, c in clients.items()})
    server.collect_shares({i: clients[i].share(server.keys_for(i)) for i in clients})
    for i in sorted(clients):
        masked = clients[i].mask(server.inbox_for(i), encoded[i])
        y = masked.vector
        # what the fog receives is the input plus a mask that is uniform on Z / 2**32: its top byte
        # is uniform (chi-square over 256 bins, 255 dof: mean 255, sd 22.6; bound at ~8 sd)
        counts = np.bincount((y >> np.uint32(24)).astype(np.int64), minlength=256)
        chi2 = float(np.sum((counts - dim / 256) ** 2 / (dim / 256)))
        assert chi2 < 255 + 8 * 22.6
        assert np.mean(y == encoded[i]) < 1e-3
        server.add_masked(i, masked)
        # by construction: nothing in the fog's state is one client's input, or its input plus its
        # self mask only (the running sum of several masked inputs is all it keeps)
        for arr in _arrays_in(server):
            for v in encoded.values():
                assert not (arr.shape == v.shape and np.array_equal(arr, v))
    server.close_masking()
    _confirm(server, clients)
    result = server.finish({i: clients[i].unmask(server.unmask_request_for(i)) for i in clients})
    plain = np.zeros(dim, dtype=np.uint32)
    for v in encoded.values():
        plain += v
    np.testing.assert_array_equal(result.total, plain)


def test_a_client_reveals_only_what_the_survivor_set_it_confirmed_says() -> None:
    """What a client reveals follows from the U3 it confirmed, never from the unmask request: its share of b
    for neighbours in U3, of the mask key for those not in U3, never both; once, and only with t valid
    neighbour confirmations of that same U3."""
    encoded, server, clients = _stage_all(6, 16, 1)  # k = 5, t = 3
    server.collect_adverts({i: c.advertise() for i, c in clients.items()})
    server.collect_shares({i: clients[i].share(server.keys_for(i)) for i in clients})
    for i in clients:
        server.add_masked(i, clients[i].mask(server.inbox_for(i), encoded[i]))
    u3 = (1, 2, 3, 4, 5, 6)
    tags = {i: clients[i].confirm_survivors(u3) for i in clients}
    assert all(set(tags[i]) == set(server.neighbours(i)) for i in clients)
    with pytest.raises(ValidationError, match="out of order"):  # one confirmation per round
        clients[1].confirm_survivors((1, 2, 3, 4, 5))
    # a forged MAC does not count: with one of three forged, fewer than t valid
    forged = {2: bytes(32), 3: tags[3][1], 4: tags[4][1]}
    with pytest.raises(ValidationError, match="2 valid neighbour confirmation"):
        clients[1].unmask(UnmaskRequest(forged))
    with pytest.raises(ValidationError, match="out of order"):  # and it answers one unmask request only
        clients[1].unmask(UnmaskRequest({v: tags[v][1] for v in (2, 3, 4)}))
    # MACs made for another neighbour (here client 1) do not verify for client 2
    other = {v: tags[v][1] for v in (3, 4, 5)}
    with pytest.raises(ValidationError, match="0 valid"):
        clients[2].unmask(UnmaskRequest(other))
    out = clients[3].unmask(UnmaskRequest({v: tags[v][3] for v in (1, 2, 4)}))
    assert set(out.self_mask) == {1, 2, 4, 5, 6} and not out.mask_key


def test_a_survivor_set_leaving_out_the_confirming_client_is_refused() -> None:
    encoded, server, clients = _stage_all(4, 8, 2)
    server.collect_adverts({i: c.advertise() for i, c in clients.items()})
    server.collect_shares({i: clients[i].share(server.keys_for(i)) for i in clients})
    for i in clients:
        server.add_masked(i, clients[i].mask(server.inbox_for(i), encoded[i]))
    with pytest.raises(ValidationError, match="leaves out this client"):
        clients[1].confirm_survivors((2, 3, 4))
    with pytest.raises(ValidationError, match="fewer than 2 of my neighbours"):
        clients[2].confirm_survivors((2, 3))


def test_the_fog_cannot_open_relayed_shares() -> None:
    encoded, server, clients = _stage_all(3, 4, 2)
    adverts = {i: c.advertise() for i, c in clients.items()}
    server.collect_adverts(adverts)
    sealed = clients[1].share(server.keys_for(1)).sealed
    # a fog that knows every public key still has no private key: any key it derives fails the tag
    for guess in (bytes(32), adverts[1].enc_key, adverts[2].enc_key):
        with pytest.raises(ValidationError):
            masking.open_sealed(guess, sealed[2], b"")


def test_client_state_survives_a_process_boundary() -> None:
    """A deployed ClientApp is a fresh process per message: the state round-trips through plain values."""
    n, dim = 4, 32
    encoded, server, clients = _stage_all(n, dim, 3)

    def reload(c: SecAggClient) -> SecAggClient:
        via_dict = SecAggClient.from_state(c.to_state())
        return SecAggClient.from_bytes(via_dict.to_bytes())

    server.collect_adverts({i: c.advertise() for i, c in clients.items()})
    clients = {i: reload(c) for i, c in clients.items()}
    server.collect_shares({i: clients[i].share(server.keys_for(i)) for i in clients})
    clients = {i: reload(c) for i, c in clients.items()}
    for i in clients:
        server.add_masked(i, clients[i].mask(server.inbox_for(i), encoded[i]))
    clients = {i: reload(c) for i, c in clients.items()}
    server.close_masking()
    _confirm(server, clients)
    clients = {i: reload(c) for i, c in clients.items()}
    result = server.finish({i: clients[i].unmask(server.unmask_request_for(i)) for i in clients})
    plain = np.zeros(dim, dtype=np.uint32)
    for v in encoded.values():
        plain += v
    np.testing.assert_array_equal(result.total, plain)


def test_a_corrupt_client_state_is_refused() -> None:
    _, server, clients = _stage_all(4, 8, 3)
    c = clients[1]
    c.advertise()
    blob = c.to_bytes()
    again = SecAggClient.from_bytes(blob)
    assert again.to_state() == c.to_state()
    for bad in (blob[:-1], blob + b"\x00", b"xxxx" + blob[4:], blob[:40], b""):
        with pytest.raises(ValidationError, match="corrupt"):
            SecAggClient.from_bytes(bad)


def test_inputs_outside_the_layout_are_refused() -> None:
    spec = InputSpec(Layout.of({"w": (4,)}), 1.0, Quantizer.for_clients(clip=1.0, max_clients=2))
    with pytest.raises(ValidationError, match="missing"):
        encode({"v": np.zeros(4)}, 1, spec, SeededRandom(0))
    with pytest.raises(ValidationError, match="NaN"):
        encode({"w": np.array([0, 0, np.nan, 0])}, 1, spec, SeededRandom(0))


def test_derive_each_gives_each_purposes_hkdf_key() -> None:
    """The channel and confirmation keys come from one extract: the same keys as one HKDF per purpose."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    rng = np.random.default_rng(2)
    purposes = (masking.SHARE_PURPOSE, masking.CONFIRM_PURPOSE, masking.MASK_PURPOSE)
    for _ in range(10):
        secret, ctx = bytes(rng.integers(0, 256, 64, dtype=np.uint8)), bytes(rng.integers(0, 256, 24, dtype=np.uint8))
        keys = masking.derive_each(secret, purposes, ctx)
        assert len(set(keys)) == len(purposes)
        for p, key in zip(purposes, keys, strict=True):
            info = masking.PROTOCOL + b"|" + p + b"|" + ctx
            assert key == HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def test_a_message_of_the_previous_mask_prg_is_refused_not_summed() -> None:
    """Format 6 expanded masks with AES-256: a fog and a client of different versions would unmask with
    different masks and release a wrong sum, so a format-6 message is refused by name."""
    from flwr.app import ConfigRecord, RecordDict

    from hyprstream.privacy import secagg_messages as wire

    current = wire.reply_status(wire.Stage.SHARE, bytes(16), wire.Status.OK, "")
    assert wire.header(current).stage is wire.Stage.SHARE
    raw = current[wire.RECORD][wire.FIELD].replace(b"hyprstream.secagg/7", b"hyprstream.secagg/6", 1)
    with pytest.raises(ValidationError, match="not a hyprstream.secagg/7 message"):
        wire.header(RecordDict({wire.RECORD: ConfigRecord({wire.FIELD: raw})}))
