"""Invariant 3 as an operator's tools would break it: after the emulated network has served many
keys (GET and POST, several keys per request, multicast, refused and repeated requests), no key
served, in any encoding, and no key_ID appears in any node's log or on any metrics page."""

import asyncio
import base64
import os
import random
import uuid
from pathlib import Path

from qkdnode import config
from tests.conftest import ready_keys
from tests.ops_support import config_of
from tests.sae_client import SaeClient, bits

ROUNDS = 25  # per pair of SAEs: each round one enc_keys and one dec_keys, plus mistakes


def key_forms(key: bytes) -> list[bytes]:
    return [key, base64.b64encode(key), base64.urlsafe_b64encode(key), base64.b64encode(key).rstrip(b"="),
            key.hex().encode(), key.hex().upper().encode()]


def key_id_forms(key_id: str) -> list[bytes]:
    u = uuid.UUID(key_id)
    return [str(u).encode(), str(u).upper().encode(), u.hex.encode(), u.hex.upper().encode()]


async def test_no_key_and_no_key_id_in_any_log_or_metrics_page_after_load(network):
    tb = await network()
    m = tb.manifest()
    logs = {name: Path(os.readlink(f"/proc/{node['pid']}/fd/2")) for name, node in m["nodes"].items()}
    at = {name: [s for s, e in m["saes"].items() if e["node"] == name] for name in m["nodes"]}
    pairs = []  # (master SAE, slave SAEs at one linked node)
    for name, node in m["nodes"].items():
        for link in config.load(config_of(node)).links:
            if at[name] and at[link.peer]:
                pairs.append((at[name][0], at[link.peer]))
    assert pairs
    served: dict[str, bytes] = {}
    rng = random.Random(7)

    async def load(master: str, slaves: list[str]) -> None:
        async with SaeClient(m, master) as a:
            clients = {s: SaeClient(m, s) for s in slaves}
            try:
                await ready_keys(a, slaves[0], 4)
                for i in range(ROUNDS):
                    number, size = rng.choice([1, 2, 4, 8]), rng.choice([64, 256, 512, 1024])
                    if i % 3 == 0:
                        code, answer = await a.enc_keys(slaves[0], number=number, size=size)
                    else:
                        code, answer = await a.enc_keys(slaves[0], number=number, size=size, post=True,
                                                        additional_slave_SAE_IDs=slaves[1:] if i % 3 == 2 else [])
                    if code != 200:
                        assert code == 503, answer                     # the pool ran dry for a moment
                        await asyncio.sleep(0.2)
                        continue
                    handed = bits(answer)
                    ids = list(handed)
                    served.update(handed)
                    for s, client in clients.items():
                        if i % 3 != 2 and s != slaves[0]:
                            continue
                        code, got = await client.dec_keys(master, ids, post=len(ids) > 1 or i % 2 == 0)
                        assert code == 200 and bits(got) == handed, got
                        served.update(bits(got))
                    # Mistakes that the node answers with errors, and may log: a key_ID asked twice,
                    # a key_ID asked by an SAE it was not for, a size out of range.
                    code, _ = await clients[slaves[0]].dec_keys(master, ids[:1])
                    assert code in (400, 401)
                    code, _ = await a.dec_keys(master, ids[:1])
                    assert code in (400, 401)
                    code, _ = await a.enc_keys(slaves[0], number=1, size=12)
                    assert code == 400
            finally:
                for client in clients.values():
                    await client.close()

    await asyncio.gather(*(load(master, slaves) for master, slaves in pairs))
    assert len(served) >= 50, f"only {len(served)} keys served: the test proves little"

    pages = {name: await asyncio.to_thread(_fetch, node["metrics"]) for name, node in m["nodes"].items()}
    await tb.stop()  # every log line written and closed
    haystacks = {f"log of node {n}": p.read_bytes() for n, p in logs.items()}
    haystacks.update({f"metrics of node {n}": page for n, page in pages.items()})
    assert all(haystacks.values())
    needles = [(f"key {k_id}", form) for k_id, key in served.items() for form in key_forms(key)] + \
              [(f"key_ID {k_id}", form) for k_id in served for form in key_id_forms(k_id)]
    found = [(where, what) for where, text in haystacks.items() for what, form in needles if form in text]
    assert not found, f"key material or key IDs found: {found[:5]}"


def _fetch(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()
