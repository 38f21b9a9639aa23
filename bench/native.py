"""Benchmarks of the native library against baselines measured in the same run.

    python -m bench.native [--out FILE] [--quick]

Prints one JSON document (and writes it to FILE): the machine, then per benchmark the median
of several runs for ours and the baselines, and the targets of docs/performance.md with pass or
fail. Needs numpy (the XOR and Toeplitz baselines). A full run takes about a minute.

- XOR of 64 MiB buffers: GB/s (10^9 bytes of output per second) for xor_into, numpy.bitwise_xor
  and a plain copy of one buffer into another (memoryview slice assignment, i.e. memcpy).
- XOR of 32-byte keys through the Python binding: ns per call.
- Toeplitz hashing, n = 10^4 .. 10^7 input bits and n/2 output bits: input Mbit/s for ours and
  two numpy FFT references, whose results must match ours bit for bit: the textbook one (linear
  convolution of the bit sequences, power-of-two FFT length) and a faster one (the needed middle
  of a cyclic convolution only as long as the seed, 5-smooth length). The 50x target is checked
  against the faster.
- Wegman-Carter tags of 1 KiB and 1 MiB messages: MB/s for wc_tag and hmac.digest(SHA-256).
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from qkdnode import native
from qkdnode.native import toeplitz_hash, wc_tag, xor_into

MIB = 1 << 20


def median_seconds(func, repeats: int, inner: int = 1) -> float:
    """Median over `repeats` runs of the time of one call (each run averages `inner` calls)."""
    func()  # warm up: page in buffers, first-call costs
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            func()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


# ---- numpy FFT references of Toeplitz hashing ----


def _bits(buf: bytes, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[:count].astype(np.float64)


def _pack(conv: np.ndarray) -> bytes:
    bits = (np.rint(conv).astype(np.int64) & 1).astype(np.uint8)
    return np.packbits(bits, bitorder="little").tobytes()


def toeplitz_numpy_linear(seed: bytes, data: bytes, n_in: int, n_out: int) -> bytes:
    """Output bit j is coefficient n_in - 1 + j of the integer convolution seed * data, mod 2."""
    s, d = _bits(seed, n_in + n_out - 1), _bits(data, n_in)
    size = 1 << (len(s) + len(d) - 2).bit_length()  # >= len(s) + len(d) - 1
    conv = np.fft.irfft(np.fft.rfft(s, size) * np.fft.rfft(d, size), size)
    return _pack(conv[n_in - 1 : n_in - 1 + n_out])


def _smooth_at_least(x: int) -> int:
    """Smallest 2^a 3^b 5^c >= x (pocketfft is fastest on such lengths)."""
    best, p2 = 1 << x.bit_length(), 1
    while p2 < best:
        p3 = p2
        while p3 < best:
            p5 = p3
            while p5 < best:
                if p5 >= x:
                    best = p5
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return best


def toeplitz_numpy_cyclic(seed: bytes, data: bytes, n_in: int, n_out: int) -> bytes:
    """The same coefficients from a cyclic convolution of length >= n_in + n_out - 1: what wraps
    around lands below coefficient n_in - 1, outside the output."""
    s, d = _bits(seed, n_in + n_out - 1), _bits(data, n_in)
    size = _smooth_at_least(len(s))
    conv = np.fft.irfft(np.fft.rfft(s, size) * np.fft.rfft(d, size), size)
    return _pack(conv[n_in - 1 : n_in - 1 + n_out])


# ---- benchmarks ----


def bench_xor(repeats: int) -> dict:
    n = 64 * MIB
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, n, dtype=np.uint8)
    b = rng.integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n, np.uint8)
    xor_into(dst, a, b)
    assert np.array_equal(dst, a ^ b)
    dst_view, a_view = memoryview(dst), memoryview(a)

    def copy():
        dst_view[:] = a_view

    times = {
        "ours": median_seconds(lambda: xor_into(dst, a, b), repeats),
        "numpy_bitwise_xor": median_seconds(lambda: np.bitwise_xor(a, b, out=dst), repeats),
        "copy": median_seconds(copy, repeats),
        "numpy_copyto": median_seconds(lambda: np.copyto(dst, a), repeats),
    }
    gbps = {name: round(n / t / 1e9, 2) for name, t in times.items()}
    return {"bytes": n, "GB_per_s": gbps, "ours_over_copy": round(gbps["ours"] / gbps["copy"], 3)}


def bench_xor_small(repeats: int) -> dict:
    a, b, dst = os.urandom(32), os.urandom(32), bytearray(32)
    seconds = median_seconds(lambda: xor_into(dst, a, b), repeats, inner=100_000)
    return {"bytes": 32, "ns_per_call": round(seconds * 1e9, 1)}


def bench_toeplitz(sizes: list[int], quick: bool) -> dict:
    rng = np.random.default_rng(2)
    rows = []
    for n_in in sizes:
        n_out = n_in // 2
        seed = rng.integers(0, 256, (n_in + n_out - 1 + 7) // 8, dtype=np.uint8).tobytes()
        data = rng.integers(0, 256, (n_in + 7) // 8, dtype=np.uint8).tobytes()
        ours_out = toeplitz_hash(seed, data, n_in, n_out)
        linear_out = toeplitz_numpy_linear(seed, data, n_in, n_out)
        cyclic_out = toeplitz_numpy_cyclic(seed, data, n_in, n_out)
        ours_repeats = 15 if n_in <= 10**6 else 7
        ref_repeats = 1 if quick else (7 if n_in <= 10**5 else 5 if n_in <= 10**6 else 3)
        t_ours = median_seconds(lambda: toeplitz_hash(seed, data, n_in, n_out), ours_repeats,
                                inner=max(1, 10**5 // n_in))
        t_linear = median_seconds(lambda: toeplitz_numpy_linear(seed, data, n_in, n_out), ref_repeats)
        t_cyclic = median_seconds(lambda: toeplitz_numpy_cyclic(seed, data, n_in, n_out), ref_repeats)
        rows.append({
            "n_in": n_in,
            "n_out": n_out,
            "ms": {"ours": round(t_ours * 1e3, 4), "numpy_fft_linear": round(t_linear * 1e3, 2),
                   "numpy_fft_cyclic": round(t_cyclic * 1e3, 2)},
            "Mbit_per_s": {"ours": round(n_in / t_ours / 1e6, 1),
                           "numpy_fft_linear": round(n_in / t_linear / 1e6, 2),
                           "numpy_fft_cyclic": round(n_in / t_cyclic / 1e6, 2)},
            "speedup": {"over_numpy_fft_linear": round(t_linear / t_ours, 1),
                        "over_numpy_fft_cyclic": round(t_cyclic / t_ours, 1)},
            "bit_exact": ours_out == linear_out == cyclic_out,
            "workspace_bytes": native.lib.qkd_toeplitz_workspace(n_in, n_out),
        })
    return {"rows": rows}


def bench_toeplitz_impls(n_in: int, repeats: int) -> dict:
    """The same hash with each implementation this CPU has (all give the same bits)."""
    rng = np.random.default_rng(3)
    n_out = n_in // 2
    seed = rng.integers(0, 256, (n_in + n_out - 1 + 7) // 8, dtype=np.uint8).tobytes()
    data = rng.integers(0, 256, (n_in + 7) // 8, dtype=np.uint8).tobytes()
    result, outputs = {}, set()
    try:
        for impl in native._available_impls():
            native._set_impl(impl)
            outputs.add(toeplitz_hash(seed, data, n_in, n_out))
            seconds = median_seconds(lambda: toeplitz_hash(seed, data, n_in, n_out), repeats)
            result[impl] = {"ms": round(seconds * 1e3, 3), "Mbit_per_s": round(n_in / seconds / 1e6, 1)}
    finally:
        native._set_impl("auto")
    return {"n_in": n_in, "n_out": n_out, "by_impl": result, "identical": len(outputs) == 1}


def bench_wc(repeats: int) -> dict:
    key, pad = os.urandom(16), os.urandom(16)
    rows = []
    for size in (1024, MIB):
        message = os.urandom(size)
        inner = 2000 if size == 1024 else 10
        t_ours = median_seconds(lambda: wc_tag(key, pad, message), repeats, inner)
        t_hmac = median_seconds(lambda: hmac.digest(key, message, "sha256"), repeats, inner)
        rows.append({
            "bytes": size,
            "MB_per_s": {"ours": round(size / t_ours / 1e6, 1), "hmac_sha256": round(size / t_hmac / 1e6, 1)},
            "us_per_tag": {"ours": round(t_ours * 1e6, 2), "hmac_sha256": round(t_hmac * 1e6, 2)},
            "ours_over_hmac": round(t_hmac / t_ours, 2),
        })
    return {"rows": rows}


def machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "impl": native._get_impl(),
        "impls_available": native._available_impls(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def targets(report: dict) -> dict:
    tz = {row["n_in"]: row for row in report["toeplitz"]["rows"]}
    checks = {
        "xor_64MiB_at_least_0.8x_copy": (report["xor_64MiB"]["ours_over_copy"], 0.8),
        "xor_32B_at_most_1000ns": (report["xor_32B"]["ns_per_call"], 1000),
        "wc_1MiB_at_least_1x_hmac_sha256": (report["wegman_carter"]["rows"][1]["ours_over_hmac"], 1.0),
    }
    result = {}
    for name, (value, bound) in checks.items():
        ok = value <= bound if "at_most" in name else value >= bound
        result[name] = {"value": value, "pass": ok}
    if 10**6 in tz:
        value = tz[10**6]["speedup"]["over_numpy_fft_cyclic"]
        result["toeplitz_1e6_at_least_50x_numpy_fft"] = {
            "value": value, "pass": value >= 50,
            "over_textbook_fft": tz[10**6]["speedup"]["over_numpy_fft_linear"],
        }
    if 10**5 in tz and 10**7 in tz:
        growth = tz[10**7]["ms"]["ours"] / tz[10**5]["ms"]["ours"]
        n_log_n = (1e7 * math.log(1e7)) / (1e5 * math.log(1e5))
        result["toeplitz_time_grows_at_most_n_log_n_1e5_to_1e7"] = {
            "value": round(growth, 1), "n_log_n_ratio": round(n_log_n, 1), "pass": growth <= n_log_n,
        }
    result["toeplitz_bit_exact"] = {"pass": all(row["bit_exact"] for row in tz.values())}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON report to this file")
    parser.add_argument("--quick", action="store_true", help="one run of the numpy references, fewer sizes")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 7
    sizes = [10**4, 10**5, 10**6] if args.quick else [10**4, 10**5, 10**6, 10**7]
    started = time.perf_counter()
    report = {"machine": machine(), "command": "python -m bench.native" + (" --quick" if args.quick else "")}
    report["xor_64MiB"] = bench_xor(repeats)
    report["xor_32B"] = bench_xor_small(repeats)
    report["toeplitz"] = bench_toeplitz(sizes, args.quick)
    report["toeplitz_impls"] = bench_toeplitz_impls(10**6, repeats)
    report["wegman_carter"] = bench_wc(repeats)
    report["targets"] = targets(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(check["pass"] for check in report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
