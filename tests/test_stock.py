"""The stock: a link's master node cuts keys for a (master SAE, slave SAEs, size) that asks for
keys steadily ahead of demand, pushes them to the peer, and answers later requests from it after
one commit of its own (docs/vault.md, Stock; docs/performance.md)."""

import asyncio
import json
import os

import pytest

import qkdnode.links as links_module
from qkdnode.config import LinkConfig
from qkdnode.errors import CarveConflict
from qkdnode.links import LinkPool
from qkdnode.metrics import NodeMetrics
from qkdnode.peer import ranges_of
from qkdnode.vault import STOCK, Vault
from tests.conftest import scrape, wait_for
from tests.sae_client import SaeClient, bits
from tests.test_vault import LINK, fill

SAES = {"sae-a": "A", "sae-b": "B"}


class VaultPeer:
    """Node B's side of the link in one process: its own vault with the same blocks, storing what
    is pushed (as `on_keys` does) and deleting what is discarded (as `on_discard` does)."""

    def __init__(self, vault: Vault):
        self.vault = vault
        self.pushed: list[str] = []
        self.discarded: list[str] = []
        self.fail = False

    async def call(self, link: str, verb: str, body: dict, timeout: float = 15.0) -> dict:
        from qkdnode.errors import PeerUnavailable
        if self.fail:
            raise PeerUnavailable("peer node B: connection refused (test)")
        body = json.loads(json.dumps(body))                             # as it crosses the wire
        if verb == "discard":
            for item in body["keys"]:
                await self.vault.run(self.vault.discard_key, link, item["key_ID"], ranges_of(item), body["reason"])
                self.discarded.append(item["key_ID"])
            return {"discarded": len(body["keys"])}
        assert verb == "keys"
        results = []
        for m in body.get("batch", [body]):
            ids = [k["key_ID"] for k in m["keys"]]
            await self.vault.run(self.vault.apply_carve, link, ids, [ranges_of(k) for k in m["keys"]], m["size"] // 8,
                                 m["master"], m["slaves"], True)
            self.pushed.extend(ids)
            results.append({"stored": len(ids)})
        return {"results": results} if "batch" in body else {"stored": len(body["keys"])}


@pytest.fixture
async def pair(tmp_path):
    a = Vault(tmp_path / "a.db", os.urandom(32))
    b = Vault(tmp_path / "b.db", os.urandom(32))
    await asyncio.to_thread(a.open, True)
    await asyncio.to_thread(b.open, True)
    blocks = await fill(a, 2048)
    await b.run(b.add_blocks, LINK, list(blocks.items()), "ready")
    yield a, b
    await asyncio.to_thread(a.close)
    await asyncio.to_thread(b.close)


def make_pool(vault: Vault, peer) -> LinkPool:
    cfg = LinkConfig(LINK, "B", "master", "etsi014", 1 << 20, 1.0, {})
    return LinkPool(cfg, "A", vault, None, peer, NodeMetrics("A"), SAES)


def keys_of(chunk: str, ids: list[str], at: int = 0) -> list[tuple[str, int, str]]:
    return [(chunk, at + i, k) for i, k in enumerate(ids)]


async def test_stock_keys_are_issued_once_and_only_once_ready(pair):
    a, b = pair
    ids = [f"00000000-0000-7000-8000-{i:012d}" for i in range(4)]
    chunk = ids[0]                                                      # a chunk is named by its first key
    ((handouts, exc),) = await a.run(a.carve_batch, LINK, [(ids, 32, "sae-a", ["sae-b"], STOCK, None)])
    assert exc is None and all(h.bits == b"" for h in handouts)           # no bits leave the vault while stocking
    assert a.committed_stock_bits(LINK) == 4 * 256
    assert (await a.run(a.check))["stock"] == {f"{LINK}/pushing": {"keys": 4, "bits": 1024}}
    ((got, refused),) = await a.run(a.issue_stock, LINK, [(keys_of(chunk, ids[:1]), "sae-a", ["sae-b"], 256)])
    assert got is None and isinstance(refused, CarveConflict)             # not pushed yet: not issued
    assert await a.run(a.stock_ready, LINK, [chunk]) == 1
    wrong = [(keys_of(chunk, ids[:2]), "sae-a", ["sae-x"], 256),         # another slave
             (keys_of(chunk, ids[2:3], 2), "sae-a", ["sae-b"], 128),     # another size
             ([(chunk, 1, ids[2])], "sae-a", ["sae-b"], 256),             # an ID not at that index
             ([(chunk, 0, ids[0]), (chunk, 0, ids[0])], "sae-a", ["sae-b"], 256)]  # one key twice in a call
    assert all(isinstance(e, CarveConflict) for _, e in await a.run(a.issue_stock, LINK, wrong))
    [(first, e1), (again, e2)] = await a.run(a.issue_stock, LINK, [(keys_of(chunk, ids[:3]), "sae-a", ["sae-b"], 256),
                                                                   (keys_of(chunk, ids[:1]), "sae-a", ["sae-b"], 256)])
    assert e1 is None and isinstance(e2, CarveConflict)                    # no key issued twice
    [(_, e3)] = await a.run(a.issue_stock, LINK, [(keys_of(chunk, ids[1:2], 1), "sae-a", ["sae-b"], 256)])
    assert isinstance(e3, CarveConflict)                                  # ...nor in a later operation
    # The peer, cutting the ranges the stock was pushed with, holds the same bits.
    await b.run(b.apply_carve, LINK, [h.key_ID for h in handouts], [h.ranges for h in handouts], 32, "sae-a",
                ["sae-b"], True)
    at_b = dict(await b.run(b.deliver, "sae-b", "sae-a", ids[:3]))
    assert {h.key_ID: h.bits for h in first} == at_b and len(set(at_b.values())) == 3
    assert a.committed_stock_bits(LINK) == 256
    assert (await a.run(a.check))["stock"] == {f"{LINK}/ready": {"keys": 1, "bits": 256}}
    [(last, _)] = await a.run(a.issue_stock, LINK, [(keys_of(chunk, ids[3:], 3), "sae-a", ["sae-b"], 256)])
    assert len(last) == 1 and (await a.run(a.stock_rows, LINK)) == []    # used up: the chunk row is gone
    events = [e for (e,) in a._conn.execute("SELECT event FROM audit WHERE key_id IN (?,?,?,?) ORDER BY id", ids)]
    assert events.count("key_stocked") == 4 and events.count("key_issued") == 4


async def test_stock_is_resealed_by_a_data_key_rotation_and_a_tampered_chunk_is_never_issued(pair):
    a, _ = pair
    ids = [f"00000000-0000-7000-8000-{i:012d}" for i in range(6)]
    await a.run(a.carve_batch, LINK, [(ids[:3], 32, "sae-a", ["sae-b"], STOCK, None),
                                      (ids[3:], 32, "sae-a", ["sae-b"], STOCK, None)])
    await a.run(a.stock_ready, LINK, [ids[0], ids[3]])
    [(got, _)] = await a.run(a.issue_stock, LINK, [(keys_of(ids[0], ids[:1]), "sae-a", ["sae-b"], 256)])
    gen, _ = await a.run(a.begin_data_key_rotation)
    resealed = [await a.run(a.reseal_batch, 500)]
    while resealed[-1]:                                                  # batches of 500 rows until none is left
        resealed.append(await a.run(a.reseal_batch, 500))
    assert sum(resealed) == 2048 - 6 + 2 and list(a._keys) == [gen]    # blocks left, both chunks; old data key gone
    # A chunk whose issued list is reset (to issue a key again) fails authentication: listed by
    # check, never issued.
    a._conn.execute("UPDATE stock SET issued='[]' WHERE chunk_id=?", (ids[0],))
    report = await a.run(a.check)
    assert report["failures"] == [f"stock: chunk {ids[0]}"]
    [(_, exc)] = await a.run(a.issue_stock, LINK, [(keys_of(ids[0], ids[:1]), "sae-a", ["sae-b"], 256)])
    assert exc is not None and "failed authentication" in str(exc)
    [(got, exc)] = await a.run(a.issue_stock, LINK, [(keys_of(ids[3], ids[3:], 0), "sae-a", ["sae-b"], 256)])
    assert exc is None and len(got) == 3


async def test_steady_demand_is_served_from_stock_without_a_push_per_request(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(links_module, "STOCK_PLAN_EVERY", 0.2)
    peer = VaultPeer(b)
    pool = make_pool(a, peer)
    loop = asyncio.create_task(pool._stock_loop())                       # what start() runs at the master end
    try:
        served: list = []
        for _ in range(40):                                              # ~100 keys/s for a second
            served += await asyncio.gather(*(pool.hand_out("sae-a", ["sae-b"], 1, 256) for _ in range(4)))
            await asyncio.sleep(0.03)
        await wait_for(lambda: asyncio.sleep(0, len(pool._stock.get(("sae-a", ("sae-b",), 256), ())) >= 64), 10)
        pushes = len(peer.pushed)
        later = await asyncio.gather(*(pool.hand_out("sae-a", ["sae-b"], 2, 256) for _ in range(20)))
        fresh = [h for r in later for h in r]
        stocked_before = set(peer.pushed[:pushes])
        assert all(h.key_ID in stocked_before for h in fresh)                # taken from the stock...
        assert pool.vault.committed_stock_bits(LINK) // 256 == len(pool._stock[("sae-a", ("sae-b",), 256)])
        # ETSI 014 status counts it as key stored for that pair (and for no other)
        assert pool.stock_bits_for("sae-a", ["sae-b"]) == pool.vault.committed_stock_bits(LINK) > 0
        assert pool.stock_bits_for("sae-a", ["sae-c"]) == 0 == pool.stock_bits_for("sae-b", ["sae-b"])
        # ...and the peer has every one of them, with the same bits, for the slave SAE.
        at_b = dict(await b.run(b.deliver, "sae-b", "sae-a", [h.key_ID for h in fresh]))
        assert at_b == {h.key_ID: h.bits for h in fresh}
        everything = [h.key_ID for r in served for h in r] + [h.key_ID for h in fresh]
        assert len(set(everything)) == len(everything)                       # no key handed out twice
    finally:
        loop.cancel()


async def test_a_restart_serves_ready_stock_and_discards_unconfirmed_stock_at_both_ends(pair):
    a, b = pair
    peer = VaultPeer(b)
    pool = make_pool(a, peer)
    combo = ("sae-a", ("sae-b",), 256)
    assert await pool._stock_up(combo, 8)                               # pushed and confirmed: ready
    ids = [f"00000000-0000-7000-8000-{i:012d}" for i in range(5)]       # cut, pushed, never confirmed
    ((handouts, _),) = await a.run(a.carve_batch, LINK, [(ids, 32, "sae-a", ["sae-b"], STOCK, None)])
    await peer.call(LINK, "keys", {"master": "sae-a", "slaves": ["sae-b"], "size": 256,
                                   "keys": [{"key_ID": h.key_ID, "ranges": h.ranges} for h in handouts]})
    again = make_pool(a, peer)                                          # the node starts again
    await again._load_stock()
    assert len(again._stock[combo]) == 8 and a.committed_stock_bits(LINK) == 8 * 256
    await again.flush_outbox()                                          # the peer deletes its copies
    assert sorted(peer.discarded) == sorted(ids)
    assert (await b.run(b.check))["keys"]["waiting"] == 8
    got = await again.hand_out("sae-a", ["sae-b"], 3, 256)
    assert {h.key_ID for h in got} <= set(peer.pushed[:8])


async def test_a_failed_stock_push_and_old_stock_are_discarded_at_both_ends(pair, monkeypatch):
    a, b = pair
    peer = VaultPeer(b)
    pool = make_pool(a, peer)
    combo = ("sae-a", ("sae-b",), 256)
    peer.fail = True
    assert not await pool._stock_up(combo, 4)                           # refused: nothing stocked
    assert a.committed_stock_bits(LINK) == 0 and not pool._stock.get(combo)
    peer.fail = False
    await pool.flush_outbox()
    assert len(peer.discarded) == 4                                     # whatever the peer may have stored
    assert await pool._stock_up(combo, 6)
    monkeypatch.setattr(links_module, "STOCK_MAX_AGE", 0.0)
    await asyncio.sleep(0.01)
    await pool._expire_stock()
    assert not pool._stock[combo] and a.committed_stock_bits(LINK) == 0
    await pool.flush_outbox()
    assert len(peer.discarded) == 10 and (await b.run(b.check))["keys"]["waiting"] == 0
    for vault in (a, b):                                                # both ends record why
        reasons = [d for (d,) in vault._conn.execute("SELECT detail FROM audit WHERE event='key_discarded'")]
        assert reasons.count("stock push failed") == 4 and sum("stock older than" in r for r in reasons) == 6


@pytest.mark.parametrize("master_sae,slave_sae,node", [("sae-a1", "sae-b1", "A"), ("sae-b1", "sae-a1", "B")])
async def test_a_node_under_steady_load_serves_stock_keys_the_slave_gets_at_the_peer(network, master_sae, slave_sae,
                                                                                     node):
    """At the link's master end (node A) and at its other end (node B) alike."""
    tb = await network(unlimited_key_rate=True, pool_target_bits=1 << 20)
    m = tb.manifest()
    url = m["nodes"][node]["metrics"]
    gauge = f'qkdnode_pool_bits{{link="{next(iter(tb.devices))}",state="stock"}}'
    async with SaeClient(m, master_sae) as a, SaeClient(m, slave_sae) as b:
        got: dict[str, bytes] = {}

        async def steady() -> bool:                                     # ~100+ keys/s until stock shows
            for _ in range(10):
                status, answer = await a.enc_keys(slave_sae, number=4, size=256)
                if status == 503:                                       # the pool is still filling
                    await asyncio.sleep(0.2)
                    return False
                assert status == 200, answer
                got.update(bits(answer))
            return scrape(url).get(gauge, 0) > 0

        await wait_for(steady, timeout=60, interval=0.01)
        for _ in range(5):                                              # served while the stock is there
            status, answer = await a.enc_keys(slave_sae, number=4, size=256)
            assert status == 200
            got.update(bits(answer))
        ids = list(got)
        for i in range(0, len(ids), 100):
            status, answer = await b.dec_keys(master_sae, ids[i:i + 100])
            assert status == 200 and bits(answer) == {k: got[k] for k in ids[i:i + 100]}
        assert len(set(got.values())) == len(got)


def other_end(master_vault: Vault, vault: Vault) -> tuple[LinkPool, LinkPool]:
    """Node A (the link's master, vault `master_vault`) and node B (the other end), B's peer
    calls reaching A's pool as JSON; B's SAE sae-b is the master SAE, sae-a at A the slave."""
    from tests.test_links_batch import LoopbackPeer
    master = LinkPool(LinkConfig(LINK, "B", "master", "etsi014", 1 << 20, 1.0, {}), "A", master_vault, None, None,
                      NodeMetrics("A"), SAES)
    other = LinkPool(LinkConfig(LINK, "A", "slave", "etsi014", 1 << 20, 1.0, {}), "B", vault, None,
                     LoopbackPeer(master), NodeMetrics("B"), SAES)
    return master, other


async def test_steady_demand_at_the_other_end_is_served_from_its_own_stock(pair, monkeypatch):
    """An SAE at the link's other end that asks steadily gets a stock at its own node: the
    master node allocates it ahead of demand (and keeps the bits for the slave SAE), and later
    requests are answered from it, not by an `allocate` of their own."""
    a, b = pair
    monkeypatch.setattr(links_module, "STOCK_PLAN_EVERY", 0.2)
    master, pool = other_end(a, b)
    combo = ("sae-b", ("sae-a",), 256)
    loop = asyncio.create_task(pool._stock_loop())
    try:
        served: list = []
        for _ in range(40):                                              # ~100 keys/s for a second
            served += await asyncio.gather(*(pool.hand_out("sae-b", ["sae-a"], 1, 256) for _ in range(4)))
            await asyncio.sleep(0.03)
        await wait_for(lambda: asyncio.sleep(0, len(pool._stock.get(combo, ())) >= 64), 10)
        stocked_before = {key_id for _, _, key_id, _ in pool._stock[combo]}
        later = await asyncio.gather(*(pool.hand_out("sae-b", ["sae-a"], 2, 256) for _ in range(20)))
        fresh = [h for r in later for h in r]
        assert all(h.key_ID in stocked_before for h in fresh)               # taken from the stock
        assert b.committed_stock_bits(LINK) // 256 == len(pool._stock[combo]) and a.committed_stock_bits(LINK) == 0
        assert pool.stock_bits_for("sae-b", ["sae-a"]) == b.committed_stock_bits(LINK) > 0
        # The master node has every key, with the same bits, for its slave SAE.
        everything = [h for r in served for h in r] + fresh
        at_a = dict(await a.run(a.deliver, "sae-a", "sae-b", [h.key_ID for h in everything]))
        assert at_a == {h.key_ID: h.bits for h in everything}
        assert len(at_a) == len(everything)                              # no key handed out twice
    finally:
        loop.cancel()


async def test_other_end_stock_left_unconfirmed_by_a_stop_is_discarded_at_both_ends(pair):
    a, b = pair
    master, pool = other_end(a, b)
    combo = ("sae-b", ("sae-a",), 256)
    assert await pool._stock_up(combo, 8)                               # allocated, cut here: ready
    answer = await master.on_allocate({"master": "sae-b", "slaves": ["sae-a"], "number": 5, "size": 256})
    items = json.loads(json.dumps(answer["keys"]))                      # allocated, cut, stopped before ready
    await b.run(b.apply_carve, LINK, [i["key_ID"] for i in items], [ranges_of(i) for i in items], 32, "sae-b",
                ["sae-a"], STOCK)
    assert (await a.run(a.check))["keys"]["waiting"] == 13
    _, again = other_end(a, b)                                          # node B starts again
    again.peer.other = master
    await again._load_stock()
    assert len(again._stock[combo]) == 8 and b.committed_stock_bits(LINK) == 8 * 256
    await again.flush_outbox()                                          # the master node deletes its copies
    assert (await a.run(a.check))["keys"]["waiting"] == 8
    got = await again.hand_out("sae-b", ["sae-a"], 3, 256)
    assert len(got) == 3 and [v for v, _ in again.peer.calls] == ["discard"]   # from the stock
