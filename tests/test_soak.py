"""Soak (issue 9): the five-node network under steady SAE load while faults come and go at random
(devices hanging or answering garbage, the peer channel dropping, a CV-QKD module resetting).
Resident memory and open file descriptors of every daemon stay flat: compared after a warm-up
and at the end, once the last fault has cleared, within a tolerance. Every key handed out is
still served once, identically.

QKDNODE_SOAK_SECONDS sets the length (default 75 s; 1800 with QKDNODE_CAMPAIGN=long).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from hil.netfault import FaultyLink
from tests.campaign_support import LONG, CampaignTestbed, Ledger, Load, process_figures, record

SOAK_S = float(os.environ.get("QKDNODE_SOAK_SECONDS", "1800" if LONG else "75"))
WARMUP_S = 20.0
RSS_SLACK_KB, RSS_SLACK_RATIO = 12_000, 0.15   # growth allowed: 12 MB plus 15 %
FD_SLACK = 12   # pooled connections to peers and devices come and go; a leak grows with time


async def test_memory_and_descriptors_stay_flat_under_load_and_random_faults(tmp_path):
    rng = random.Random(int(os.environ.get("QKDNODE_SOAK_SEED", "5")))
    box: dict = {}
    proxy = await FaultyLink(lambda: ("127.0.0.1", box["tb"].nodes["C"].peer_port)).start()
    tb = CampaignTestbed(tmp_path / "net", peer_via={("B", "C"): proxy.port})
    box["tb"] = tb
    await tb.start()
    ledger = Ledger()
    load = Load(tb, ledger, pause=0.2, seed=rng.randrange(1 << 30))
    kmes = [(link, d) for link, ds in tb.devices.items() for d in ds if hasattr(d, "ends")]
    cv = tb.devices["D-C"][0]
    faults = 0
    samples: dict[str, list[dict]] = {n: [] for n in tb.nodes}
    try:
        load.start()
        await asyncio.sleep(WARMUP_S)
        start = {n: process_figures(p.proc.pid) for n, p in tb.nodes.items()}
        end_at = time.monotonic() + SOAK_S
        while time.monotonic() < end_at:
            kind = rng.choice(["kme", "kme", "peer", "cv"])
            hold = rng.uniform(1.0, 4.0)
            if kind == "kme":
                _, pair = rng.choice(kmes)
                f = pair.ends[rng.choice("AB")].faults
                attr = rng.choice(["hang", "garbage", "down", "disconnect"])
                setattr(f, attr, True)
                await asyncio.sleep(hold)
                setattr(f, attr, False)
            elif kind == "peer":
                proxy.set(**rng.choice([{"disconnect": True}, {"hang": True}, {"garbage": True}]))
                await asyncio.sleep(hold)
                proxy.clear()
            else:
                m = rng.choice([cv.tx, cv.rx])
                m.faults.garbage = True
                await asyncio.sleep(hold)
                m.faults.garbage = False
            faults += 1
            for n, p in tb.nodes.items():
                samples[n].append(process_figures(p.proc.pid))
            await asyncio.sleep(rng.uniform(1.0, 3.0))
        await asyncio.sleep(8)   # the last fault heals
        end = {n: process_figures(p.proc.pid) for n, p in tb.nodes.items()}
        await load.stop()
        left = await load.settle()
        alive = {n: p.proc.poll() is None for n, p in tb.nodes.items()}
    finally:
        await load.close()
        await tb.stop()
        await proxy.stop()
    figures = {n: {"rss_kb_start": start[n]["rss_kb"], "rss_kb_end": end[n]["rss_kb"],
                   "rss_kb_max": max([s["rss_kb"] for s in samples[n]] + [end[n]["rss_kb"]]),
                   "fds_start": start[n]["fds"], "fds_end": end[n]["fds"],
                   "fds_max": max([s["fds"] for s in samples[n]] + [end[n]["fds"]])} for n in tb.nodes}
    issued = ledger.counts.get("keys_issued", 0)
    record("soak", seconds=SOAK_S, warmup_s=WARMUP_S, faults=faults, keys_issued=issued, unfetched=left,
           problems=len(ledger.problems), statuses=load.statuses, nodes=figures,
           tolerance=f"RSS +{RSS_SLACK_KB // 1000} MB +{int(RSS_SLACK_RATIO * 100)} %, fds +{FD_SLACK}")
    assert all(alive.values()), alive
    assert not ledger.problems and left == 0 and issued > 0, ledger.problems[:5]
    for n, f in figures.items():
        assert f["rss_kb_end"] <= f["rss_kb_start"] * (1 + RSS_SLACK_RATIO) + RSS_SLACK_KB, (n, f)
        assert f["fds_end"] <= f["fds_start"] + FD_SLACK, (n, f)
