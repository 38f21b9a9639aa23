"""The C XOR (qkdnode._native through qkdnode.native) against a pure-Python reference."""

import array
import random
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdnode import native
from qkdnode.native import otp_decrypt, otp_encrypt, xor, xor_into

# Around the 8-byte word and 16/32-byte vector boundaries of the C loop, plus large buffers.
EDGE_LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 4096, 100_003]


def ref_xor(a: bytes, b: bytes) -> bytes:
    assert len(a) == len(b)
    return bytes(x ^ y for x, y in zip(a, b))


@st.composite
def same_size_pair(draw, max_size=100_000):
    n = draw(st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, max_size)))
    if n <= 512:
        # Small: let hypothesis pick (and shrink) every byte.
        return draw(st.binary(min_size=n, max_size=n)), draw(st.binary(min_size=n, max_size=n))
    rng = random.Random(draw(st.integers(0, 2**64 - 1)))
    return rng.randbytes(n), rng.randbytes(n)


@given(same_size_pair())
def test_xor_matches_reference(pair):
    a, b = pair
    out = xor(a, b)
    assert type(out) is bytes
    assert out == ref_xor(a, b)


@given(same_size_pair(), st.integers(0, 7), st.integers(0, 7), st.integers(0, 7))
def test_xor_into_unaligned_and_stays_in_bounds(pair, off_dst, off_a, off_b):
    a, b = pair
    n = len(a)
    guard = b"\xa5" * 16

    def placed(data, offset):
        buf = bytearray(guard[:offset] + data + guard)
        return buf, memoryview(buf)[offset : offset + n]

    dst_buf, dst = placed(bytes(n), off_dst)
    _, va = placed(a, off_a)
    _, vb = placed(b, off_b)
    assert xor_into(dst, va, vb) is None
    assert bytes(dst) == ref_xor(a, b)
    assert dst_buf[:off_dst] == guard[:off_dst]
    assert dst_buf[off_dst + n :] == guard


@given(same_size_pair())
def test_dst_may_be_a(pair):
    a, b = pair
    buf = bytearray(a)
    xor_into(buf, buf, b)
    assert buf == ref_xor(a, b)


@given(same_size_pair())
def test_dst_may_be_b(pair):
    a, b = pair
    buf = bytearray(b)
    xor_into(buf, a, buf)
    assert buf == ref_xor(a, b)


@given(st.binary(min_size=1, max_size=200))
def test_dst_may_be_both(data):
    buf = bytearray(data)
    xor_into(buf, buf, buf)
    assert buf == bytes(len(data))


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "array_B", "array_I"])
def test_buffer_kinds(kind):
    rng = random.Random(kind)
    a, b = rng.randbytes(67 * 4), rng.randbytes(67 * 4)
    convert = {
        "bytes": bytes,
        "bytearray": bytearray,
        "memoryview": memoryview,
        "array_B": lambda x: array.array("B", x),
        "array_I": lambda x: array.array("I", x),
    }[kind]
    expected = ref_xor(a, b)
    assert xor(convert(a), convert(b)) == expected
    assert xor(convert(a), b) == expected
    dst = array.array("I", bytes(len(a))) if kind == "array_I" else bytearray(len(a))
    xor_into(dst, convert(a), convert(b))
    assert bytes(dst) == expected


def test_sizes_count_bytes_not_items():
    # 3 items of 4 bytes each: 12 bytes.
    words = array.array("I", [1, 2, 3])
    assert xor(words, bytes(12)) == words.tobytes()
    with pytest.raises(ValueError, match=r"xor: b has 3 bytes but a has 12"):
        xor(words, bytes(3))


@pytest.mark.parametrize(
    ("dst_len", "a_len", "b_len", "message"),
    [
        (32, 31, 32, r"^xor_into: a has 31 bytes but dst has 32$"),
        (32, 32, 33, r"^xor_into: b has 33 bytes but dst has 32$"),
        (0, 1, 0, r"^xor_into: a has 1 bytes but dst has 0$"),
    ],
)
def test_xor_into_size_mismatch(dst_len, a_len, b_len, message):
    dst = bytearray(b"\x11" * dst_len)
    with pytest.raises(ValueError, match=message):
        xor_into(dst, bytes(a_len), bytes(b_len))
    assert dst == b"\x11" * dst_len


def test_xor_size_mismatch():
    with pytest.raises(ValueError, match=r"^xor: b has 8 bytes but a has 7$"):
        xor(bytes(7), bytes(8))


@pytest.mark.parametrize("dst", [b"\x00" * 8, memoryview(bytearray(8)).toreadonly()])
def test_read_only_dst(dst):
    with pytest.raises(TypeError, match=r"^xor_into: dst must be writable"):
        xor_into(dst, bytes(8), bytes(8))


@pytest.mark.parametrize("bad", [8, "eight bytes", None, [1, 2, 3]])
@pytest.mark.parametrize("position", ["dst", "a", "b"])
def test_not_a_buffer(bad, position):
    args = {"dst": bytearray(8), "a": bytes(8), "b": bytes(8)}
    args[position] = bad
    with pytest.raises(TypeError, match=rf"^xor_into: {position} must be a bytes-like object"):
        xor_into(args["dst"], args["a"], args["b"])


@pytest.mark.parametrize("position", ["a", "b"])
def test_not_a_buffer_xor(position):
    args = {"a": bytes(4), "b": bytes(4)}
    args[position] = "abcd"
    with pytest.raises(TypeError, match=rf"^xor: {position} must be a bytes-like object, not str"):
        xor(args["a"], args["b"])


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: memoryview(bytearray(10))[::2], id="strided"),
        pytest.param(lambda: memoryview(bytearray(10))[::-1], id="reversed"),
        pytest.param(lambda: memoryview(bytearray(12)).cast("B", (3, 4)), id="2d"),
    ],
)
@pytest.mark.parametrize("position", ["dst", "a", "b"])
def test_non_contiguous_or_multidimensional(bad, position):
    buf = bad()
    args = {"dst": bytearray(buf.nbytes), "a": bytes(buf.nbytes), "b": bytes(buf.nbytes)}
    args[position] = buf
    with pytest.raises(ValueError, match=rf"^xor_into: {position} must be a one-dimensional contiguous"):
        xor_into(args["dst"], args["a"], args["b"])


@pytest.mark.parametrize("shift", [1, 7, 8, 9, -1, -8])
@pytest.mark.parametrize("position", ["a", "b"])
def test_partial_overlap_rejected(shift, position):
    backing = bytearray(range(64))
    view = memoryview(backing)
    dst = view[16 : 16 + 32]
    src = view[16 + shift : 16 + shift + 32]
    args = {"a": bytes(32), "b": bytes(32)}
    args[position] = src
    with pytest.raises(ValueError, match=rf"^xor_into: dst partially overlaps {position}"):
        xor_into(dst, args["a"], args["b"])
    assert backing == bytearray(range(64))


def test_adjacent_buffers_are_not_overlapping():
    backing = bytearray(range(48))
    view = memoryview(backing)
    xor_into(view[16:32], view[0:16], view[32:48])
    assert backing[16:32] == ref_xor(bytes(range(16)), bytes(range(32, 48)))


@given(same_size_pair())
def test_otp_round_trip(pair):
    pad, message = pair
    ciphertext = otp_encrypt(pad, message)
    assert ciphertext == ref_xor(pad, message)
    assert otp_decrypt(pad, ciphertext) == message


def test_otp_changes_the_message():
    message = b"attack at dawn"
    pad = bytes(range(1, len(message) + 1))
    ciphertext = otp_encrypt(pad, message)
    assert all(c != m for c, m in zip(ciphertext, message))
    assert otp_decrypt(bytearray(pad), memoryview(ciphertext)) == message


@pytest.mark.parametrize(("pad_len", "data_len"), [(31, 32), (33, 32), (0, 1), (1, 0)])
def test_otp_pad_length_mismatch(pad_len, data_len):
    with pytest.raises(ValueError, match=rf"^otp_encrypt: pad has {pad_len} bytes but message has {data_len};"):
        otp_encrypt(bytes(pad_len), bytes(data_len))
    with pytest.raises(ValueError, match=rf"^otp_decrypt: pad has {pad_len} bytes but ciphertext has {data_len};"):
        otp_decrypt(bytes(pad_len), bytes(data_len))


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "qkdnode._native", None)
    monkeypatch.delitem(sys.modules, "qkdnode.native")
    with pytest.raises(ImportError, match=r"make install"):
        import qkdnode.native  # noqa: F401
    assert native.xor(b"\x01", b"\x03") == b"\x02"


@pytest.mark.parametrize("offset", [0, 1, 8, 15])
@pytest.mark.parametrize("extra", [0, 1, 63, 65])
def test_large_xor_with_streaming_stores(offset, extra):
    # From 4 MiB the C code writes around the cache, 16 bytes at a time from an aligned address:
    # an unaligned start, a tail and in-place use must still give every byte.
    n = (4 << 20) + extra
    rng = random.Random(offset * 100 + extra)
    a, b = rng.randbytes(n), rng.randbytes(n)
    expected = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")
    backing = bytearray(n + 32)
    dst = memoryview(backing)[offset : offset + n]
    xor_into(dst, a, b)
    assert bytes(dst) == expected
    assert backing[:offset] == bytes(offset) and backing[offset + n :] == bytes(32 - offset)
    in_place = bytearray(a)
    xor_into(in_place, in_place, b)
    assert in_place == expected
    assert xor(a, b) == expected
