"""Relayed keys against direct ones, in one run on the demo's five-node network.

    .venv/bin/python -m bench.relay [--requests 200] [--repeat 3] [--out FILE.json]

For sae-a1 at node A: enc_keys (one 256-bit key) to sae-b1 (node B, a direct link) as the
baseline, then to sae-e1 (node E, three hops through trusted nodes), sequentially (latency)
and with 16 concurrent requesters (throughput). Every key is also fetched with dec_keys at the
slave's node and compared. Reports medians over the repeats and the relay/direct ratios, and
the link key spent per relayed key bit (from qkdnode_relay_link_bits_total). JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hil.testbed import DEFAULT_TOPOLOGY, Testbed, load_topology
from tests.conftest import scrape
from tests.sae_client import SaeClient, bits


async def filled(tb: Testbed, bits_wanted: float, timeout: float = 180.0) -> None:
    """Until every pool of the network holds `bits_wanted` (the ETSI 014 links fill at the pace
    their drivers fetch; the benchmark measures hand-out and relay, not ingest)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        levels = [v for node in tb.manifest()["nodes"].values() for k, v in scrape(node["metrics"]).items()
                  if k.startswith("qkdnode_pool_ready_bits{")]
        if levels and min(levels) >= bits_wanted:
            return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"the pools did not reach {bits_wanted:.0f} bits within {timeout:g} s")


async def run_once(tb: Testbed, slave: str, requests: int, concurrency: int) -> dict:
    await filled(tb, requests * 1024 * 1.2)
    m = tb.manifest()
    lat: list[float] = []
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, slave) as s:
        # Wait until the path has key (pools fill in the first seconds).
        for _ in range(300):
            status, _ = await a.enc_keys(slave, number=1, size=256)
            if status == 200:
                break
            await asyncio.sleep(0.2)
        todo = iter(range(requests))
        got: list[dict] = []

        async def worker():
            for _ in todo:
                t0 = time.perf_counter()
                status, answer = await a.enc_keys(slave, number=1, size=256)
                if status != 200:
                    raise RuntimeError(f"enc_keys {slave}: {status} {answer}")
                lat.append(time.perf_counter() - t0)
                got.append(answer)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        for answer in got:  # every key identical at the slave's node
            status, theirs = await s.dec_keys("sae-a1", [k["key_ID"] for k in answer["keys"]])
            if status != 200 or bits(theirs) != bits(answer):
                raise RuntimeError(f"{slave}: a key differs or is missing at the slave's node")
    lat.sort()
    return {"requests_per_s": len(lat) / elapsed, "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000}


def spent_bits(tb: Testbed) -> float:
    total = 0.0
    for node in tb.manifest()["nodes"].values():
        for k, v in scrape(node["metrics"]).items():
            if k.startswith("qkdnode_relay_link_bits_total{"):
                total += v
    return total


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {}
    relayed_bits = spent = 0.0
    with tempfile.TemporaryDirectory() as d:
        tb = Testbed(Path(d) / "net", topology=load_topology(DEFAULT_TOPOLOGY), rate_bps=1e6, initial_keys=4096,
                     pool_target_bits=max(1 << 18, args.requests * 1536), cv_time_scale=40.0)
        await tb.start()
        try:
            for _ in range(args.repeat):
                for name, slave, conc in (("direct_sequential", "sae-b1", 1), ("relay3_sequential", "sae-e1", 1),
                                          ("direct_16", "sae-b1", 16), ("relay3_16", "sae-e1", 16)):
                    before = spent_bits(tb)
                    runs.setdefault(name, []).append(await run_once(tb, slave, args.requests, conc))
                    if name.startswith("relay"):
                        spent += spent_bits(tb) - before
                        relayed_bits += args.requests * 256
        finally:
            await tb.stop()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    result = {
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "requests_per_run": args.requests, "repeats": args.repeat, "medians": med,
        "ratios": {
            "relay3_over_direct_p50_sequential": med["relay3_sequential"]["p50_ms"] / med["direct_sequential"]["p50_ms"],
            "relay3_over_direct_rps_16": med["relay3_16"]["requests_per_s"] / med["direct_16"]["requests_per_s"],
        },
        # The warm-up request of each relay run is relayed too but not counted: a slight overestimate.
        "link_bits_per_relayed_key_bit": spent / relayed_bits if relayed_bits else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
