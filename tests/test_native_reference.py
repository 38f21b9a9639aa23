"""Pure-Python references of the native kernels, and tests that the references mean what they say.

The other test_native_* modules compare qkdnode.native with these. Each reference is written from
the definition in docs/native.md, independently of the algorithm in C: the Toeplitz hash as a
parity per output bit (not a polynomial product), the Wegman-Carter hash as a sum of powers of
the key (not Horner's rule).
"""

import random

import pytest

# ---- bits ----


def get_bit(buf: bytes, k: int) -> int:
    """Bit k of a byte string: (buf[k >> 3] >> (k & 7)) & 1, the order used everywhere."""
    return (buf[k >> 3] >> (k & 7)) & 1


def bits_as_int(buf: bytes, nbits: int) -> int:
    """The first nbits bits of buf as an integer, bit k of buf being bit k of the integer."""
    return int.from_bytes(buf, "little") & ((1 << nbits) - 1)


# ---- Toeplitz hashing ----


def toeplitz_literal(seed: bytes, data: bytes, n_in: int, n_out: int) -> bytes:
    """The definition, bit by bit: out_j = XOR_i seed(j - i + n_in - 1) & data(i)."""
    out = bytearray((n_out + 7) // 8)
    for j in range(n_out):
        bit = 0
        for i in range(n_in):
            bit ^= get_bit(seed, j - i + n_in - 1) & get_bit(data, i)
        out[j >> 3] |= bit << (j & 7)
    return bytes(out)


def toeplitz_ref(seed: bytes, data: bytes, n_in: int, n_out: int) -> bytes:
    """The same with Python integers as bit vectors: out_j is the parity of the AND of the seed
    bits j .. j + n_in - 1 with the data bits in reverse order (data bit i meets seed bit
    j + (n_in - 1 - i)). O(n_in * n_out / 64) machine operations: fine up to ~10^4 x 10^4."""
    if n_in == 0 or n_out == 0:
        return bytes((n_out + 7) // 8)
    s = bits_as_int(seed, n_in + n_out - 1)
    d = bits_as_int(data, n_in)
    reversed_data = int(format(d, f"0{n_in}b")[::-1], 2)
    out = 0
    for j in range(n_out):
        out |= (((s >> j) & reversed_data).bit_count() & 1) << j
    return out.to_bytes((n_out + 7) // 8, "little")


def toeplitz_fft_numpy(seed: bytes, data: bytes, n_in: int, n_out: int) -> bytes:
    """Reference for long inputs: the integer convolution of the bit sequences with numpy's FFT,
    rounded, mod 2 (exact while the float error stays below 1/2, as it does up to ~10^7 bits)."""
    import numpy as np

    s = np.unpackbits(np.frombuffer(seed, np.uint8), bitorder="little")[: n_in + n_out - 1]
    d = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:n_in]
    size = 1 << (len(s) + len(d) - 1).bit_length()
    conv = np.fft.irfft(np.fft.rfft(s.astype(np.float64), size) * np.fft.rfft(d.astype(np.float64), size), size)
    bits = (np.rint(conv[n_in - 1 : n_in - 1 + n_out]).astype(np.int64) & 1).astype(np.uint8)
    return np.packbits(bits, bitorder="little").tobytes()


# ---- GF(2^64) (the transform's field; only the tests of its constants use it) ----

GF64_POLY = (1 << 64) | 0b11011  # y^64 + y^4 + y^3 + y + 1


def clmul(a: int, b: int) -> int:
    """Carry-less product of two non-negative integers read as polynomials over GF(2)."""
    result = 0
    while b:
        if b & 1:
            result ^= a
        a <<= 1
        b >>= 1
    return result


def poly_mod(a: int, modulus: int) -> int:
    degree = modulus.bit_length() - 1
    while a.bit_length() > degree:
        a ^= modulus << (a.bit_length() - 1 - degree)
    return a


def gf64_mul(a: int, b: int) -> int:
    return poly_mod(clmul(a, b), GF64_POLY)


# ---- Wegman-Carter ----

GF128_POLY = (1 << 128) | 0x87  # x^128 + x^7 + x^2 + x + 1


def gf128_mul(a: int, b: int) -> int:
    """Product in GF(2^128): shift-and-add with reduction at each step."""
    result = 0
    for i in range(128):
        if (b >> i) & 1:
            result ^= a
        a <<= 1
        if a >> 128:
            a ^= GF128_POLY
    return result


def wc_hash_ref(key: bytes, message: bytes) -> bytes:
    """sum_i M_i H^(l+2-i) over the 16-byte blocks M_1..M_l of the message (last one zero-padded,
    little-endian: byte k bit b is the coefficient of x^(8k+b)) and the length block M_(l+1)
    (bit length, 64-bit little-endian, then zeros), computed from the last block up with
    explicit powers of H."""
    h = int.from_bytes(key, "little")
    padded = message + bytes(-len(message) % 16)
    blocks = [int.from_bytes(padded[i : i + 16], "little") for i in range(0, len(padded), 16)]
    blocks.append(8 * len(message))
    total, power = 0, h
    for block in reversed(blocks):
        total ^= gf128_mul(block, power)
        power = gf128_mul(power, h)
    return total.to_bytes(16, "little")


def wc_tag_ref(key: bytes, pad: bytes, message: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(wc_hash_ref(key, message), pad))


# ---- tests of the references ----


@pytest.mark.parametrize("seed", range(40))
def test_toeplitz_ref_is_the_definition(seed):
    rng = random.Random(seed)
    n_in = rng.choice([0, 1, 2, 7, 8, 9, rng.randrange(1, 90)])
    n_out = rng.choice([0, 1, 2, 7, 8, 9, rng.randrange(1, 90)])
    seed_bytes = rng.randbytes((max(n_in + n_out - 1, 0) + 7) // 8)
    data = rng.randbytes((n_in + 7) // 8)
    assert toeplitz_ref(seed_bytes, data, n_in, n_out) == toeplitz_literal(seed_bytes, data, n_in, n_out)


def test_toeplitz_ref_small_example():
    # n_in = 2, n_out = 2: seed bits s0 s1 s2, data bits d0 d1.
    # out0 = s1 d0 + s0 d1, out1 = s2 d0 + s1 d1.
    seed = bytes([0b101])  # s0 = 1, s1 = 0, s2 = 1
    assert toeplitz_ref(seed, bytes([0b01]), 2, 2) == bytes([0b10])  # d0: out0 = s1, out1 = s2
    assert toeplitz_ref(seed, bytes([0b10]), 2, 2) == bytes([0b01])  # d1: out0 = s0, out1 = s1


def test_toeplitz_fft_reference_agrees():
    pytest.importorskip("numpy")
    rng = random.Random(3)
    for n_in, n_out in [(1, 1), (64, 65), (1000, 333), (2049, 4000)]:
        seed = rng.randbytes((n_in + n_out - 1 + 7) // 8)
        data = rng.randbytes((n_in + 7) // 8)
        assert toeplitz_fft_numpy(seed, data, n_in, n_out) == toeplitz_ref(seed, data, n_in, n_out)


def test_gf128_mul_reduces_x128():
    assert gf128_mul(1 << 127, 2) == 0x87  # x^127 * x = x^128 = x^7 + x^2 + x + 1
    assert gf128_mul(1, 0xDEADBEEF) == 0xDEADBEEF


def test_wc_hash_ref_of_one_block():
    key = (3).to_bytes(16, "little")  # H = x + 1
    message = (1).to_bytes(16, "little")  # M_1 = 1, length block 128
    h = 3
    expected = gf128_mul(1, gf128_mul(h, h)) ^ gf128_mul(128, h)
    assert wc_hash_ref(key, message) == expected.to_bytes(16, "little")
