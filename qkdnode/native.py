"""Python binding of the C kernels in native/ (compiled by cffi into qkdnode._native).

Every function takes any object with the buffer protocol (bytes, bytearray, memoryview,
array.array, numpy arrays, ...) and hands its memory to C in place, without copying. Buffers must
be one-dimensional and contiguous; sizes are counted in bytes, whatever the item type. Wrong
sizes raise ValueError naming the argument and the sizes.

The C calls run with the GIL released, so a long one (a Toeplitz hash of 10^7 bits takes tens of
milliseconds) can be handed to a thread without stalling the event loop::

    key = await asyncio.to_thread(toeplitz_hash, seed, reconciled, n_in, n_out)

docs/native.md gives the bit order, the algorithms, the Wegman-Carter forgery bound and the key
each tag consumes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    from qkdnode._native import ffi, lib
except ImportError as exc:
    if isinstance(exc, ModuleNotFoundError) and exc.name != "qkdnode._native":
        raise  # a missing dependency such as cffi, not a missing build
    raise ImportError(
        "qkdnode._native, the compiled C library of qkdnode, is missing or unusable: "
        "build it with `make install` (pip install -e .)"
    ) from exc

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "WC_KEY_BYTES",
    "WC_MAX_MESSAGE_BYTES",
    "WC_MIN_TAG_BYTES",
    "WC_TAG_BYTES",
    "otp_decrypt",
    "otp_encrypt",
    "toeplitz_hash",
    "toeplitz_seed_bits",
    "wc_tag",
    "wc_verify",
    "xor",
    "xor_into",
]

#: Bytes of a Wegman-Carter hash key (an element of GF(2^128), reusable across tags).
WC_KEY_BYTES: int = lib.QKD_WC_KEY_BYTES
#: Bytes of a Wegman-Carter tag, and of the one-time pad each tag consumes, by default.
WC_TAG_BYTES: int = lib.QKD_WC_HASH_BYTES
#: Shortest tag wc_tag makes (a tag of t bytes has forgery bound (blocks + 1) / 2^(8t)).
WC_MIN_TAG_BYTES: int = lib.QKD_WC_MIN_TAG_BYTES
#: Longest message a tag covers (1 MiB); the forgery bound in docs/native.md assumes it.
WC_MAX_MESSAGE_BYTES: int = lib.QKD_WC_MAX_MESSAGE_BYTES

# Exact types whose buffers are always one-dimensional and contiguous, and never overlap another
# object's: the fast path of _cdata skips the memoryview inspection for them (a 32-byte XOR has
# to stay well under a microsecond).
_PLAIN = (bytes, bytearray)


def _cdata(func: str, name: str, obj: Buffer, writable: bool = False):
    kind = type(obj)
    if kind is bytearray or (kind is bytes and not writable):
        return ffi.from_buffer("uint8_t[]", obj)
    try:
        with memoryview(obj) as view:
            flat = view.ndim <= 1 and view.contiguous
            readonly = view.readonly
    except TypeError:
        raise TypeError(
            f"{func}: {name} must be a bytes-like object, not {type(obj).__name__}"
        ) from None
    if not flat:
        raise ValueError(f"{func}: {name} must be a one-dimensional contiguous buffer")
    if writable and readonly:
        raise TypeError(f"{func}: {name} must be writable, but the {type(obj).__name__} is read-only")
    # The cdata holds the buffer export until it dies (a bytearray cannot be resized meanwhile), so
    # its len(), the size in bytes, is the one the C call will see.
    return ffi.from_buffer("uint8_t[]", obj, require_writable=writable)


def _same_size(func: str, ref_name: str, ref, name: str, other, why: str = "") -> None:
    if len(other) != len(ref):
        raise ValueError(f"{func}: {name} has {len(other)} bytes but {ref_name} has {len(ref)}{why}")


def _address(cdata) -> int:
    return int(ffi.cast("uintptr_t", cdata))


def _xor_new(a, b) -> bytes:
    out = ffi.new("uint8_t[]", len(a))
    lib.qkd_xor(out, a, b, len(a))
    return ffi.buffer(out)[:]


_from_buffer = ffi.from_buffer
_qkd_xor = lib.qkd_xor


def xor_into(dst: Buffer, a: Buffer, b: Buffer) -> None:
    """Set ``dst[i] = a[i] ^ b[i]`` for every byte, in place.

    All three must have the same size in bytes and ``dst`` must be writable. ``dst`` may be ``a``
    or ``b`` (the same memory), but must not otherwise overlap them.
    """
    if type(dst) is bytearray and type(a) in _PLAIN and type(b) in _PLAIN:
        # The common case, a key relayed between bytes objects, in well under a microsecond.
        d = _from_buffer("uint8_t[]", dst)
        pa = _from_buffer("uint8_t[]", a)
        pb = _from_buffer("uint8_t[]", b)
        n = len(d)
        if len(pa) == n and len(pb) == n:
            _qkd_xor(d, pa, pb, n)
            return
    d = _cdata("xor_into", "dst", dst, writable=True)
    pa = _cdata("xor_into", "a", a)
    pb = _cdata("xor_into", "b", b)
    n = len(d)
    if len(pa) != n:
        _same_size("xor_into", "dst", d, "a", pa)
    if len(pb) != n:
        _same_size("xor_into", "dst", d, "b", pb)
    if not (type(dst) in _PLAIN and type(a) in _PLAIN and type(b) in _PLAIN):
        for name, src in (("a", pa), ("b", pb)):
            # The C loop works a word at a time, so a shifted overlap would read bytes it already
            # wrote. (Distinct bytes/bytearray objects never share memory: no check needed.)
            start, other = _address(d), _address(src)
            if start != other and start < other + n and other < start + n:
                raise ValueError(f"xor_into: dst partially overlaps {name}; it may only be {name} itself")
    lib.qkd_xor(d, pa, pb, n)


def xor(a: Buffer, b: Buffer) -> bytes:
    """Return ``a ^ b`` byte by byte as new bytes; ``a`` and ``b`` must have the same size."""
    pa = _cdata("xor", "a", a)
    pb = _cdata("xor", "b", b)
    _same_size("xor", "a", pa, "b", pb)
    return _xor_new(pa, pb)


def _otp(func: str, pad: Buffer, data: Buffer, data_name: str) -> bytes:
    pp = _cdata(func, "pad", pad)
    pd = _cdata(func, data_name, data)
    why = f"; a one-time pad must be exactly as long as the {data_name}"
    _same_size(func, data_name, pd, "pad", pp, why)
    return _xor_new(pp, pd)


def otp_encrypt(pad: Buffer, message: Buffer) -> bytes:
    """Encrypt ``message`` with the one-time pad ``pad``: the XOR of the two.

    The pad must be exactly as long as the message: a pad is used whole and only once, never
    truncated, stretched or reused (reuse reveals the XOR of the two plaintexts). Keeping track
    of which key material has been consumed is the caller's job.
    """
    return _otp("otp_encrypt", pad, message, "message")


def otp_decrypt(pad: Buffer, ciphertext: Buffer) -> bytes:
    """Decrypt ``ciphertext`` with the one-time pad ``pad`` it was encrypted with.

    The pad must be exactly as long as the ciphertext, and like any one-time pad is used whole
    and once.
    """
    return _otp("otp_decrypt", pad, ciphertext, "ciphertext")


# ---- Toeplitz hashing ----


def _bit_count(func: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{func}: {name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{func}: {name} must be >= 0, not {value}")
    return value


def toeplitz_seed_bits(n_in: int, n_out: int) -> int:
    """Bits of seed ``toeplitz_hash`` needs for ``n_in`` input and ``n_out`` output bits."""
    n_in = _bit_count("toeplitz_seed_bits", "n_in", n_in)
    n_out = _bit_count("toeplitz_seed_bits", "n_out", n_out)
    return max(n_in + n_out - 1, 0)


def toeplitz_hash(seed: Buffer, data: Buffer, n_in: int, n_out: int) -> bytes:
    """Multiply the ``n_in``-bit ``data`` by the ``n_out`` x ``n_in`` Toeplitz matrix of ``seed``.

    Bit k of a byte string is ``(buf[k >> 3] >> (k & 7)) & 1``. ``data`` holds ``n_in`` bits in
    exactly ``ceil(n_in / 8)`` bytes and ``seed`` ``n_in + n_out - 1`` bits in exactly
    ``ceil((n_in + n_out - 1) / 8)`` bytes; the unused high bits of their last bytes are ignored.
    Output bit ``j`` is the XOR over ``i < n_in`` of ``seed_bit(j - i + n_in - 1) & data_bit(i)``;
    the result has ``ceil(n_out / 8)`` bytes with the unused high bits of the last one zero.

    Runs in O(n log n) time (about 1 ms for 10^6 input bits), with the GIL released and with no
    dependence on the bit values; memory: see ``qkd_toeplitz_workspace`` in docs/native.md.
    """
    func = "toeplitz_hash"
    n_in = _bit_count(func, "n_in", n_in)
    n_out = _bit_count(func, "n_out", n_out)
    ps = _cdata(func, "seed", seed)
    pd = _cdata(func, "data", data)
    seed_bits = max(n_in + n_out - 1, 0)
    if len(pd) != (n_in + 7) // 8:
        raise ValueError(
            f"{func}: data has {len(pd)} bytes but n_in = {n_in} bits take {(n_in + 7) // 8}"
        )
    if len(ps) != (seed_bits + 7) // 8:
        raise ValueError(
            f"{func}: seed has {len(ps)} bytes but n_in + n_out - 1 = {seed_bits} bits "
            f"take {(seed_bits + 7) // 8}"
        )
    out = ffi.new("uint8_t[]", (n_out + 7) // 8)
    status = lib.qkd_toeplitz(out, ps, pd, n_in, n_out)
    if status == -1:
        raise MemoryError(
            f"{func}: cannot allocate {lib.qkd_toeplitz_workspace(n_in, n_out)} bytes of working "
            f"memory for n_in = {n_in}, n_out = {n_out}"
        )
    if status != 0:  # only a plan forced by the tests' _force_toeplitz_plan
        raise ValueError(f"{func}: the forced plan does not fit n_in = {n_in}, n_out = {n_out}")
    return ffi.buffer(out)[:]


# ---- Wegman-Carter tags ----


def _wc_args(func: str, hash_key, pad, message, tag_bytes):
    if isinstance(tag_bytes, bool) or not isinstance(tag_bytes, int):
        raise TypeError(f"{func}: tag_bytes must be an int, not {type(tag_bytes).__name__}")
    if not WC_MIN_TAG_BYTES <= tag_bytes <= WC_TAG_BYTES:
        raise ValueError(
            f"{func}: tag_bytes is {tag_bytes} but must be from {WC_MIN_TAG_BYTES} to {WC_TAG_BYTES}"
        )
    pk = _cdata(func, "hash_key", hash_key)
    pp = _cdata(func, "pad", pad)
    pm = _cdata(func, "message", message)
    if len(pk) != WC_KEY_BYTES:
        raise ValueError(f"{func}: hash_key has {len(pk)} bytes but must have {WC_KEY_BYTES}")
    if len(pp) != tag_bytes:
        raise ValueError(
            f"{func}: pad has {len(pp)} bytes but a {tag_bytes}-byte tag takes {tag_bytes}"
        )
    if len(pm) > WC_MAX_MESSAGE_BYTES:
        raise ValueError(
            f"{func}: message has {len(pm)} bytes, more than the {WC_MAX_MESSAGE_BYTES} a tag covers"
        )
    return pk, pp, pm


def _zero_key(func: str):
    return ValueError(
        f"{func}: hash_key is all zero bytes; a zero key hashes every message to zero "
        f"(use {WC_KEY_BYTES} bytes of fresh key)"
    )


def wc_tag(hash_key: Buffer, pad: Buffer, message: Buffer, *, tag_bytes: int = WC_TAG_BYTES) -> bytes:
    """Wegman-Carter tag of ``message``: its polynomial hash under ``hash_key``, XOR ``pad``.

    ``hash_key`` is 16 bytes (128 bits) of secret key, reusable for many messages; ``pad`` is
    ``tag_bytes`` (16 by default, at least 8) bytes of fresh secret key used for this one tag only;
    ``message`` is at most ``WC_MAX_MESSAGE_BYTES`` (1 MiB). A forger who has seen any number of
    tags succeeds with probability at most (ceil(len(message) / 16) + 1) / 2^(8 * tag_bytes) per
    attempt: docs/native.md.
    """
    pk, pp, pm = _wc_args("wc_tag", hash_key, pad, message, tag_bytes)
    out = ffi.new("uint8_t[]", tag_bytes)
    if lib.qkd_wc_tag(out, pk, pp, tag_bytes, pm, len(pm)) != 0:
        raise _zero_key("wc_tag")
    return ffi.buffer(out)[:]


def wc_verify(
    hash_key: Buffer, pad: Buffer, message: Buffer, tag: Buffer, *, tag_bytes: int = WC_TAG_BYTES
) -> bool:
    """True if ``tag`` is ``wc_tag(hash_key, pad, message, tag_bytes=tag_bytes)``.

    The comparison takes the same time wherever the tags differ. A ``tag`` of another length than
    ``tag_bytes`` is a wrong tag (False), not an error: it comes from the peer. As with wc_tag, the
    key, pad and message sizes must be right (ValueError otherwise).
    """
    pk, pp, pm = _wc_args("wc_verify", hash_key, pad, message, tag_bytes)
    pt = _cdata("wc_verify", "tag", tag)
    if len(pt) != tag_bytes:
        if all(b == 0 for b in bytes(pk)):
            raise _zero_key("wc_verify")
        return False
    result = lib.qkd_wc_verify(pt, pk, pp, tag_bytes, pm, len(pm))
    if result < 0:
        raise _zero_key("wc_verify")
    return result == 1


# ---- implementation choice, for tests and benchmarks ----

_IMPLS = {
    "auto": lib.QKD_IMPL_AUTO,
    "portable": lib.QKD_IMPL_PORTABLE,
    "pclmul": lib.QKD_IMPL_PCLMUL,
    "avx512": lib.QKD_IMPL_AVX512,
}


def _available_impls() -> list[str]:
    """Names of the kernel implementations this CPU can run, "portable" first."""
    return [name for name, code in _IMPLS.items() if name != "auto" and lib.qkd_impl_available(code)]


def _get_impl() -> str:
    """The implementation the next call uses ("portable", "pclmul" or "avx512")."""
    code = lib.qkd_get_impl()
    return next(name for name, value in _IMPLS.items() if value == code and name != "auto")


def _set_impl(name: str) -> None:
    """Force an implementation ("auto" restores the default). Tests only: a process-wide setting.

    All implementations give identical results; this is how the tests compare them.
    """
    if name not in _IMPLS:
        raise ValueError(f"_set_impl: unknown implementation {name!r}; known: {', '.join(_IMPLS)}")
    if lib.qkd_set_impl(_IMPLS[name]) != 0:
        raise ValueError(
            f"_set_impl: {name!r} cannot run on this CPU; available: {', '.join(_available_impls())}"
        )


def _force_toeplitz_plan(blocked: bool | None, k: int = 0) -> None:
    """Tests only: force toeplitz_hash to one transform of 2^k (blocked=False; k=0: shortest that
    fits) or square blocks with transforms of 2^k (blocked=True); None restores the cost model."""
    mode = -1 if blocked is None else int(blocked)
    if lib.qkd_toeplitz_force_plan(mode, k) != 0:
        raise ValueError(f"_force_toeplitz_plan: k = {k} is out of range")
