"""A process that works a vault hard until it is killed: the crash campaign's victim.

    python -m tests.vault_worker DB MASTER_KEY_HEX handout   # concurrent hand-outs, one line per answer
    python -m tests.vault_worker DB MASTER_KEY_HEX stock     # keys stocked ahead, then issued from the stock
    python -m tests.vault_worker DB MASTER_KEY_HEX stock-other-end   # the same at the link's other end
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


def master_of(db: Path) -> Path:
    """stock-other-end: the vault of the link's master node, beside the victim's."""
    return db.with_name(db.name + ".master")


async def stock(vault: Vault, master: Vault | None = None) -> None:
    """What a node does with its stock: at start, stock left `pushing` is discarded and `ready`
    stock serves again; then keys are stocked four at a time and issued one by one. At the link's
    master end (`master` None) they are cut here (the push to the peer left out); at the other end
    the master node's vault cuts them for its slave SAE first (`allocate`), then they are cut here
    from the ranges it named."""
    rows = await vault.run(vault.stock_rows, LINK)
    pushing = [chunk for chunk, _, _, _, state, _, _ in rows if state == "pushing"]
    if pushing:
        await vault.run(vault.stock_discard, LINK, pushing, "stock push unconfirmed at stop")
    ready = [(chunk, i, k) for chunk, _, _, _, state, _, keys in rows if state == "ready" for i, k in keys]

    async def requester(mine: list[tuple[str, int, str]]) -> None:
        while True:
            if not mine:
                ids = [str(uuid.uuid4()) for _ in range(4)]
                if master is None:
                    ((_, exc),) = await vault.run(vault.carve_batch, LINK, [(ids, KEY_BYTES, "sae-a", ["sae-b"], STOCK,
                                                                             None)])
                    if exc is not None:
                        return
                else:
                    ((allocated, exc),) = await master.run(master.carve_batch, LINK, [(ids, KEY_BYTES, "sae-a",
                                                                                       ["sae-b"], True)])
                    if exc is not None:
                        return
                    await vault.run(vault.apply_carve, LINK, ids, [h.ranges for h in allocated], KEY_BYTES, "sae-a",
                                    ["sae-b"], STOCK)
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
    master = Vault(master_of(Path(db)), bytes.fromhex(key_hex)).open() if mode == "stock-other-end" else None
    say("READY")
    if master is not None:
        asyncio.run(stock(vault, master))
    else:
        asyncio.run({"handout": handout, "stock": stock, "rotate": rotate}[mode](vault))
    say("DONE")
    vault.close()


if __name__ == "__main__":
    main()
