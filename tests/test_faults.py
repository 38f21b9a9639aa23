"""Fault matrix (issue 9): the demo's five-node network under steady SAE load, every emulated
device and the peer channel taking every fault its emulator knows. For each row:

- the daemons stay up (no node process exits);
- the fault shows in the metrics within a bounded time (DETECT_S): the device's health
  (`qkdnode_device_up` where the metrics catalogue has it, else `qkdnode_driver_up`) at the
  node that uses it, `qkdnode_peer_up` on both sides of a peer channel, the discard counter for
  keys that differ, the pool for key exhaustion;
- requests that can be served still are: every SAE pair with a path around the fault gets keys
  during the fault (the pools buffer a device outage; relay routes around a dead link);
- service resumes by itself once the fault clears (RESUME_S): the device delivers key again,
  the peer answers again, every pair is served again;
- over the whole run, no key is lost, none served twice, none different at the two ends (the
  ledger of every enc_keys answer against what each slave got).

QKDNODE_CAMPAIGN=long runs every fault at both ends of every device; the default runs a subset
that still takes each kind of fault once (and is part of `make test`). QKDNODE_FAULT_FILTER runs
only the rows whose "target fault" text contains it, e.g. QKDNODE_FAULT_FILTER=CV-QKD for the
CV-QKD rows (the network still starts and is checked the same way).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field

from hil.netfault import FaultyLink
from hil.pki import ThrowawayPKI
from tests.campaign_support import (LONG, PAIRS, CampaignTestbed, Ledger, Load, Saes, metric, record, scrape,
                                    up_series, wait_until)

DETECT_S = 30.0     # a fault shows in the metrics within this
RESUME_S = 75.0     # and service is back within this once it clears: the link's fill loop backs off up
                    # to 30 s after repeated failures, a driver's reconnection up to its backoff_max
E_PAIRS = {p for p in PAIRS if "sae-e1" in p or "sae-e2" in p}

# KME devices of the demo network: (link, part index, master node, slave node)
KMES = [("A-B", 0, "A", "B"), ("A-B", 1, "A", "B"), ("B-C", 0, "B", "C"), ("A-D", 0, "A", "D"),
        ("C-E", 0, "C", "E")]
KME_FAULTS = ["hang", "slow beyond the timeout", "slow within the timeout", "garbage", "out of service (503)",
              "disconnect", "TLS failure", "keys differ at the two ends", "key exhaustion"]
CV_FAULTS = ["hang", "slow beyond the timeout", "garbage", "line dropped", "excess noise above threshold",
             "channel loss above limit (no key)", "module reset", "corrupted block line"]
PEER_FAULTS = ["hang", "slow", "disconnect", "garbage", "TLS failure", "node stopped (SIGSTOP)",
               "node killed (SIGKILL) and restarted"]


@dataclass
class Row:
    target: str
    fault: str
    unserved: set = field(default_factory=set)   # pairs allowed to get no key during the fault
    inject: object = None
    clear: object = None
    detect: object = None                         # async () -> bool
    detected_by: str = ""
    resumed: object = None                        # async () -> bool, besides every pair being served
    window: float = 8.0 if LONG else 3.0          # seconds the fault lasts after it was detected


def rows_for(tb: CampaignTestbed, proxies: dict[str, FaultyLink], untrusted) -> list[Row]:
    rows: list[Row] = []

    def up(node: str, link: str, want: float):
        async def check():
            try:
                values = await asyncio.to_thread(scrape, tb.manifest()["nodes"][node]["metrics"], 2)
            except OSError:
                return False
            return up_series(values, link) == want
        return check

    def counter(node: str, series: str):
        state = {}

        async def grew():
            v = await metric(tb, node, series) or 0.0
            state.setdefault("base", v)
            return v > state["base"]
        return grew

    # -- ETSI 014 KMEs: each end is the node's device; the node at that end must notice.
    for link, part, master, slave in KMES:
        pair = tb.devices[link][part]
        kind = pair.limits["key_size"] and ("idq" if pair.limits["max_key_per_request"] == 8 else "toshiba")
        isolated = E_PAIRS if link == "C-E" else set()
        for side, node in (("A", master), ("B", slave)):
            if not LONG and (link, part, side) not in CI_KMES:
                continue
            f = pair.ends[side].faults
            name = f"KME {kind} of link {link}{' (combined, part %d)' % part if link == 'A-B' else ''}, at node {node}"
            for fault in KME_FAULTS:
                if not LONG and fault not in CI_KMES[(link, part, side)]:
                    continue
                if fault == "key exhaustion" and side == "B":
                    continue  # the two ends share one key stream: exhaustion is the device's, not an end's
                r = Row(name, fault, set(isolated))
                blocks = counter(master, f'qkdnode_blocks_ready_total{{link="{link}"}}')
                r.resumed = blocks
                if fault == "hang":
                    r.inject, r.clear = (lambda f=f: setattr(f, "hang", True)), (lambda f=f: setattr(f, "hang", False))
                elif fault == "slow beyond the timeout":
                    r.inject, r.clear = (lambda f=f: setattr(f, "delay", 3.0)), (lambda f=f: setattr(f, "delay", 0.0))
                elif fault == "slow within the timeout":
                    r.inject, r.clear = (lambda f=f: setattr(f, "delay", 0.5)), (lambda f=f: setattr(f, "delay", 0.0))
                elif fault == "garbage":
                    r.inject, r.clear = (lambda f=f: setattr(f, "garbage", True)), \
                        (lambda f=f: setattr(f, "garbage", False))
                elif fault == "out of service (503)":
                    r.inject, r.clear = (lambda f=f: setattr(f, "down", True)), (lambda f=f: setattr(f, "down", False))
                elif fault == "disconnect":
                    r.inject, r.clear = (lambda f=f: setattr(f, "disconnect", True)), \
                        (lambda f=f: setattr(f, "disconnect", False))
                elif fault == "TLS failure":
                    r.inject, r.clear = (lambda f=f: setattr(f, "tls", untrusted)), (lambda f=f: setattr(f, "tls", None))
                elif fault == "keys differ at the two ends":
                    r.inject, r.clear = (lambda f=f: setattr(f, "corrupt", True)), \
                        (lambda f=f: setattr(f, "corrupt", False))
                elif fault == "key exhaustion":
                    r.inject = lambda pair=pair, link=link, m=master, s=slave: _exhaust(tb, pair, link, m, s)
                    r.clear = lambda pair=pair: setattr(pair.stream, "rate_bps", tb.rate_bps)
                    r.detect = _pool_below(tb, master, link, 512)
                    r.detected_by = f"qkdnode_pool_ready_bits{{link={link}}} < 512 at {master} (pool empty)"
                    r.unserved |= isolated
                if fault == "key exhaustion":
                    pass
                elif fault == "slow within the timeout":
                    r.detect, r.detected_by = blocks, "nothing to detect: key keeps coming (blocks_ready_total grows)"
                elif fault == "keys differ at the two ends":
                    r.detect = counter(master, f'qkdnode_blocks_discarded_total{{link="{link}",reason="mismatch"}}')
                    r.detected_by = f"qkdnode_blocks_discarded_total{{reason=mismatch}} at {master}"
                else:
                    r.detect, r.detected_by = up(node, link, 0.0), f"device/driver up = 0 at {node}"
                    r.resumed = _both(up(node, link, 1.0), blocks)
                rows.append(r)

    # -- the CV-QKD pair of link D-C (transmitter at D, master; receiver at C)
    cv = tb.devices["D-C"][0]
    for fault in CV_FAULTS:
        if not LONG and fault not in CI_CV:
            continue
        for mod, node in ((cv.tx, "D"), (cv.rx, "C")):
            if not LONG and mod is cv.rx:
                continue
            r = Row(f"CV-QKD {'transmitter' if mod is cv.tx else 'receiver'} of link D-C, at node {node}", fault)
            blocks = counter("D", 'qkdnode_blocks_ready_total{link="D-C"}')
            r.resumed = blocks
            r.detect, r.detected_by = up(node, "D-C", 0.0), f"device/driver up = 0 at {node}"
            r.resumed = _both(up(node, "D-C", 1.0), blocks)
            if fault == "hang":
                r.inject, r.clear = (lambda m=mod: setattr(m.faults, "hang", True)), \
                    (lambda m=mod: setattr(m.faults, "hang", False))
            elif fault == "slow beyond the timeout":
                r.inject, r.clear = (lambda m=mod: setattr(m.faults, "delay", 3.0)), \
                    (lambda m=mod: setattr(m.faults, "delay", 0.0))
            elif fault == "garbage":
                r.inject, r.clear = (lambda m=mod: setattr(m.faults, "garbage", True)), \
                    (lambda m=mod: setattr(m.faults, "garbage", False))
            elif fault == "line dropped":
                r.inject, r.clear = mod.drop_line, mod.open_line
            elif fault == "module reset":
                r.inject, r.clear = mod.power_cycle, (lambda: None)
                r.detect, r.detected_by = None, "the driver applies its settings again (no outage to show)"
            elif fault == "corrupted block line":
                r.inject, r.clear = mod.corrupt_next_block, (lambda: None)
                r.detect, r.detected_by = None, "the line is rejected and the block fetched again by GET"
            elif fault in ("excess noise above threshold", "channel loss above limit (no key)"):
                if mod is cv.rx:
                    continue
                # The link makes no key meanwhile; the pools' buffer keeps the pairs served. The
                # module's telemetry shows why (docs/metrics.md), and recovery is the module
                # running again and new blocks agreed.
                if fault.startswith("excess"):
                    r.inject, r.clear = (lambda: cv.set_excess_noise(0.08)), (lambda: cv.set_excess_noise(0.01))
                    r.detect = _link_figure(tb, "D", 'qkdnode_link_excess_noise_snu{link="D-C"}', lambda v: v >= 0.05)
                    r.detected_by = "qkdnode_link_excess_noise_snu{link=D-C} >= 0.05 at D"
                else:
                    r.inject, r.clear = (lambda: cv.set_channel_loss(25.0)), (lambda: cv.set_channel_loss(8.0))
                    r.detect = _both(_link_figure(tb, "D", 'qkdnode_link_state{link="D-C",state="no-key"}',
                                                  lambda v: v == 1),
                                     _link_figure(tb, "D", 'qkdnode_link_secret_key_rate_bits_per_second{link="D-C"}',
                                                  lambda v: v == 0))
                    r.detected_by = "qkdnode_link_state{link=D-C,state=no-key} = 1 and key rate 0 at D"
                r.resumed = _both(_link_figure(tb, "D", 'qkdnode_link_state{link="D-C",state="running"}',
                                               lambda v: v == 1), blocks)
            rows.append(r)

    # -- the peer channel B-C (both directions through fault proxies), and node B as a peer
    for fault in PEER_FAULTS:
        if not LONG and fault not in CI_PEER:
            continue
        r = Row("peer channel B-C" if "node" not in fault else "node B (peer of A and C)", fault, window=25.0 if LONG else 5.0)
        both = lambda v: _both(_peer_up(tb, "B", "C", v), _peer_up(tb, "C", "B", v))  # noqa: E731
        r.detect, r.resumed = both(0.0), both(1.0)
        r.detected_by = "qkdnode_peer_up = 0 at both ends"
        px = list(proxies.values())
        if fault == "hang":
            r.inject, r.clear = (lambda: [p.set(hang=True) for p in px]), (lambda: [p.clear() for p in px])
        elif fault == "slow":
            r.inject, r.clear = (lambda: [p.set(delay=3.0) for p in px]), (lambda: [p.clear() for p in px])
        elif fault == "disconnect":
            r.inject, r.clear = (lambda: [p.set(disconnect=True) for p in px]), (lambda: [p.clear() for p in px])
        elif fault == "garbage":
            r.inject, r.clear = (lambda: [p.set(garbage=True) for p in px]), (lambda: [p.clear() for p in px])
        elif fault == "TLS failure":
            r.inject, r.clear = (lambda: [p.set(tls=untrusted) for p in px]), (lambda: [p.clear() for p in px])
        elif fault == "node stopped (SIGSTOP)":
            r.unserved = {p for p in PAIRS if "sae-b1" in p or "sae-b2" in p}
            r.inject = lambda: tb.nodes["B"].proc.send_signal(signal.SIGSTOP)
            r.clear = lambda: tb.nodes["B"].proc.send_signal(signal.SIGCONT)
            r.detect = _both(_peer_up(tb, "A", "B", 0.0), _peer_up(tb, "C", "B", 0.0))
            r.resumed = _both(_peer_up(tb, "A", "B", 1.0), _peer_up(tb, "C", "B", 1.0))
            r.detected_by = "qkdnode_peer_up{peer=B} = 0 at A and C"
        elif fault == "node killed (SIGKILL) and restarted":
            r.unserved = {p for p in PAIRS if "sae-b1" in p or "sae-b2" in p}
            r.inject = lambda: tb.nodes["B"].proc.send_signal(signal.SIGKILL)
            r.clear = lambda: asyncio.ensure_future(tb.restart("B"))
            r.detect = _both(_peer_up(tb, "A", "B", 0.0), _peer_up(tb, "C", "B", 0.0))
            r.resumed = _both(_peer_up(tb, "A", "B", 1.0), _peer_up(tb, "C", "B", 1.0))
            r.detected_by = "qkdnode_peer_up{peer=B} = 0 at A and C"
        rows.append(r)
    return rows


# The default (CI) subset: each kind of fault once, spread over the devices and both ends.
CI_KMES = {("C-E", 0, "A"): {"hang"}, ("A-D", 0, "B"): {"garbage"}, ("A-B", 0, "A"): {"disconnect"},
           ("B-C", 0, "A"): {"TLS failure", "key exhaustion"}, ("A-B", 1, "B"): {"out of service (503)"},
           ("A-D", 0, "A"): {"keys differ at the two ends"}}
CI_CV = {"hang", "excess noise above threshold"}
CI_PEER = {"disconnect", "hang", "node killed (SIGKILL) and restarted"}


async def _exhaust(tb, pair, link: str, master: str, slave: str) -> None:
    """The link's devices stop making key, and an SAE pair on the link drains its pool (large
    requests, then small ones; the router takes other paths once the link cannot serve)."""
    pair.stream.rate_bps, pair.stream._bits = 0.0, 0.0
    m_sae = next(s for s, n in tb.SAES.items() if n == master)
    s_sae = next(s for s, n in tb.SAES.items() if n == slave)
    saes = Saes(tb)
    try:
        for number, size in ((16, 1024), (4, 256), (1, 256), (1, 64)):
            for _ in range(400):
                v = await metric(tb, master, f'qkdnode_pool_ready_bits{{link="{link}"}}')
                if v is not None and v < number * size:
                    break
                status, _ = await saes.enc_keys(m_sae, s_sae, number, size)
                if status == 200:
                    continue
                break
    finally:
        await saes.close()


def _pool_below(tb, node: str, link: str, bits: float):
    async def check():
        v = await metric(tb, node, f'qkdnode_pool_ready_bits{{link="{link}"}}')
        return v is not None and v < bits
    return check


def _both(p, q):
    async def check():
        return await p() and await q()
    return check


def _peer_up(tb, node: str, peer: str, want: float):
    async def check():
        return await metric(tb, node, f'qkdnode_peer_up{{peer="{peer}"}}') == want
    return check


def _link_figure(tb, node: str, series: str, ok):
    """Whether the node's metrics have `series` with a value `ok` accepts (absent: no)."""
    async def check():
        try:
            values = await asyncio.to_thread(scrape, tb.manifest()["nodes"][node]["metrics"], 2)
        except OSError:
            return False
        v = values.get(series)
        return v is not None and ok(v)
    return check


async def test_every_device_and_the_peer_channel_under_every_fault(tmp_path):
    proxies: dict[str, FaultyLink] = {}
    tb_box: dict = {}
    proxies["B>C"] = await FaultyLink(lambda: ("127.0.0.1", tb_box["tb"].nodes["C"].peer_port)).start()
    proxies["C>B"] = await FaultyLink(lambda: ("127.0.0.1", tb_box["tb"].nodes["B"].peer_port)).start()
    tb = CampaignTestbed(tmp_path / "net", peer_via={("B", "C"): proxies["B>C"].port,
                                                     ("C", "B"): proxies["C>B"].port})
    tb_box["tb"] = tb
    other = ThrowawayPKI(tmp_path / "untrusted", name="an untrusted CA")
    cred = other.issue("impostor", "impostor", hosts=("127.0.0.1", "node-c.qkd.test", "node-b.qkd.test"),
                       server=True)
    import ssl
    untrusted = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    untrusted.load_cert_chain(str(cred.cert), str(cred.key))
    await tb.start()
    ledger = Ledger()
    load = Load(tb, ledger, pause=0.3)
    results = []
    try:
        # Every pair served before the first fault.
        load.start()
        assert await wait_until(lambda: _all_served(load, set(PAIRS), time.monotonic() - 120), 90), load.pair_ok
        only = os.environ.get("QKDNODE_FAULT_FILTER", "")   # e.g. "CV-QKD": rows whose target or fault has it
        for row in rows_for(tb, proxies, untrusted):
            if only in f"{row.target} {row.fault}":
                results.append(await run_row(tb, load, row))
        load.running = False
        await load.stop()
        left = await load.settle()
        alive = {n: p.proc.poll() is None for n, p in tb.nodes.items()}
    finally:
        await load.close()
        await tb.stop()
        for p in proxies.values():
            await p.stop()
    issued, fetched = ledger.counts.get("keys_issued", 0), ledger.counts.get("keys_fetched", 0)
    record("faults_totals", keys_issued=issued, keys_fetched=fetched, unfetched=left,
           problems=len(ledger.problems), statuses=load.statuses, rows=len(results), filter=only)
    assert all(alive.values()), alive
    assert not ledger.problems, ledger.problems[:10]
    assert left == 0 and issued == fetched > 0
    failed = [r for r in results if not r["passed"]]
    assert not failed, failed


async def _all_served(load: Load, pairs: set, since: float) -> bool:
    return all(load.pair_ok.get(p, 0) > since for p in pairs)


async def run_row(tb, load: Load, row: Row) -> dict:
    """Inject, watch it show, check service around it, clear, watch it heal."""
    out = {"target": row.target, "fault": row.fault, "level": "network", "detected_by": row.detected_by}
    problems_before = len(load.ledger.problems)
    t0 = time.monotonic()
    if row.detect is not None:
        await row.detect()  # counters take their base before the fault
    if row.resumed is not None and row.resumed is not row.detect:
        await row.resumed()
    maybe = row.inject()
    if asyncio.iscoroutine(maybe):
        await maybe
    detect_s = await wait_until(row.detect, DETECT_S) if row.detect is not None else 0.0
    out["detect_s"] = None if detect_s is None else round(detect_s, 1)
    # During the fault: every pair with a path around it is served (routing settles first).
    must = set(PAIRS) - row.unserved
    settle = time.monotonic()
    await asyncio.sleep(row.window)
    served_s = await wait_until(lambda: _all_served(load, must, settle), 45)
    out["served_during"] = f"{len(must)}/{len(PAIRS)} pairs" if served_s is not None else \
        f"missing: {sorted(p for p in must if load.pair_ok.get(p, 0) <= settle)}"
    if row.unserved:
        out["served_during"] += f" ({len(row.unserved)} pairs with no path around the fault not required)"
    maybe = row.clear()
    if asyncio.iscoroutine(maybe) or isinstance(maybe, asyncio.Future):
        await maybe
    t_clear = time.monotonic()
    resumed_s = await wait_until(row.resumed or (lambda: asyncio.sleep(0, True)), RESUME_S)
    again = await wait_until(lambda: _all_served(load, set(PAIRS), t_clear), RESUME_S)
    out["resume_s"] = None if resumed_s is None or again is None else round(time.monotonic() - t_clear, 1)
    out["keys_issued"] = load.ledger.counts.get("keys_issued", 0)
    out["new_problems"] = load.ledger.problems[problems_before:][:3]
    alive = all(n.proc.poll() is None for n in tb.nodes.values())
    out["daemons_up"] = alive
    out["shown"] = row.detect is not None and out["detect_s"] is not None
    out["passed"] = bool(alive and out["detect_s"] is not None and served_s is not None and
                         out["resume_s"] is not None and not out["new_problems"])
    out["seconds"] = round(time.monotonic() - t0, 1)
    record("faults", **out)
    return out
