"""Shared pieces of the reliability campaign (issue 9): a testbed with campaign settings, SAE
load with a ledger of every key handed out, metrics, process figures and the results file
that `python -m tests.campaign` turns into docs/reliability.md.

QKDNODE_CAMPAIGN selects the size of every campaign test: "ci" (default: bounded, part of
`make test`) or "long" (the full fault matrix, more crash rounds, more fuzz examples, a longer
soak). QKDNODE_CAMPAIGN_RESULTS names a folder where tests append their figures (JSON lines);
unset, nothing is written.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import signal
import ssl
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from hil.testbed import DEFAULT_TOPOLOGY, Testbed, load_topology

MODE = os.environ.get("QKDNODE_CAMPAIGN", "ci")
LONG = MODE == "long"


def record(section: str, **row) -> None:
    """Append one result row for the campaign report (no key bits, ever: IDs and figures only)."""
    folder = os.environ.get("QKDNODE_CAMPAIGN_RESULTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"{section}.jsonl", "a") as f:
        f.write(json.dumps({"mode": MODE, **row}, default=str) + "\n")


# ---------------------------------------------------------------- the network


class CampaignTestbed(Testbed):
    """The demo network with campaign settings: device calls give up sooner (so a hung device is
    noticed in seconds, as an operator would configure a lab), extra TOML per node (e.g.
    [limits]), and peer URLs that can be pointed through fault proxies."""

    def __init__(self, workdir: Path, *, extra: dict[str, str] | None = None,
                 peer_via: dict[tuple[str, str], int] | None = None, device_timeout: float = 2.0, **kw):
        kw.setdefault("topology", load_topology(DEFAULT_TOPOLOGY))
        super().__init__(workdir, **kw)
        self.extra = extra or {}
        self.peer_via = peer_via or {}   # (from node, to node) -> local port of a proxy to use instead
        self.device_timeout = device_timeout

    def _device_settings(self, link, i, name):
        out = super()._device_settings(link, i, name)
        if out["driver"] == "etsi014":
            out["settings"].update(timeout=self.device_timeout, retries=1, backoff=0.2, backoff_max=1.0)
        elif out["driver"] == "cvqkd-serial":
            out["settings"].update(backoff_max=5.0)
        return out

    def _write_node(self, name: str) -> None:
        super()._write_node(name)
        cfg = self.nodes[name].config
        text = cfg.read_text()
        for (src, dst), port in self.peer_via.items():
            if src == name:
                text = text.replace(f'url = "https://127.0.0.1:{self.nodes[dst].peer_port}"',
                                    f'url = "https://127.0.0.1:{port}"')
        if name in self.extra:
            text += "\n" + self.extra[name]
        cfg.write_text(text)

    async def stop_nodes(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Signal every node at once and wait without blocking the event loop: the emulated
        devices live in this loop, and a node finishing a request needs them to answer."""
        for n in self.nodes.values():
            if n.proc and n.proc.poll() is None:
                n.proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while any(n.proc and n.proc.poll() is None for n in self.nodes.values()):
            if time.monotonic() > deadline:
                for n in self.nodes.values():
                    if n.proc and n.proc.poll() is None:
                        n.proc.kill()
            await asyncio.sleep(0.05)

    async def kill_async(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.nodes[name].proc
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            while proc.poll() is None:
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.stop_nodes()
        await super().stop()

    def metrics(self, node: str) -> dict[str, float]:
        return scrape(self.manifest()["nodes"][node]["metrics"])


def scrape(url: str, timeout: float = 5) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def metric(tb: Testbed, node: str, series: str) -> float | None:
    """One series of a node's /metrics, or None when the node does not answer."""
    try:
        values = await asyncio.to_thread(scrape, tb.manifest()["nodes"][node]["metrics"], 2)
    except OSError:
        return None
    return values.get(series)


def up_series(values: dict[str, float], link: str) -> float | None:
    """A link's device health as the node shows it: qkdnode_device_up where the metrics
    catalogue has it, else qkdnode_driver_up."""
    for k, v in values.items():
        if k.startswith("qkdnode_device_up{") and f'device="{link}' in k:
            return v
    return values.get(f'qkdnode_driver_up{{link="{link}"}}')


def sae_ssl(tb: Testbed, sae: str) -> ssl.SSLContext:
    return tb.sae_ssl(sae)


# ---------------------------------------------------------------- load and the ledger


@dataclass
class Issued:
    master: str
    slave: str
    digest: str           # sha256 of the bits (the ledger keeps no bits)
    fetched: int = 0
    mismatched: int = 0


@dataclass
class Ledger:
    """Every key an SAE got from enc_keys, and what its slave got for it."""

    keys: dict[str, Issued] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    samples: list[bytes] = field(default_factory=list)   # a few keys' bits, kept in memory to look for in logs

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def issued(self, master: str, slave: str, answer: dict) -> list[str]:
        ids = []
        for k in answer["keys"]:
            kid = k["key_ID"]
            raw = base64.b64decode(k["key"])
            digest = hashlib.sha256(raw).hexdigest()
            if len(self.samples) < 500:
                self.samples.append(raw)
            if kid in self.keys:
                self.problems.append(f"key_ID {kid} handed out twice by enc_keys")
            self.keys[kid] = Issued(master, slave, digest)
            ids.append(kid)
        self.count("keys_issued", len(ids))
        return ids

    def fetched(self, answer: dict) -> None:
        for k in answer["keys"]:
            entry = self.keys.get(k["key_ID"])
            if entry is None:
                self.problems.append(f"dec_keys served key_ID {k['key_ID']} that no enc_keys answered")
                continue
            entry.fetched += 1
            if entry.fetched > 1:
                self.problems.append(f"key_ID {k['key_ID']} served twice to its slave")
            if hashlib.sha256(base64.b64decode(k["key"])).hexdigest() != entry.digest:
                entry.mismatched += 1
                self.problems.append(f"key_ID {k['key_ID']}: the slave got other bits than the master")
        self.count("keys_fetched", len(answer["keys"]))

    def leaked_into(self, text: str) -> int:
        """How many sampled keys appear in `text` (base64 or hex): must be none."""
        return sum(base64.b64encode(raw).decode() in text or raw.hex() in text for raw in self.samples)

    def unfetched(self) -> dict[str, Issued]:
        return {k: v for k, v in self.keys.items() if v.fetched == 0}


class Saes:
    """An aiohttp session per SAE, straight from the testbed's certificates."""

    def __init__(self, tb: Testbed):
        self.tb = tb
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def session(self, sae: str) -> aiohttp.ClientSession:
        if sae not in self._sessions:
            self._sessions[sae] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.tb.sae_ssl(sae), limit=16))
        return self._sessions[sae]

    def url(self, sae: str, path: str) -> str:
        return f"{self.tb.nodes[self.tb.SAES[sae]].etsi014}/api/v1/keys/{path}"

    async def call(self, sae: str, method: str, path: str, timeout: float = 90.0, **kw) -> tuple[int, dict | None]:
        """(HTTP status, JSON body) or (0, None) when the node did not answer."""
        try:
            async with self.session(sae).request(method, self.url(sae, path),
                                                 timeout=aiohttp.ClientTimeout(total=timeout), **kw) as r:
                try:
                    return r.status, await r.json(content_type=None)
                except ValueError:
                    return r.status, None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
            return 0, None

    async def enc_keys(self, master: str, slave: str, number: int = 1, size: int = 256, **kw):
        return await self.call(master, "POST", f"{slave}/enc_keys", json={"number": number, "size": size}, **kw)

    async def dec_keys(self, slave: str, master: str, key_ids: list[str], **kw):
        return await self.call(slave, "POST", f"{master}/dec_keys",
                               json={"key_IDs": [{"key_ID": k} for k in key_ids]}, **kw)

    async def close(self) -> None:
        for s in self._sessions.values():
            await s.close()
        self._sessions.clear()


# The demo network's SAE pairs, one per kind of path: every link is used by some pair.
PAIRS = [("sae-a1", "sae-b1"),   # A-B combined, direct
         ("sae-b2", "sae-a2"),   # A-B from the link's slave end (allocate)
         ("sae-a1", "sae-d1"),   # A-D toshiba, direct
         ("sae-b1", "sae-c1"),   # B-C idq, direct
         ("sae-d1", "sae-c1"),   # D-C CV-QKD, direct
         ("sae-c1", "sae-e1"),   # C-E idq, direct
         ("sae-a2", "sae-c1"),   # relayed over B or D
         ("sae-a1", "sae-e2"),   # relayed over three hops
         ("sae-e1", "sae-b2")]   # relayed, the other way


class Load:
    """Steady SAE traffic: each pair asks enc_keys, then its slave fetches the keys with dec_keys
    at its own node and the ledger compares. Keys whose slave could not fetch them yet (its node
    down) are fetched by `settle` later. Now and then a key is asked for a second time: the node
    must refuse it."""

    def __init__(self, tb: Testbed, ledger: Ledger, pairs=PAIRS, pause: float = 0.15, seed: int = 9):
        self.tb, self.ledger, self.pairs, self.pause = tb, ledger, pairs, pause
        self.saes = Saes(tb)
        self.rng = random.Random(seed)
        self.statuses: dict[int, int] = {}
        self.pair_ok: dict[tuple[str, str], float] = {}   # pair -> monotonic time of its last full success
        self._tasks: list[asyncio.Task] = []
        self.running = False

    def start(self) -> None:
        self.running = True
        self._tasks = [asyncio.create_task(self._pair(m, s)) for m, s in self.pairs]

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _pair(self, master: str, slave: str) -> None:
        while self.running:
            number, size = self.rng.choice(((1, 256), (2, 256), (4, 256), (1, 512), (3, 1024)))
            status, answer = await self.saes.enc_keys(master, slave, number, size)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status >= 500 and status != 503:
                self.ledger.problems.append(f"enc_keys {master}->{slave}: HTTP {status} {answer}")
            if status == 200:
                ids = self.ledger.issued(master, slave, answer)
                s2, got = await self.saes.dec_keys(slave, master, ids)
                if s2 == 200:
                    self.ledger.fetched(got)
                    self.pair_ok[(master, slave)] = time.monotonic()
                    if self.rng.random() < 0.1:
                        s3, _ = await self.saes.dec_keys(slave, master, ids[:1])
                        if s3 == 200:
                            self.ledger.problems.append(f"key_ID {ids[0]} served a second time")
                        elif s3:
                            self.ledger.count("second_fetch_refused")
                elif s2 not in (0, 503):
                    self.ledger.problems.append(f"dec_keys {slave}<-{master}: HTTP {s2} {got} for fresh keys")
            await asyncio.sleep(self.pause * self.rng.uniform(0.5, 1.5))

    async def settle(self, timeout: float = 120.0) -> int:
        """Fetch every key whose slave has not got it yet; returns how many were left over."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.ledger.unfetched()
            if not left:
                return 0
            by_pair: dict[tuple[str, str], list[str]] = {}
            for kid, e in left.items():
                by_pair.setdefault((e.slave, e.master), []).append(kid)
            for (slave, master), ids in by_pair.items():
                for i in range(0, len(ids), 64):
                    status, got = await self.saes.dec_keys(slave, master, ids[i:i + 64], timeout=30)
                    if status == 200:
                        self.ledger.fetched(got)
                    elif status == 400:   # one of them unknown: find which, one by one
                        for kid in ids[i:i + 64]:
                            s, g = await self.saes.dec_keys(slave, master, [kid], timeout=30)
                            if s == 200:
                                self.ledger.fetched(g)
                            elif s == 400:
                                self.ledger.problems.append(f"key_ID {kid} of {master}->{slave} lost: "
                                                            f"{(g or {}).get('message')}")
                                self.ledger.keys[kid].fetched = -1
            if time.monotonic() > deadline:
                return len(self.ledger.unfetched())
            if self.ledger.unfetched():
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        await self.stop()
        await self.saes.close()


# ---------------------------------------------------------------- processes


def process_figures(pid: int) -> dict[str, int]:
    """Resident memory (kB) and open file descriptors of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


async def wait_until(predicate, timeout: float, interval: float = 0.2):
    """Seconds until the async predicate held, or None if it did not within `timeout`."""
    start = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        await asyncio.sleep(interval)
