"""Hand-outs at a link's master end are batched: requests that come in one turn of the event
loop are cut in one vault operation and pushed to the peer in one call, each keeping its own
result (docs/performance.md, issue 10)."""

import asyncio
import os

import pytest

from qkdnode.config import LinkConfig
from qkdnode.errors import PoolExhausted
from qkdnode.links import MAX_BATCHES_IN_FLIGHT, LinkPool
from qkdnode.metrics import NodeMetrics
from qkdnode.vault import Vault

from tests.test_vault import LINK, fill

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
