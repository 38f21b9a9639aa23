"""A process that works a vault hard until it is killed: the crash campaign's victim.

    python -m tests.vault_worker DB MASTER_KEY_HEX handout   # concurrent hand-outs, one line per answer
    python -m tests.vault_worker DB MASTER_KEY_HEX stock     # keys stocked ahead, then issued from the stock
    python -m tests.vault_worker DB MASTER_KEY_HEX rotate    # data key rotation in small batches

A hand-out's line is printed only after its commit returned: the line is the answer an SAE
would have got. (The digest stands in for the bits, which a test may print; a daemon never.)
"""

import asyncio
import hashlib
import json
import sys
import uuid
from pathlib import Path

from qkdnode.errors import PoolExhausted
from qkdnode.vault import STOCK, Vault

LINK = "A-B"
KEY_BYTES = 32
REQUESTERS = 32


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def handout(vault: Vault) -> None:
    async def requester() -> None:
        while True:
            try:
                (h,) = await vault.run(vault.carve, LINK, [str(uuid.uuid4())], KEY_BYTES, "sae-a", ["sae-b"], True)
            except PoolExhausted:
                return
            say(json.dumps([h.key_ID, h.ranges, hashlib.sha256(h.bits).hexdigest()[:16]]))

    await asyncio.gather(*(requester() for _ in range(REQUESTERS)))


async def stock(vault: Vault) -> None:
    """What a link's master node does with its stock: at start, stock left `pushing` is discarded
    and `ready` stock serves again; then keys are stocked four at a time (the push to the peer
    left out) and issued one by one."""
    rows = await vault.run(vault.stock_rows, LINK)
    pushing = [chunk for chunk, _, _, _, state, _, _ in rows if state == "pushing"]
    if pushing:
        await vault.run(vault.stock_discard, LINK, pushing, "stock push unconfirmed at stop")
    ready = [(chunk, i, k) for chunk, _, _, _, state, _, keys in rows if state == "ready" for i, k in keys]

    async def requester(mine: list[tuple[str, int, str]]) -> None:
        while True:
            if not mine:
                ids = [str(uuid.uuid4()) for _ in range(4)]
                ((_, exc),) = await vault.run(vault.carve_batch, LINK, [(ids, KEY_BYTES, "sae-a", ["sae-b"], STOCK,
                                                                         None)])
                if exc is not None:
                    return
                await vault.run(vault.stock_ready, LINK, [ids[0]])
                mine = [(ids[0], i, k) for i, k in enumerate(ids)]
            ((handouts, exc),) = await vault.run(vault.issue_stock, LINK, [([mine.pop()], "sae-a", ["sae-b"],
                                                                            KEY_BYTES * 8)])
            if exc is not None:
                raise exc
            (h,) = handouts
            say(json.dumps([h.key_ID, h.ranges, hashlib.sha256(h.bits).hexdigest()[:16]]))

    await asyncio.gather(*(requester(ready[i::REQUESTERS]) for i in range(REQUESTERS)))


async def rotate(vault: Vault) -> None:
    gen, resumed = await vault.run(vault.begin_data_key_rotation)
    say(f"rotating to {gen} resumed={resumed}")
    while n := await vault.run(vault.reseal_batch, 7):
        say(f"resealed {n}")


def main() -> None:
    db, key_hex, mode = sys.argv[1:4]
    vault = Vault(Path(db), bytes.fromhex(key_hex)).open()
    say("READY")
    asyncio.run({"handout": handout, "stock": stock, "rotate": rotate}[mode](vault))
    say("DONE")
    vault.close()


if __name__ == "__main__":
    main()
