"""Crash campaign: a process doing concurrent hand-outs (or a data key rotation) is killed with
SIGKILL at random moments, again and again. After every restart: no ready key is lost, no key_ID
and no bit is handed out twice, every answered hand-out is durable, and the audit agrees with
the pool. QKDNODE_CRASH_ROUNDS sets the number of kills (default 100; more in a slow run)."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from qkdnode.vault import Vault
from tests.vault_worker import master_of

LINK, KEY_BYTES = "A-B", 32
ROUNDS = int(os.environ.get("QKDNODE_CRASH_ROUNDS", "100"))
ROOT = Path(__file__).resolve().parent.parent


def start(db: Path, key: bytes, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tests.vault_worker", str(db), key.hex(), mode],
                            stdout=subprocess.PIPE, cwd=ROOT, text=True)
    assert proc.stdout.readline().strip() == "READY"
    return proc


def kill_soon(proc: subprocess.Popen, rng: random.Random) -> list[str]:
    """SIGKILL after a random moment of work; return the complete lines it printed (its answers)."""
    time.sleep(rng.uniform(0.0, 0.15))
    proc.send_signal(signal.SIGKILL)
    out = proc.stdout.read()
    proc.wait()
    return out.splitlines()[:-1] if out and not out.endswith("\n") else out.splitlines()


def fresh_vault(db: Path, key: bytes, blocks: int, block_bytes: int, twin: Path | None = None) -> int:
    """A new vault with `blocks` ready blocks of link key; `twin`: the peer node's, with the same."""
    import asyncio
    made = [(str(uuid.uuid4()), os.urandom(block_bytes)) for _ in range(blocks)]
    for path in (db, twin) if twin else (db,):
        v = Vault(path, key).open(create=True)
        try:
            asyncio.run(v.run(v.add_blocks, LINK, made, "ready"))
        finally:
            v.close()
    return blocks * block_bytes


def inspect(db: Path, key: bytes) -> dict:
    import asyncio

    v = Vault(db, key).open()
    try:
        async def look():
            report = await v.run(v.check)
            free = await v.run(v.free_bytes, LINK)
            stored = await v.run(lambda: {r[0]: r[1] for r in v._conn.execute("SELECT key_id, size_bits FROM keys")})
            audited = await v.run(lambda: {r[0] for r in v._conn.execute(
                "SELECT key_id FROM audit WHERE event='key_stored'")})
            return report, free, stored, audited
        return asyncio.run(look())
    finally:
        v.close()


def take_answers(lines: list[str], answered: dict[str, tuple], used: set[tuple[str, int]], round_no: int) -> None:
    """Record the hand-outs a victim answered; none may repeat a key_ID or a byte of link key."""
    for line in lines:
        if line == "DONE":
            continue
        key_id, ranges, digest = json.loads(line)
        assert key_id not in answered, f"round {round_no}: key_ID {key_id} answered twice"
        answered[key_id] = (ranges, digest)
        for bid, s, e in ranges:
            for i in range(s, e):
                assert (bid, i) not in used, f"round {round_no}: byte {i} of block {bid} handed out twice"
                used.add((bid, i))


def test_sigkill_during_concurrent_hand_outs_loses_nothing_and_repeats_nothing(tmp_path):
    rng = random.Random(int(os.environ.get("QKDNODE_CRASH_SEED", "4242")))
    db, key = tmp_path / "vault.db", os.urandom(32)
    total = fresh_vault(db, key, blocks=ROUNDS * 40, block_bytes=48)   # keys of 32 bytes span blocks of 48
    answered: dict[str, tuple] = {}
    used: set[tuple[str, int]] = set()
    for round_no in range(ROUNDS):
        take_answers(kill_soon(start(db, key, "handout"), rng), answered, used, round_no)
        report, free, stored, audited = inspect(db, key)
        assert not report["failures"], report["failures"]
        # Every answer an SAE got is durable, with its audit record.
        assert set(answered) <= set(stored), f"round {round_no}: an answered key was lost"
        # The audit agrees with the pool, and not one byte of ready key went missing.
        assert audited == set(stored)
        assert free + KEY_BYTES * len(stored) == total, f"round {round_no}: ready key lost or duplicated"
    digests = [d for _, d in answered.values()]
    assert len(set(digests)) == len(digests)          # no two keys share bits
    assert len(answered) > ROUNDS                     # the victims did real work between kills


@pytest.mark.parametrize("mode", ["stock", "stock-other-end"])
def test_sigkill_while_keys_are_stocked_and_issued_from_the_stock_loses_nothing_and_repeats_nothing(tmp_path, mode):
    """At the link's master end (cut here), and at its other end (the master node's vault cuts
    first, in the same process, then the keys are cut here from the ranges it named)."""
    rng = random.Random(int(os.environ.get("QKDNODE_CRASH_SEED", "4242")) + 1)
    rounds = max(ROUNDS // 2, 10)
    db, key = tmp_path / "vault.db", os.urandom(32)
    master = master_of(db) if mode == "stock-other-end" else None
    total = fresh_vault(db, key, blocks=rounds * 40, block_bytes=48, twin=master)
    answered: dict[str, tuple] = {}
    used: set[tuple[str, int]] = set()
    for round_no in range(rounds):
        take_answers(kill_soon(start(db, key, mode), rng), answered, used, round_no)
        v = Vault(db, key).open()
        try:
            import asyncio

            async def look():
                report = await v.run(v.check)
                free = await v.run(v.free_bytes, LINK)
                audit = await v.run(lambda: v._conn.execute("SELECT key_id, event, size_bits FROM audit "
                                                             "WHERE key_id IS NOT NULL").fetchall())
                stocked = {k for *_, keys in await v.run(v.stock_rows, LINK) for _, k in keys}
                return report, free, audit, stocked
            report, free, audit, stocked = asyncio.run(look())
        finally:
            v.close()
        assert not report["failures"], report["failures"]
        issued = {k for k, event, _ in audit if event == "key_issued"}
        discarded = {k for k, event, _ in audit if event == "key_discarded"}
        # Every answer is durable as issued, and gone from the stock; none is also discarded.
        assert set(answered) <= issued and not (issued & stocked) and not (issued & discarded)
        assert {k for k, event, _ in audit if event == "key_stocked"} == issued | stocked | discarded
        # Not one byte of key went missing: ready, in stock, issued or discarded (with its reason).
        assert free + KEY_BYTES * (len(issued) + len(stocked) + len(discarded)) == total, \
            f"round {round_no}: key lost or duplicated"
    digests = [d for _, d in answered.values()]
    assert len(set(digests)) == len(digests)
    assert len(answered) > rounds
    if master is not None:  # the master node holds every answered key, with the same bits, for its slave SAE
        import asyncio
        v = Vault(master, key).open()
        try:
            kept = dict(asyncio.run(v.run(v.deliver, "sae-b", "sae-a", list(answered))))
        finally:
            v.close()
        assert {k: hashlib.sha256(b).hexdigest()[:16] for k, b in kept.items()} == \
            {k: d for k, (_, d) in answered.items()}


def test_data_key_rotation_killed_midway_resumes_and_every_row_stays_readable(tmp_path):
    rng = random.Random(7)
    db, key = tmp_path / "vault.db", os.urandom(32)
    fresh_vault(db, key, blocks=300, block_bytes=32)
    before = inspect(db, key)[0]
    for _ in range(10):
        kill_soon(start(db, key, "rotate"), rng)
        report = inspect(db, key)[0]
        assert not report["failures"] and report["blocks"] == before["blocks"]
    proc = start(db, key, "rotate")
    lines = proc.stdout.read().splitlines()
    assert proc.wait() == 0 and lines[-1] == "DONE"
    report = inspect(db, key)[0]
    assert not report["failures"] and report["blocks"] == before["blocks"]
    assert len(report["data_keys"]) == 1 and report["data_keys"] != before["data_keys"]


