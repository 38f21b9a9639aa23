"""The vault on its own: what an attacker with a copy of the disk, or write access to it, gets."""

import asyncio
import os
import time
import sqlite3
import uuid

import pytest

from qkdnode.config import VaultConfig
from qkdnode.errors import CarveConflict, NotYourKey, PoolExhausted, SealBroken, UnknownKey, VaultError
from qkdnode.vault import Vault, create_master_key_file, load_master_key

LINK = "A-B"


@pytest.fixture
def master_key_file(tmp_path):
    path = tmp_path / "master.key"
    create_master_key_file(path)
    return path


@pytest.fixture
async def vault(tmp_path, master_key_file):
    v = Vault(tmp_path / "vault.db", load_master_key(VaultConfig(tmp_path / "vault.db", master_key_file, None)))
    v.open(create=True)
    yield v
    v.close()


async def fill(vault: Vault, n_blocks: int, size: int = 32) -> dict[str, bytes]:
    blocks = {str(uuid.uuid4()): os.urandom(size) for _ in range(n_blocks)}
    await vault.run(vault.add_blocks, LINK, list(blocks.items()), "ready")
    return blocks


def new_ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


async def test_a_copy_of_the_files_holds_no_key_bits(vault, tmp_path):
    blocks = await fill(vault, 16)
    # Keys waiting for a slave are stored too; cut some, leave them waiting.
    handed = await vault.run(vault.carve, LINK, new_ids(5), 48, "sae-a", ["sae-b"], True)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("vault.db"))
    assert len(raw) > 10_000
    for bits in [*blocks.values(), *(h.bits for h in handed)]:
        for i in range(0, len(bits) - 7, 8):  # no 8-byte run of any key, anywhere
            assert bits[i:i + 8] not in raw


async def test_keys_are_cut_from_oldest_block_first_and_all_or_nothing(vault):
    blocks = await fill(vault, 4, size=32)                    # 1024 bits ready
    stream = b"".join(blocks.values())
    with pytest.raises(PoolExhausted):
        await vault.run(vault.carve, LINK, new_ids(3), 48, "sae-a", ["sae-b"], False)   # 1152 bits
    assert await vault.run(vault.free_bytes, LINK) == 128     # nothing was taken
    handed = await vault.run(vault.carve, LINK, new_ids(2), 40, "sae-a", ["sae-b"], False)
    assert b"".join(h.bits for h in handed) == stream[:80]    # keys span blocks, in order
    assert await vault.run(vault.free_bytes, LINK) == 48


async def test_the_other_end_cuts_the_same_bits_and_refuses_a_double_cut(tmp_path, vault, master_key_file):
    other = Vault(tmp_path / "other.db", load_master_key(VaultConfig(tmp_path / "o", master_key_file, None)))
    other.open(create=True)
    try:
        blocks = await fill(vault, 3)
        await other.run(other.add_blocks, LINK, list(blocks.items()), "ready")
        ids = new_ids(2)
        mine = await vault.run(vault.carve, LINK, ids, 40, "sae-a", ["sae-b"], False)
        theirs = await other.run(other.apply_carve, LINK, ids, [h.ranges for h in mine], 40, "sae-a", ["sae-b"],
                                 True)
        assert [h.bits for h in theirs] == [h.bits for h in mine]
        # The same message again (a retry) cuts nothing more.
        assert await other.run(other.apply_carve, LINK, ids, [h.ranges for h in mine], 40, "sae-a", ["sae-b"],
                               True) == []
        # The same bits under a new key_ID: refused, nothing changes.
        free = await other.run(other.free_bytes, LINK)
        with pytest.raises(CarveConflict):
            await other.run(other.apply_carve, LINK, new_ids(1), [mine[0].ranges], 40, "sae-a", ["sae-b"], True)
        assert await other.run(other.free_bytes, LINK) == free
        got = await other.run(other.deliver, "sae-b", "sae-a", ids)
        assert [b for _, b in got] == [h.bits for h in mine]
    finally:
        other.close()


async def test_deliver_is_once_per_slave_and_all_or_nothing(vault):
    await fill(vault, 4)
    ids = [h.key_ID for h in await vault.run(vault.carve, LINK, new_ids(2), 32, "sae-a", ["sae-b", "sae-c"], True)]
    with pytest.raises(NotYourKey):
        await vault.run(vault.deliver, "sae-d", "sae-a", ids)
    with pytest.raises(UnknownKey):                           # one unknown ID spoils the request...
        await vault.run(vault.deliver, "sae-b", "sae-a", [ids[0], str(uuid.uuid4())])
    assert len(await vault.run(vault.deliver, "sae-b", "sae-a", ids)) == 2   # ...and took nothing
    with pytest.raises(UnknownKey):
        await vault.run(vault.deliver, "sae-b", "sae-a", ids[:1])
    assert len(await vault.run(vault.deliver, "sae-c", "sae-a", ids)) == 2
    assert (await vault.run(vault.counts))["keys_waiting"] == 0


async def test_keys_no_slave_fetched_expire_and_their_bits_go(vault, tmp_path):
    await fill(vault, 4)
    old = [h.key_ID for h in await vault.run(vault.carve, LINK, new_ids(2), 32, "sae-a", ["sae-b"], True)]
    cutoff = time.time()
    await asyncio.sleep(0.01)
    new = [h.key_ID for h in await vault.run(vault.carve, LINK, new_ids(1), 32, "sae-a", ["sae-b"], True)]
    await vault.run(vault.deliver, "sae-b", "sae-a", old[:1])  # fetched: consumed, nothing left to expire
    assert await vault.run(vault.expire_keys, cutoff) == 1
    with pytest.raises(UnknownKey):
        await vault.run(vault.deliver, "sae-b", "sae-a", old[1:])
    assert len(await vault.run(vault.deliver, "sae-b", "sae-a", new)) == 1  # younger keys stay
    events = [r[0] for r in vault._conn.execute("SELECT event FROM audit WHERE key_id=?", (old[1],))]
    assert events[-1] == "key_expired"


def _db(tmp_path):
    return sqlite3.connect(tmp_path / "vault.db", isolation_level=None)


async def test_tampered_swapped_or_moved_rows_are_detected_and_never_served(vault, tmp_path):
    await fill(vault, 4)
    # Three keys of 24 bytes: the third leaves block 3 partly cut, block 4 untouched.
    k1, k2, k3 = [h.key_ID for h in await vault.run(vault.carve, LINK, new_ids(3), 24, "sae-a", ["sae-b"], True)]
    db = _db(tmp_path)
    # Flip one byte of a sealed key.
    sealed = bytearray(db.execute("SELECT sealed FROM keys WHERE key_id=?", (k1,)).fetchone()[0])
    sealed[20] ^= 1
    db.execute("UPDATE keys SET sealed=? WHERE key_id=?", (bytes(sealed), k1))
    # Swap the sealed bits of two keys.
    s2, s3 = (db.execute("SELECT sealed FROM keys WHERE key_id=?", (k,)).fetchone()[0] for k in (k2, k3))
    db.execute("UPDATE keys SET sealed=? WHERE key_id=?", (s3, k2))
    db.execute("UPDATE keys SET sealed=? WHERE key_id=?", (s2, k3))
    for key_id in (k1, k2, k3):
        with pytest.raises(SealBroken):
            await vault.run(vault.deliver, "sae-b", "sae-a", [key_id])
    # Move a ready block to another link, or reset its bookkeeping to re-serve used bytes.
    db.execute("UPDATE blocks SET link='A-C' WHERE carved = '[]'")
    db.execute("UPDATE blocks SET carved='[]', free=size WHERE link=? AND carved != '[]'", (LINK,))
    db.close()
    with pytest.raises(SealBroken):
        await vault.run(vault.carve, "A-C", new_ids(1), 8, "sae-a", ["sae-c"], False)
    with pytest.raises(SealBroken):
        await vault.run(vault.carve, LINK, new_ids(1), 32, "sae-a", ["sae-b"], False)


async def test_wrong_master_key_or_loose_permissions_fail_at_start(vault, tmp_path):
    await fill(vault, 1)
    vault.close()
    other = tmp_path / "other.key"
    create_master_key_file(other)
    with pytest.raises(VaultError, match="does not open this vault"):
        Vault(tmp_path / "vault.db", load_master_key(VaultConfig(tmp_path / "vault.db", other, None))).open()
    os.chmod(other, 0o644)
    with pytest.raises(VaultError, match="0600"):
        load_master_key(VaultConfig(tmp_path / "vault.db", other, None))
    with pytest.raises(VaultError, match="exists already"):
        create_master_key_file(other)
    with pytest.raises(VaultError, match="does not exist"):
        Vault(tmp_path / "nope.db", os.urandom(32)).open(create=False)


async def test_master_key_from_a_systemd_credential(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "vault-master-key").write_bytes(os.urandom(32))
    cfg = VaultConfig(tmp_path / "v.db", None, "vault-master-key")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(VaultError, match="CREDENTIALS_DIRECTORY"):
        load_master_key(cfg)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_master_key(cfg) == (creds / "vault-master-key").read_bytes()


async def test_concurrent_hand_outs_share_commits_and_never_overlap(vault):
    await fill(vault, 64)                                     # 2048 bytes
    results = await asyncio.gather(*(
        vault.run(vault.carve, LINK, new_ids(1), 16, "sae-a", ["sae-b"], False) for _ in range(128)))
    pieces = [r for res in results for h in res for r in h.ranges]
    assert sum(e - s for _, s, e in pieces) == 2048
    covered = {(bid, i) for bid, s, e in pieces for i in range(s, e)}
    assert len(covered) == 2048                               # no byte handed out twice
    with pytest.raises(PoolExhausted):
        await vault.run(vault.carve, LINK, new_ids(1), 16, "sae-a", ["sae-b"], False)
