"""Hand-outs at a link's master end are batched: requests that come in one turn of the event
loop are cut in one vault operation and pushed to the peer in one call, each keeping its own
result (docs/performance.md, issue 10)."""

import asyncio
import json
import os
import uuid

import pytest

from qkdnode.config import LinkConfig
from qkdnode.errors import CarveConflict, PoolExhausted
from qkdnode.links import MAX_BATCHES_IN_FLIGHT, LinkPool
from qkdnode.metrics import NodeMetrics
from qkdnode.vault import Vault

from tests.conftest import ready_keys
from tests.sae_client import SaeClient, bits
from tests.test_vault import LINK, fill, new_ids

SAES = {"sae-a": "A", "sae-b": "B"}


class FakePeer:
    """Takes every push; records the pushes (each a list of messages)."""

    def __init__(self):
        self.pushes: list[list[dict]] = []
        self.gate: asyncio.Event | None = None

    async def call(self, link: str, verb: str, body: dict, timeout: float = 15.0) -> dict:
        assert verb == "keys"
        messages = body.get("batch", [body])
        self.pushes.append(messages)
        if self.gate is not None:
            await self.gate.wait()
        return {"results": [{"stored": len(m["keys"])} for m in messages]} if "batch" in body else {"stored": 1}


@pytest.fixture
async def pool(tmp_path):
    vault = Vault(tmp_path / "v.db", os.urandom(32))
    await asyncio.to_thread(vault.open, True)
    cfg = LinkConfig(LINK, "B", "master", "etsi014", 1 << 20, 1.0, {})
    p = LinkPool(cfg, "A", vault, None, FakePeer(), NodeMetrics("A"), SAES)
    yield p
    await asyncio.to_thread(vault.close)


async def test_requests_of_one_turn_share_one_vault_operation_and_one_push(pool):
    blocks = await fill(pool.vault, 8)                                   # 8 x 32 bytes
    ops: list[int] = []
    pool.vault.on_commit = lambda n_ops, seconds: ops.append(n_ops)
    asks = [1, 1, 9, 2, 1]                                               # the 9 keys of 256 bits find too little
    results = await asyncio.gather(*(pool.hand_out("sae-a", ["sae-b"], n, 256) for n in asks),
                                   return_exceptions=True)
    assert len(pool.peer.pushes) == 1 and len(pool.peer.pushes[0]) == 4   # one push of the four served
    assert ops == [1]                                                    # one cut (the acknowledgement is lazy)
    assert isinstance(results[2], PoolExhausted)
    served = [h for r in results if not isinstance(r, Exception) for h in r]
    assert [len(r) for r in results if not isinstance(r, Exception)] == [1, 1, 2, 1]
    assert len({h.key_ID for h in served}) == 5
    assert b"".join(h.bits for h in served) == b"".join(blocks.values())[:5 * 32]  # oldest first, in order
    assert pool._in_flight == 0 and not pool._waiting


@pytest.mark.parametrize("in_flight", [MAX_BATCHES_IN_FLIGHT, 2])
async def test_requests_that_come_while_batches_are_in_flight_wait_and_go_together(pool, monkeypatch, in_flight):
    import qkdnode.links as links_module
    monkeypatch.setattr(links_module, "MAX_BATCHES_IN_FLIGHT", in_flight)
    await fill(pool.vault, 16)
    pool.peer.gate = asyncio.Event()
    first = [asyncio.create_task(pool.hand_out("sae-a", ["sae-b"], 1, 256)) for _ in range(3)]
    await asyncio.sleep(0.2)                                             # batch 1 (3 requests) waits at the peer
    second = [asyncio.create_task(pool.hand_out("sae-a", ["sae-b"], 1, 256)) for _ in range(2)]
    await asyncio.sleep(0.2)                                             # a batch 2 would as well
    later = [asyncio.create_task(pool.hand_out("sae-a", ["sae-b"], 1, 256)) for _ in range(4)]
    await asyncio.sleep(0.2)
    expect = [[3], [2, 4]] if in_flight == 1 else [[3, 2], [4]]          # pushed before / after the gate opens
    assert [len(p) for p in pool.peer.pushes] == expect[0] and pool._in_flight == in_flight
    assert len(pool._waiting) == sum(expect[1])                          # no more batches than allowed in flight
    pool.peer.gate.set()
    got = await asyncio.gather(*first, *second, *later)
    assert [len(p) for p in pool.peer.pushes] == [*expect[0], sum(expect[1])]
    assert len({h.key_ID for r in got for h in r}) == 9
    assert pool._in_flight == 0 and pool._batch_starting is None


async def test_a_batch_cancelled_before_it_ran_does_not_stop_later_ones(pool):
    await fill(pool.vault, 4)
    t = asyncio.create_task(pool.hand_out("sae-a", ["sae-b"], 1, 256))
    await asyncio.sleep(0)                                               # the request waits; its batch is created
    starting = pool._batch_starting
    assert starting is not None
    starting.cancel()
    await asyncio.sleep(0.05)
    assert pool._batch_starting is None and pool._in_flight == 0
    t.cancel()
    pool._waiting.clear()                                                # (a stopping node drops its requests)
    assert len(await pool.hand_out("sae-a", ["sae-b"], 1, 256)) == 1


async def test_the_outbox_entries_of_pushed_batches_go_with_the_next_batch_and_survive_a_failed_one(pool):
    """Under load the outbox never holds more than the batches in flight: the entries the peer
    took are deleted in the next batch's transaction, not thousands at once by the outbox loop.
    A batch whose vault operation fails leaves them to the next one (or to the loop)."""
    await fill(pool.vault, 8)

    async def outbox() -> list[str]:
        return [k for k, *_ in await pool.vault.run(pool.vault.outbox_items, LINK)]
    first = await pool.hand_out("sae-a", ["sae-b"], 2, 256)
    assert sorted(await outbox()) == sorted(h.key_ID for h in first)   # taken by the peer, still recorded
    real = pool.vault.carve_batch

    def broken(*args):
        raise OSError("disk gone")
    pool.vault.carve_batch = broken
    with pytest.raises(OSError):
        await pool.hand_out("sae-a", ["sae-b"], 1, 256)
    assert sorted(await outbox()) == sorted(h.key_ID for h in first)   # nothing lost with the failed batch
    pool.vault.carve_batch = real
    second = await pool.hand_out("sae-a", ["sae-b"], 1, 256)
    assert await outbox() == [second[0].key_ID]                        # the first batch's went with it
    await pool.flush_outbox()
    assert await outbox() == []


class LoopbackPeer:
    """The master node's pool as the peer of the other end's pool, the message crossing as JSON
    and its refusals mapped as the peer API maps them (BadMessage: 400, PoolExhausted: 503);
    records each call's verb and how many requests it carried."""

    def __init__(self, other: LinkPool, batches: bool = True):
        self.other, self.batches = other, batches
        self.calls: list[tuple[str, int]] = []

    async def call(self, link: str, verb: str, body: dict, timeout: float = 15.0) -> dict:
        from qkdnode.errors import PeerRejected
        from qkdnode.peer import BadMessage
        body = json.loads(json.dumps(body))
        self.calls.append((verb, len(body.get("batch", [body]))))
        try:
            if "batch" in body and not self.batches:                     # as a node before batches
                raise BadMessage("field 'master' missing or of the wrong type")
            return json.loads(json.dumps(await getattr(self.other, f"on_{verb}")(body)))
        except BadMessage as exc:
            raise PeerRejected(f"peer node A: HTTP 400: {exc}", {"message": str(exc)}) from None


@pytest.fixture
async def two_ends(tmp_path):
    """Both ends of a link in one process, each with its own vault holding the same blocks:
    node A the link's master, node B the other end, whose SAE sae-b asks for keys to share with
    sae-a."""
    a, b = (Vault(tmp_path / f"{n}.db", os.urandom(32)) for n in "ab")
    for v in (a, b):
        await asyncio.to_thread(v.open, True)
    blocks = await fill(a, 8)                                            # 8 x 32 bytes
    await b.run(b.add_blocks, LINK, list(blocks.items()), "ready")
    saes = {"sae-a": "A", "sae-b": "B"}
    master = LinkPool(LinkConfig(LINK, "B", "master", "etsi014", 1 << 20, 1.0, {}), "A", a, None, None,
                      NodeMetrics("A"), saes)
    other = LinkPool(LinkConfig(LINK, "A", "slave", "etsi014", 1 << 20, 1.0, {}), "B", b, None, LoopbackPeer(master),
                     NodeMetrics("B"), saes)
    yield master, other, blocks
    for v in (a, b):
        await asyncio.to_thread(v.close)


@pytest.mark.parametrize("batches", [True, False])
async def test_requests_at_the_other_end_share_one_allocate_call_and_one_vault_operation(two_ends, batches):
    """The link's other end batches too: requests of one turn go to the master node in one
    `allocate` call and are cut in one vault operation. One the master node has too little key
    for fails alone, with PoolExhausted (the router may then take another path). A master node
    without batches gets the requests one by one."""
    master, other, blocks = two_ends
    other.peer.batches = batches
    ops: list[int] = []
    other.vault.on_commit = lambda n_ops, seconds: ops.append(n_ops)
    asks = [1, 1, 9, 2, 1]                                               # the 9 keys of 256 bits find too little
    results = await asyncio.gather(*(other.hand_out("sae-b", ["sae-a"], n, 256) for n in asks),
                                   return_exceptions=True)
    assert other.peer.calls == ([("allocate", 5)] if batches else [("allocate", 5)] + [("allocate", 1)] * 5)
    assert ops == [1]                                                    # one cut at this end
    assert isinstance(results[2], PoolExhausted)
    served = [h for r in results if not isinstance(r, Exception) for h in r]
    assert [len(r) for r in results if not isinstance(r, Exception)] == [1, 1, 2, 1]
    assert b"".join(h.bits for h in served) == b"".join(blocks.values())[:5 * 32]  # oldest first, in order
    # The master node keeps the same bits for its SAE sae-a, which fetches each key once.
    delivered = dict(await master.vault.run(master.vault.deliver, "sae-a", "sae-b", [h.key_ID for h in served]))
    assert delivered == {h.key_ID: h.bits for h in served}
    assert other.consumed_bits == master.consumed_bits == 5 * 256 and not other._waiting


async def test_keys_the_other_end_cannot_cut_are_refused_and_discarded_at_both_ends(two_ends):
    """If this end's blocks do not hold what the master node allocated (the two vaults
    disagree), the request fails, no key is handed out, and the master node is asked to
    discard its copies, in the background."""
    master, other, _ = two_ends
    await other.vault.run(other.vault.carve, LINK, new_ids(1), 32, "sae-b", ["sae-a"], False)  # this end alone
    with pytest.raises(CarveConflict):
        await other.hand_out("sae-b", ["sae-a"], 1, 256)
    await asyncio.gather(*other._background)
    assert [v for v, _ in other.peer.calls] == ["allocate", "discard"]
    assert (await master.vault.run(master.vault.check))["keys"]["waiting"] == 0  # nothing left for sae-a


async def test_many_requests_at_once_at_either_end_are_served_with_the_same_bits_at_the_other(network):
    """On real nodes: 96 requests of 128 keys at once, first at the link's master end, then at
    the other end, all answered, each key fetched once at the other node with the same bits.
    (96 x 128 keys do not fit in one peer message: batches are bounded by their keys too.)"""
    tb = await network(unlimited_key_rate=True, pool_target_bits=1 << 23)
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b1") as b:
        for master, slave, slave_id, master_id in ((a, b, "sae-b1", "sae-a1"), (b, a, "sae-a1", "sae-b1")):
            await ready_keys(master, slave_id, 2 * 96 * 128)
            answers = await asyncio.gather(*(master.enc_keys(slave_id, number=128, size=256) for _ in range(96)))
            assert [s for s, _ in answers] == [200] * 96, [x for s, x in answers if s != 200][:1]
            got = {k: v for _, x in answers for k, v in bits(x).items()}
            assert len(got) == 96 * 128 and len(set(got.values())) == len(got)
            ids = list(got)
            fetched = await asyncio.gather(*(slave.dec_keys(master_id, ids[i:i + 128])
                                             for i in range(0, len(ids), 128)))
            assert all(s == 200 for s, _ in fetched)
            assert {k: v for _, x in fetched for k, v in bits(x).items()} == got


class LeakySource:
    """Both ends' view of a CV-QKD-like device: blocks with a leakage estimate, by ID (a unit
    test of the agreement logic; tests/test_cvqkd.py drives the real driver on a serial line)."""

    def __init__(self, blocks: dict[str, bytes], leaked_bits: int):
        self.blocks, self.leaked_bits, self.handed = blocks, leaked_bits, False

    async def connect(self) -> None:
        """Nothing to open: the module's blocks are in memory."""

    async def close(self) -> None:
        """Nothing to close."""

    async def fetch_new(self, max_bits: int):
        from qkdnode.interfaces import KeyBlock
        if self.handed:
            return []
        self.handed = True
        return [KeyBlock(bid, bytearray(b), self.leaked_bits) for bid, b in self.blocks.items()]

    async def fetch_by_ids(self, block_ids: list[str]):
        from qkdnode.interfaces import KeyBlock
        return [KeyBlock(bid, bytearray(self.blocks[bid]), self.leaked_bits) for bid in block_ids]


async def test_a_privacy_amplified_block_offered_again_carries_its_seed_and_is_not_lost(tmp_path):
    """A block amplified at the master end whose offer fails (the peer is down) stays pending and is
    offered again, after the outage or after a restart, with the same seed: the other end
    amplifies its copy the same way and both store the same key. (Before, the seed was kept only
    for the first offer: the other end refused the block (`pa`) and the key was lost.)"""
    from qkdnode.errors import PeerUnavailable
    a, b = (Vault(tmp_path / f"{n}.db", os.urandom(32)) for n in "ab")
    for v in (a, b):
        await asyncio.to_thread(v.open, True)
    device = {str(uuid.uuid4()): os.urandom(1024) for _ in range(2)}       # 8192-bit blocks
    saes = {"sae-a": "A", "sae-b": "B"}
    other = LinkPool(LinkConfig(LINK, "A", "slave", "cvqkd", 1 << 20, 1.0, {}), "B", b, LeakySource(device, 2000),
                     None, NodeMetrics("B"), saes)

    class DownThenUp(LoopbackPeer):
        down = True

        async def call(self, link, verb, body, timeout=15.0):
            if self.down:
                raise PeerUnavailable("peer node B: connection refused (test)")
            return await super().call(link, verb, body, timeout)

    module = LeakySource(device, 2000)                                   # hands each new block out once

    def master_pool() -> LinkPool:
        return LinkPool(LinkConfig(LINK, "B", "master", "cvqkd", 1 << 20, 1.0, {}), "A", a, module,
                        DownThenUp(other), NodeMetrics("A"), saes)
    try:
        first = master_pool()
        with pytest.raises(PeerUnavailable):
            await first.fill_once()                                      # amplified, stored pending, offer fails
        pending = a.committed_pool_bits(LINK)["pending"]
        assert 0 < pending < 2 * 8192                                    # shorter than the device blocks
        again = master_pool()                                            # the node restarted (an outage ending
        again.peer.down = False                                          # takes the same path: the vault's copy)
        await again.fill_once()                                          # offered again: both ends agree
        assert a.committed_pool_bits(LINK) == {"pending": 0, "ready": pending}
        assert b.committed_pool_bits(LINK) == {"pending": 0, "ready": pending}
        assert [k for k in (await b.run(b.check))["blocks"]] == [f"{LINK}/ready"]
        key_a = await a.run(a.carve, LINK, new_ids(1), pending // 8, "sae-a", ["sae-b"], False)
        assert (await b.run(b.apply_carve, LINK, [key_a[0].key_ID], [key_a[0].ranges], pending // 8, "sae-a",
                            ["sae-b"], True))[0].bits == key_a[0].bits  # the same final key at both ends
    finally:
        for v in (a, b):
            await asyncio.to_thread(v.close)
