"""Python binding of the C kernels in native/ (compiled by cffi into qkdnode._native).

Every function takes any object with the buffer protocol (bytes, bytearray, memoryview,
array.array, numpy arrays, ...) and hands its memory to C in place, without copying. Buffers must
be one-dimensional and contiguous; sizes are counted in bytes, whatever the item type.
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

__all__ = ["otp_decrypt", "otp_encrypt", "xor", "xor_into"]


def _cdata(func: str, name: str, obj: Buffer, writable: bool = False):
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


def xor_into(dst: Buffer, a: Buffer, b: Buffer) -> None:
    """Set ``dst[i] = a[i] ^ b[i]`` for every byte, in place.

    All three must have the same size in bytes and ``dst`` must be writable. ``dst`` may be ``a``
    or ``b`` (the same memory), but must not otherwise overlap them.
    """
    d = _cdata("xor_into", "dst", dst, writable=True)
    pa = _cdata("xor_into", "a", a)
    pb = _cdata("xor_into", "b", b)
    _same_size("xor_into", "dst", d, "a", pa)
    _same_size("xor_into", "dst", d, "b", pb)
    n = len(d)
    for name, src in (("a", pa), ("b", pb)):
        # The C loop works a word at a time, so a shifted overlap would read bytes it already wrote.
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
