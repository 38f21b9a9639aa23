"""qkdnode.native.wc_tag / wc_verify against the pure-Python reference, on every implementation."""

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdnode import native
from qkdnode._native import ffi, lib
from qkdnode.native import (
    WC_KEY_BYTES,
    WC_MAX_MESSAGE_BYTES,
    WC_MIN_TAG_BYTES,
    WC_TAG_BYTES,
    wc_tag,
    wc_verify,
)

from .test_native_reference import gf128_mul, wc_hash_ref, wc_tag_ref

IMPLS = native._available_impls()
# Around the 16-byte block and the 8-block (128-byte) aggregation of the PCLMULQDQ code.
EDGE_LENGTHS = [0, 1, 15, 16, 17, 31, 32, 33, 127, 128, 129, 143, 144, 255, 256, 257, 1024, 1031]


@contextlib.contextmanager
def using(impl):
    native._set_impl(impl)
    try:
        yield
    finally:
        native._set_impl("auto")


def nonzero_keys():
    return st.binary(min_size=16, max_size=16).filter(any)


messages = st.one_of(
    st.sampled_from(EDGE_LENGTHS).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    st.binary(max_size=3000),
)


def test_sizes():
    assert (WC_KEY_BYTES, WC_TAG_BYTES, WC_MIN_TAG_BYTES, WC_MAX_MESSAGE_BYTES) == (16, 16, 8, 1 << 20)


@pytest.mark.parametrize("impl", IMPLS)
@given(key=nonzero_keys(), pad=st.binary(min_size=16, max_size=16), message=messages)
def test_tag_matches_reference(impl, key, pad, message):
    with using(impl):
        tag = wc_tag(key, pad, message)
        assert type(tag) is bytes
        assert tag == wc_tag_ref(key, pad, message)
        assert wc_verify(key, pad, message, tag) is True


@pytest.mark.parametrize("impl", IMPLS)
@given(key=nonzero_keys(), message=messages)
def test_hash_matches_reference(impl, key, message):
    out = ffi.new("uint8_t[16]")
    with using(impl):
        lib.qkd_wc_hash(out, key, message, len(message))
    assert bytes(out) == wc_hash_ref(key, message)


@pytest.mark.parametrize("tag_bytes", range(WC_MIN_TAG_BYTES, WC_TAG_BYTES + 1))
def test_short_tags_are_prefixes(tag_bytes):
    rng = random.Random(tag_bytes)
    key, pad, message = rng.randbytes(16), rng.randbytes(tag_bytes), rng.randbytes(100)
    tag = wc_tag(key, pad, message, tag_bytes=tag_bytes)
    assert tag == wc_tag_ref(key, pad + bytes(16 - tag_bytes), message)[:tag_bytes]
    assert wc_verify(key, pad, message, tag, tag_bytes=tag_bytes)
    # A tag of another length is wrong, never a prefix match.
    assert not wc_verify(key, pad, message, tag[:-1], tag_bytes=tag_bytes)
    assert not wc_verify(key, pad, message, tag + b"\x00", tag_bytes=tag_bytes)


@given(key=nonzero_keys(), pad=st.binary(min_size=16, max_size=16), message=st.binary(max_size=300),
       flip=st.integers(0, 10**6))
def test_any_changed_bit_fails(key, pad, message, flip):
    tag = wc_tag(key, pad, message)
    bad_tag = bytearray(tag)
    bad_tag[(flip // 8) % 16] ^= 1 << (flip % 8)
    assert not wc_verify(key, pad, message, bytes(bad_tag))
    if message:
        bad_message = bytearray(message)
        bad_message[(flip // 8) % len(message)] ^= 1 << (flip % 8)
        assert not wc_verify(key, pad, bytes(bad_message), tag)
    bad_pad = bytearray(pad)
    bad_pad[(flip // 8) % 16] ^= 1 << (flip % 8)
    assert not wc_verify(key, bytes(bad_pad), message, tag)


def test_length_is_bound_into_the_hash():
    # Zero padding of the last block must not make these collide: the length block differs.
    key = bytes(range(1, 17))
    hashes = {wc_tag(key, bytes(16), bytes(n)) for n in range(0, 49)}
    assert len(hashes) == 49
    # Without the length block, M and M || 0^16 would hash to h and h * H (not equal either),
    # but a zero message of any nonzero length would hash to zero: check that it does not.
    assert all(wc_tag(key, bytes(16), bytes(n)) != bytes(16) for n in range(1, 49))


def test_empty_message_is_the_length_block_only():
    key = (5).to_bytes(16, "little")
    assert wc_tag(key, bytes(16), b"") == bytes(16)  # length 0: 0 * H = 0
    assert wc_tag(key, bytes(16), b"\x00") == gf128_mul(8, 5).to_bytes(16, "little")  # 8 bits * H^1 + 0


@pytest.mark.parametrize("length", [1 << 16, WC_MAX_MESSAGE_BYTES])
def test_long_messages_agree_across_impls(length):
    rng = random.Random(length)
    key, pad, message = rng.randbytes(16), rng.randbytes(16), rng.randbytes(length)
    tags = set()
    for impl in IMPLS:
        with using(impl):
            tags.add(wc_tag(key, pad, message))
    assert len(tags) == 1
    if length <= 1 << 16:  # the reference takes about a second per 64 KiB
        assert tags == {wc_tag_ref(key, pad, message)}


def test_buffer_kinds():
    rng = random.Random(4)
    key, pad, message = rng.randbytes(16), rng.randbytes(16), rng.randbytes(77)
    expected = wc_tag_ref(key, pad, message)
    assert wc_tag(bytearray(key), memoryview(pad), bytearray(message)) == expected
    assert wc_verify(memoryview(key), bytearray(pad), memoryview(message), bytearray(expected))
    np = pytest.importorskip("numpy")
    assert wc_tag(np.frombuffer(key, np.uint64), np.frombuffer(pad, np.uint8), np.frombuffer(message, np.uint8)) == expected


# ---- misuse ----


@pytest.mark.parametrize("func", ["wc_tag", "wc_verify"])
@pytest.mark.parametrize(
    ("key_len", "pad_len", "tag_bytes", "message"),
    [
        (15, 16, 16, r"hash_key has 15 bytes but must have 16$"),
        (17, 16, 16, r"hash_key has 17 bytes but must have 16$"),
        (0, 16, 16, r"hash_key has 0 bytes but must have 16$"),
        (16, 15, 16, r"pad has 15 bytes but a 16-byte tag takes 16$"),
        (16, 32, 16, r"pad has 32 bytes but a 16-byte tag takes 16$"),
        (16, 16, 8, r"pad has 16 bytes but a 8-byte tag takes 8$"),
        (16, 7, 7, r"tag_bytes is 7 but must be from 8 to 16$"),
        (16, 17, 17, r"tag_bytes is 17 but must be from 8 to 16$"),
    ],
)
def test_wrong_sizes(func, key_len, pad_len, tag_bytes, message):
    key = b"\x01" * key_len
    args = (key, bytes(pad_len), b"message")
    call = getattr(native, func)
    with pytest.raises(ValueError, match=rf"^{func}: {message}"):
        if func == "wc_tag":
            call(*args, tag_bytes=tag_bytes)
        else:
            call(*args, bytes(16), tag_bytes=tag_bytes)


@pytest.mark.parametrize("func", ["wc_tag", "wc_verify"])
def test_message_limit(func):
    key, pad = b"\x01" * 16, bytes(16)
    extra = (bytes(16),) if func == "wc_verify" else ()
    getattr(native, func)(key, pad, bytes(WC_MAX_MESSAGE_BYTES), *extra)
    with pytest.raises(ValueError, match=rf"^{func}: message has 1048577 bytes, more than the 1048576 a tag covers$"):
        getattr(native, func)(key, pad, bytes(WC_MAX_MESSAGE_BYTES + 1), *extra)


@pytest.mark.parametrize("func", ["wc_tag", "wc_verify"])
@pytest.mark.parametrize("tag_len", [16, 3])
def test_zero_key_refused(func, tag_len):
    extra = (bytes(tag_len),) if func == "wc_verify" else ()
    with pytest.raises(ValueError, match=rf"^{func}: hash_key is all zero bytes"):
        getattr(native, func)(bytes(16), bytes(16), b"message", *extra)


@pytest.mark.parametrize("bad", [None, "key", 16, [0] * 16])
@pytest.mark.parametrize("position", ["hash_key", "pad", "message", "tag"])
def test_not_buffers(bad, position):
    args = {"hash_key": b"\x01" * 16, "pad": bytes(16), "message": b"m", "tag": bytes(16)}
    args[position] = bad
    with pytest.raises(TypeError, match=rf"^wc_verify: {position} must be a bytes-like object"):
        wc_verify(args["hash_key"], args["pad"], args["message"], args["tag"])
    if position != "tag":
        with pytest.raises(TypeError, match=rf"^wc_tag: {position} must be a bytes-like object"):
            wc_tag(args["hash_key"], args["pad"], args["message"])


@pytest.mark.parametrize("bad", [16.0, "16", True])
def test_tag_bytes_must_be_int(bad):
    with pytest.raises(TypeError, match=r"^wc_tag: tag_bytes must be an int"):
        wc_tag(b"\x01" * 16, bytes(16), b"m", tag_bytes=bad)


def test_c_level_checks():
    # The C functions check too (for callers other than this module): no crash, -1.
    out = ffi.new("uint8_t[16]")
    assert lib.qkd_wc_tag(out, bytes(16), bytes(16), 16, b"m", 1) == -1  # zero key
    assert lib.qkd_wc_tag(out, b"\x01" * 16, bytes(16), 17, b"m", 1) == -1
    assert lib.qkd_wc_tag(out, b"\x01" * 16, bytes(16), 7, b"m", 1) == -1
    assert lib.qkd_wc_verify(out, b"\x01" * 16, bytes(16), 16, b"m", WC_MAX_MESSAGE_BYTES + 1) == -1
