"""qkdnode.native.toeplitz_hash against the pure-Python reference, on every implementation."""

import array
import contextlib
import random
import sys
import threading
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qkdnode import native
from qkdnode._native import lib
from qkdnode.native import toeplitz_hash, toeplitz_seed_bits

from .test_native_reference import gf64_mul, toeplitz_fft_numpy, toeplitz_ref

IMPLS = native._available_impls()
EDGE_BITS = [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 128, 129]


@contextlib.contextmanager
def using(impl, blocked=None, k=0):
    """Run with implementation impl and, if blocked is not None, a forced plan; then restore."""
    native._set_impl(impl)
    native._force_toeplitz_plan(blocked, k)
    try:
        yield
    finally:
        native._set_impl("auto")
        native._force_toeplitz_plan(None)


def random_inputs(rng, n_in, n_out):
    """Random seed and data, including random unused high bits in the last bytes."""
    seed = rng.randbytes((toeplitz_seed_bits(n_in, n_out) + 7) // 8)
    data = rng.randbytes((n_in + 7) // 8)
    return seed, data


bit_counts = st.one_of(st.sampled_from(EDGE_BITS), st.integers(0, 3000))


def test_impls_include_portable():
    assert IMPLS[0] == "portable"
    assert native._get_impl() == IMPLS[-1]  # the default is the best available


@pytest.mark.parametrize("impl", IMPLS)
@given(n_in=bit_counts, n_out=bit_counts, rng_seed=st.integers(0, 2**32))
def test_matches_reference(impl, n_in, n_out, rng_seed):
    seed, data = random_inputs(random.Random(rng_seed), n_in, n_out)
    with using(impl):
        out = toeplitz_hash(seed, data, n_in, n_out)
    assert type(out) is bytes
    assert len(out) == (n_out + 7) // 8
    assert out == toeplitz_ref(seed, data, n_in, n_out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(25))
def test_mid_sizes_match_reference(impl, case):
    # Uniform sizes up to 2 * 10^4 bits (hypothesis favours small ones): every plan the cost model
    # picks for short inputs.
    rng = random.Random(case)
    n_in, n_out = rng.randrange(1, 20_000), rng.randrange(1, 20_000)
    seed, data = random_inputs(rng, n_in, n_out)
    with using(impl):
        out = toeplitz_hash(seed, data, n_in, n_out)
    assert out == toeplitz_ref(seed, data, n_in, n_out)


@pytest.mark.parametrize("impl", IMPLS)
@given(st.data())
def test_small_sizes_every_bit_chosen(impl, data):
    # Small enough for hypothesis to draw (and shrink) every input bit.
    n_in = data.draw(st.sampled_from(EDGE_BITS[:11]))
    n_out = data.draw(st.sampled_from(EDGE_BITS[:11]))
    seed = data.draw(st.binary(min_size=(toeplitz_seed_bits(n_in, n_out) + 7) // 8,
                               max_size=(toeplitz_seed_bits(n_in, n_out) + 7) // 8))
    vec = data.draw(st.binary(min_size=(n_in + 7) // 8, max_size=(n_in + 7) // 8))
    with using(impl):
        assert toeplitz_hash(seed, vec, n_in, n_out) == toeplitz_ref(seed, vec, n_in, n_out)


@pytest.mark.parametrize("n_in", [1, 7, 8, 63, 64, 65, 1000])
@pytest.mark.parametrize("n_out", [1, 7, 8, 63, 64, 65, 1000])
def test_unit_vectors_pick_seed_windows(n_in, n_out):
    # data = e_i selects column i: out_j = seed(j - i + n_in - 1).
    rng = random.Random(n_in * 7919 + n_out)
    seed, _ = random_inputs(rng, n_in, n_out)
    for i in {0, n_in // 2, n_in - 1}:
        data = bytearray((n_in + 7) // 8)
        data[i >> 3] |= 1 << (i & 7)
        expected = 0
        for j in range(n_out):
            k = j - i + n_in - 1
            expected |= ((seed[k >> 3] >> (k & 7)) & 1) << j
        assert toeplitz_hash(seed, data, n_in, n_out) == expected.to_bytes((n_out + 7) // 8, "little")


def test_unused_high_bits_are_ignored_and_output_high_bits_zero():
    rng = random.Random(1)
    n_in, n_out = 13, 11  # seed 23 bits: 3 bytes with one unused bit; data 2 bytes with 3 unused
    seed, data = random_inputs(rng, n_in, n_out)
    clean_seed = bytes([*seed[:-1], seed[-1] & 0x7F])
    clean_data = bytes([data[0], data[1] & 0x1F])
    out = toeplitz_hash(seed, data, n_in, n_out)
    assert out == toeplitz_hash(clean_seed, clean_data, n_in, n_out)
    assert out[-1] >> 3 == 0
    assert toeplitz_hash(b"\xff" * 3, b"\xff\xff", n_in, n_out)[-1] >> 3 == 0


def test_zero_sizes():
    assert toeplitz_hash(b"", b"", 0, 0) == b""
    assert toeplitz_hash(b"\xff", b"\xff", 8, 0) == b""  # 7 seed bits, no output
    assert toeplitz_hash(b"\xff" * 2, b"", 0, 10) == bytes(2)  # an empty sum
    assert toeplitz_seed_bits(0, 0) == 0
    assert toeplitz_seed_bits(8, 0) == 7
    assert toeplitz_seed_bits(10, 5) == 14


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(1, 6000),
    n_out=st.integers(1, 6000),
    k=st.integers(3, 10),
    rng_seed=st.integers(0, 2**32),
)
def test_square_blocks_match_reference(impl, n_in, n_out, k, rng_seed):
    # Long inputs are cut into square blocks: force that on short ones, with many small blocks,
    # seed windows reaching before the seed, partial last blocks and paired conversions.
    seed, data = random_inputs(random.Random(rng_seed), n_in, n_out)
    with using(impl, True, k):
        out = toeplitz_hash(seed, data, n_in, n_out)
    assert out == toeplitz_ref(seed, data, n_in, n_out)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(1, 3000),
    n_out=st.integers(1, 3000),
    k=st.integers(5, 16),
    rng_seed=st.integers(0, 2**32),
)
def test_longer_transforms_match_reference(impl, n_in, n_out, k, rng_seed):
    # One transform of 2^k, often longer than needed: the product folds differently, or not at
    # all. Lengths that would fold onto the needed bits are refused.
    seed, data = random_inputs(random.Random(rng_seed), n_in, n_out)
    try:
        with using(impl, False, k):
            out = toeplitz_hash(seed, data, n_in, n_out)
    except ValueError as exc:
        assert "forced plan does not fit" in str(exc)
        assume(False)
    assert out == toeplitz_ref(seed, data, n_in, n_out)


def test_forced_plan_that_does_not_fit():
    with using("auto", False, 1), pytest.raises(ValueError, match="plan does not fit n_in = 1000, n_out = 1000"):
        toeplitz_hash(bytes(250), bytes(125), 1000, 1000)
    with pytest.raises(ValueError, match="out of range"):
        native._force_toeplitz_plan(True, 99)


@pytest.mark.parametrize(("n_in", "n_out"), [(1_000_000, 500_000), (3_000_001, 1_000_003), (777_777, 2_000_000)])
def test_long_inputs_agree_across_impls_and_with_fft_reference(n_in, n_out):
    # These sizes take the blocked plans (and the longest single transforms) of the cost model.
    rng = random.Random(n_in)
    seed, data = random_inputs(rng, n_in, n_out)
    results = {}
    try:
        for name in IMPLS:
            native._set_impl(name)
            results[name] = toeplitz_hash(seed, data, n_in, n_out)
    finally:
        native._set_impl("auto")
    assert len(set(results.values())) == 1, "implementations disagree"
    try:
        import numpy  # noqa: F401
    except ImportError:
        # Without numpy: check a few output bits against the definition directly.
        out = results[IMPLS[0]]
        s = int.from_bytes(seed, "little")
        d = int.from_bytes(data, "little") & ((1 << n_in) - 1)
        rev = int(format(d, f"0{n_in}b")[::-1], 2)
        for j in [0, 1, n_out // 2, n_out - 1]:
            bit = ((s >> j) & rev & ((1 << n_in) - 1)).bit_count() & 1
            assert (out[j >> 3] >> (j & 7)) & 1 == bit
        return
    assert results[IMPLS[0]] == toeplitz_fft_numpy(seed, data, n_in, n_out)


def test_linear_in_data_and_in_seed():
    rng = random.Random(5)
    n_in, n_out = 400_000, 100_000
    s1, d1 = random_inputs(rng, n_in, n_out)
    s2, d2 = random_inputs(rng, n_in, n_out)

    def x(a, b):
        return bytes(p ^ q for p, q in zip(a, b))

    assert toeplitz_hash(s1, x(d1, d2), n_in, n_out) == x(
        toeplitz_hash(s1, d1, n_in, n_out), toeplitz_hash(s1, d2, n_in, n_out)
    )
    assert toeplitz_hash(x(s1, s2), d1, n_in, n_out) == x(
        toeplitz_hash(s1, d1, n_in, n_out), toeplitz_hash(s2, d1, n_in, n_out)
    )


def test_accepts_buffer_kinds_without_copying_semantics():
    rng = random.Random(9)
    n_in, n_out = 256, 128
    seed, data = random_inputs(rng, n_in, n_out)
    expected = toeplitz_ref(seed, data, n_in, n_out)
    assert toeplitz_hash(bytearray(seed), memoryview(data), n_in, n_out) == expected
    assert toeplitz_hash(memoryview(seed), array.array("Q", data), n_in, n_out) == expected
    np = pytest.importorskip("numpy")
    assert toeplitz_hash(np.frombuffer(seed, np.uint8), np.frombuffer(data, np.uint64), n_in, n_out) == expected


# ---- misuse ----


@pytest.mark.parametrize(
    ("seed_len", "data_len", "n_in", "n_out", "message"),
    [
        (1, 2, 10, 5, r"^toeplitz_hash: seed has 1 bytes but n_in \+ n_out - 1 = 14 bits take 2$"),
        (3, 2, 10, 5, r"^toeplitz_hash: seed has 3 bytes but n_in \+ n_out - 1 = 14 bits take 2$"),
        (2, 1, 10, 5, r"^toeplitz_hash: data has 1 bytes but n_in = 10 bits take 2$"),
        (2, 3, 10, 5, r"^toeplitz_hash: data has 3 bytes but n_in = 10 bits take 2$"),
        (1, 0, 0, 0, r"^toeplitz_hash: seed has 1 bytes but n_in \+ n_out - 1 = 0 bits take 0$"),
        (125_000, 124_999, 10**6, 1, r"^toeplitz_hash: data has 124999 bytes but n_in = 1000000 bits take 125000$"),
    ],
)
def test_wrong_sizes(seed_len, data_len, n_in, n_out, message):
    with pytest.raises(ValueError, match=message):
        toeplitz_hash(bytes(seed_len), bytes(data_len), n_in, n_out)


@pytest.mark.parametrize("name", ["n_in", "n_out"])
@pytest.mark.parametrize("bad", [-1, -(2**70)])
def test_negative_bit_counts(name, bad):
    args = {"n_in": 8, "n_out": 8}
    args[name] = bad
    with pytest.raises(ValueError, match=rf"^toeplitz_hash: {name} must be >= 0, not {bad}$"):
        toeplitz_hash(bytes(2), bytes(1), **args)


@pytest.mark.parametrize("name", ["n_in", "n_out"])
@pytest.mark.parametrize("bad", [8.0, "8", None, True])
def test_bit_counts_must_be_ints(name, bad):
    args = {"n_in": 8, "n_out": 8}
    args[name] = bad
    with pytest.raises(TypeError, match=rf"^toeplitz_hash: {name} must be an int, not"):
        toeplitz_hash(bytes(2), bytes(1), **args)


def test_huge_bit_counts_are_size_errors_not_crashes():
    with pytest.raises(ValueError, match="seed has 2 bytes"):
        toeplitz_hash(bytes(2), bytes(1), 8, 2**70)
    with pytest.raises(ValueError, match="data has 1 bytes"):
        toeplitz_hash(bytes(2), bytes(1), 2**64 + 8, 8)


@pytest.mark.parametrize("position", ["seed", "data"])
def test_not_buffers(position):
    args = {"seed": bytes(2), "data": bytes(1)}
    args[position] = "x"
    with pytest.raises(TypeError, match=rf"^toeplitz_hash: {position} must be a bytes-like object, not str$"):
        toeplitz_hash(args["seed"], args["data"], 8, 8)
    args[position] = memoryview(bytearray(4))[::2]
    with pytest.raises(ValueError, match=rf"^toeplitz_hash: {position} must be a one-dimensional contiguous"):
        toeplitz_hash(args["seed"], args["data"], 8, 8)


# ---- internals: the transform's constants, memory, the GIL ----


def test_cantor_basis():
    basis = [lib.qkd_gf64_cantor(i) for i in range(64)]
    assert basis[0] == 1
    for i in range(1, 64):
        assert gf64_mul(basis[i], basis[i]) ^ basis[i] == basis[i - 1]
    # Linearly independent over GF(2): Gaussian elimination keeps 64 pivots.
    pivots = {}
    for v in basis:
        while v:
            top = v.bit_length() - 1
            if top not in pivots:
                pivots[top] = v
                break
            v ^= pivots[top]
        assert v, "dependent basis"
    assert lib.qkd_gf64_cantor(64) == 0


@pytest.mark.parametrize(
    ("n_in", "most"),
    [(10**4, 64 << 10), (10**6, 2 << 20), (10**7, 16 << 20), (10**8, 160 << 20)],
)
def test_working_memory_is_bounded(n_in, most):
    # docs/native.md quotes these peaks for n_out = n_in / 2.
    used = lib.qkd_toeplitz_workspace(n_in, n_in // 2)
    assert 0 < used <= most


def test_releases_the_gil():
    # The C call must let other Python threads run: the longest pause the main thread sees while
    # a long hash runs in another thread must be well below the length of the hash. The hash is
    # long (a quarter of a second, portable code) so that a busy machine's scheduling noise is small
    # beside it: with the GIL held, the pause would be the whole call.
    n_in = 10_000_000
    rng = random.Random(2)
    seed, data = random_inputs(rng, n_in, n_in // 2)
    native._set_impl("portable")  # the slowest, so the call is long
    try:
        start = time.perf_counter()
        toeplitz_hash(seed, data, n_in, n_in // 2)
        duration = time.perf_counter() - start
        done = threading.Event()
        worker = threading.Thread(target=lambda: (toeplitz_hash(seed, data, n_in, n_in // 2), done.set()))
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.001)
        try:
            last = time.perf_counter()
            worker.start()
            longest = 0.0
            while not done.is_set():
                now = time.perf_counter()
                longest = max(longest, now - last)
                last = now
            worker.join()
        finally:
            sys.setswitchinterval(old_interval)
    finally:
        native._set_impl("auto")
    assert longest < duration / 2, (longest, duration)
