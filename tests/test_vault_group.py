"""Group commit under load: many requests in one transaction behave exactly as if each had
committed alone, one after the other (docs/performance.md explains why the writer works this way)."""

import asyncio
import json
import time
import uuid

import pytest

from qkdnode.errors import PoolExhausted, UnknownKey
from qkdnode.vault import Vault, new_key_id

from tests.test_vault import LINK, fill, master_key_file, new_ids, vault  # noqa: F401  (fixtures)


def commits_of(v: Vault) -> list[int]:
    sizes: list[int] = []
    v.on_commit = lambda n_ops, seconds: sizes.append(n_ops)
    return sizes


def pool_totals_agree(v: Vault) -> bool:
    """The vault's running totals of key per link and state match the blocks table."""
    sql = {state: free * 8 for state, free in
           v._conn.execute("SELECT state, SUM(free) FROM blocks WHERE link=? AND state != 'used' GROUP BY state",
                           (LINK,))}
    return v.committed_pool_bits(LINK) == {"pending": 0, "ready": 0} | sql


async def test_hand_outs_sharing_a_commit_are_cut_as_if_one_after_another(vault):
    blocks = await fill(vault, 2)                            # 64 bytes, oldest block first
    sizes = commits_of(vault)
    asks = [16, 64, 16, 40, 32]                              # bytes; the 2nd and 4th find too little left
    results = await asyncio.gather(*(vault.run(vault.carve, LINK, new_ids(1), n, "sae-a", ["sae-b"], True)
                                     for n in asks), return_exceptions=True)
    assert sizes == [5]                                      # one transaction, one fsync
    assert isinstance(results[1], PoolExhausted) and "512 bits asked, 384 ready" in str(results[1])
    assert isinstance(results[3], PoolExhausted) and "320 bits asked, 256 ready" in str(results[3])
    first, second = list(blocks)
    assert results[0][0].ranges == [(first, 0, 16)]
    assert results[2][0].ranges == [(first, 16, 32)]
    assert results[4][0].ranges == [(second, 0, 32)]
    assert results[4][0].bits == blocks[second]
    assert await vault.run(vault.free_bytes, LINK) == 0
    report = await vault.run(vault.check)
    assert report["failures"] == [] and report["keys"]["waiting"] == 3
    assert pool_totals_agree(vault)


async def test_an_operation_that_fails_half_way_undoes_only_its_own_writes(vault):
    await fill(vault, 4)
    k1, k2 = [h.key_ID for h in await vault.run(vault.carve, LINK, new_ids(2), 32, "sae-a", ["sae-b"], True)]
    sizes = commits_of(vault)
    # The second delivery hands out k2, then meets an unknown ID: all or nothing, so k2 stays.
    got1, failed, carved = await asyncio.gather(
        vault.run(vault.deliver, "sae-b", "sae-a", [k1]),
        vault.run(vault.deliver, "sae-b", "sae-a", [k2, str(uuid.uuid4())]),
        vault.run(vault.carve, LINK, new_ids(1), 32, "sae-a", ["sae-b"], True), return_exceptions=True)
    assert sizes == [3]
    assert isinstance(failed, UnknownKey)
    assert [k for k, _ in got1] == [k1] and len(carved) == 1
    assert [k for k, _ in await vault.run(vault.deliver, "sae-b", "sae-a", [k2])] == [k2]
    with pytest.raises(UnknownKey):
        await vault.run(vault.deliver, "sae-b", "sae-a", [k1])
    events = [e for (e,) in vault._conn.execute("SELECT event FROM audit WHERE key_id=?", (k2,))]
    assert events.count("key_delivered") == 1                # the undone attempt left no trace
    assert pool_totals_agree(vault)


async def test_a_data_key_rotation_never_shares_a_transaction_with_hand_outs(vault):
    await fill(vault, 8)
    sizes = commits_of(vault)
    *_, (gen, resumed) = await asyncio.gather(
        *(vault.run(vault.carve, LINK, new_ids(1), 16, "sae-a", ["sae-b"], True) for _ in range(3)),
        vault.run(vault.begin_data_key_rotation))
    assert sizes == [3, 1] and (gen, resumed) == (2, False)
    while await vault.run(vault.reseal_batch, 3):
        pass
    assert (await vault.run(vault.check))["failures"] == []
    assert pool_totals_agree(vault)


def test_sealing_binds_rows_to_the_same_bytes_as_before():
    """Rows sealed by earlier versions (AAD = json.dumps of the fields) must still open."""
    for text in ("A-B", "relay:A>B>C", 'a"b\\c', "ünïcødé", "tab\tnew\nline", "\x00\x1f", "😀", "[]", "[[0, 16]]"):
        assert Vault._block_aad(text, text, "ready", 64, text) == \
            json.dumps(["blocks", text, text, "ready", 64, text]).encode()
        assert Vault._key_aad(text, text, text, '["sae-b"]', text, 256) == \
            json.dumps(["keys", text, text, text, '["sae-b"]', text, 256]).encode()


def test_key_ids_are_time_ordered_uuids():
    earlier = new_key_id()
    time.sleep(0.002)
    ids = [new_key_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for k in ids:
        u = uuid.UUID(k)
        assert str(u) == k and u.version == 7 and u.variant == uuid.RFC_4122
    assert all(earlier < k for k in ids)


async def test_pool_totals_follow_agreement_and_survive_a_reopen(vault):
    ids = new_ids(4)
    await vault.run(vault.add_blocks, LINK, [(b, b"\1" * 32) for b in ids], "pending")
    await vault.run(vault.add_blocks, LINK, [(ids[0], b"\1" * 32)], "pending")    # held already: no change
    assert vault.committed_pool_bits(LINK) == {"pending": 1024, "ready": 0}
    await vault.run(vault.settle_blocks, LINK, ids[:2], {ids[2]: "mismatch", "not-a-block": "unavailable"})
    assert vault.committed_pool_bits(LINK) == {"pending": 256, "ready": 512}
    with pytest.raises(PoolExhausted):
        await vault.run(vault.carve, LINK, new_ids(3), 32, "sae-a", ["sae-b"], False)
    await vault.run(vault.carve, LINK, new_ids(1), 24, "sae-a", ["sae-b"], False)
    assert vault.committed_pool_bits(LINK) == {"pending": 256, "ready": 320}
    assert pool_totals_agree(vault)
    vault.close()
    vault.open()
    assert vault.committed_pool_bits(LINK) == {"pending": 256, "ready": 320}


async def test_a_batch_of_pushed_cuts_refuses_only_the_bad_message(vault):
    """The other end of a link stores several pushed messages in one operation; one that names
    used or doubly named bytes is refused alone, and a message seen before is not cut again."""
    blocks = list(await fill(vault, 2))                       # 2 x 32 bytes
    a, b, c, d = new_ids(4)
    good = ([a], [[(blocks[0], 0, 16)]], 16, "sae-a", ["sae-b"], True)
    twice = ([b, c], [[(blocks[1], 0, 16)], [(blocks[1], 8, 24)]], 16, "sae-a", ["sae-b"], True)
    other = ([d], [[(blocks[1], 16, 32)]], 16, "sae-a", ["sae-b"], True)
    results = await vault.run(vault.apply_carve_batch, LINK, [good, twice, other])
    assert [(len(r[0]), r[1]) for r in (results[0], results[2])] == [(1, None), (1, None)]
    assert results[1][0] is None and "named twice" in str(results[1][1])
    again = await vault.run(vault.apply_carve_batch, LINK, [good])       # a repeated push
    assert again == [([], None)]
    used = await vault.run(vault.apply_carve_batch, LINK, [([b], [[(blocks[0], 8, 24)]], 16, "sae-a", ["sae-b"], True)])
    assert used[0][0] is None and "used" in str(used[0][1])
    assert await vault.run(vault.free_bytes, LINK) == 32        # 16 + 16 cut, nothing else
    assert [k for k, _ in await vault.run(vault.deliver, "sae-b", "sae-a", [a, d])] == [a, d]
    assert pool_totals_agree(vault)


async def test_used_up_blocks_lose_their_bits_at_once_and_their_rows_later(vault, monkeypatch):
    import qkdnode.vault as vault_module
    monkeypatch.setattr(vault_module, "PURGE_USED_AT", 3)
    blocks = await fill(vault, 4)
    await vault.run(vault.carve, LINK, new_ids(2), 32, "sae-a", ["sae-b"], False)     # blocks 1 and 2 used up
    rows = dict(vault._conn.execute("SELECT block_id, length(sealed) FROM blocks WHERE state='used'"))
    assert set(rows) == set(list(blocks)[:2]) and set(rows.values()) == {0}
    report = await vault.run(vault.check)
    assert report["failures"] == [] and report["blocks"] == {f"{LINK}/ready": {"blocks": 2, "bits": 512}}
    with pytest.raises(Exception, match="not a ready block"):                        # never cut again
        await vault.run(vault.apply_carve, LINK, new_ids(1), [[(list(blocks)[0], 0, 8)]], 8, "sae-a", ["sae-b"], True)
    await vault.run(vault.carve, LINK, new_ids(1), 32, "sae-a", ["sae-b"], False)     # the third: purge
    assert vault._conn.execute("SELECT COUNT(*) FROM blocks WHERE state='used'").fetchone()[0] == 0
    assert pool_totals_agree(vault)


async def test_rows_of_used_up_blocks_left_by_a_crash_go_at_the_next_clean_stop(vault):
    other = "A-C"
    blocks = await fill(vault, 2)
    await vault.run(vault.add_blocks, other, [(b, b"\2" * 32) for b in new_ids(2)], "ready")
    await vault.run(vault.carve, LINK, new_ids(1), 32, "sae-a", ["sae-b"], False)    # one block of each link
    await vault.run(vault.carve, other, new_ids(1), 32, "sae-a", ["sae-c"], False)   # used up
    # As after a crash: the rows of used-up blocks are still there when the vault opens again.
    vault._used_links.clear()
    vault._used = 0
    vault.close()
    assert vault._conn is None
    left = lambda v: v._conn.execute("SELECT link, COUNT(*) FROM blocks WHERE state='used' GROUP BY link").fetchall()  # noqa: E731
    vault.open()
    assert sorted(left(vault)) == [(LINK, 1), (other, 1)] and vault._used == 2
    vault.close()                                                                    # a clean stop purges
    vault.open()
    assert left(vault) == []
    assert await vault.run(vault.free_bytes, LINK) == 32 and await vault.run(vault.free_bytes, other) == 32
    assert (await vault.run(vault.carve, LINK, new_ids(1), 32, "sae-a", ["sae-b"], False))[0].bits == \
        blocks[list(blocks)[1]]
