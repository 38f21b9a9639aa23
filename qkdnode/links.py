"""A link's key pool at this node: getting key from the device, agreeing it with the peer
node, and cutting keys for SAEs out of it.

Agreement (the link's master end drives it): pull blocks from the local device with
`fetch_new`, store them `pending`, offer their IDs with keyed digests to the peer; the peer
pulls the same IDs from its own device, compares digests, stores the matching ones `ready`
and answers per block; the master then marks them ready or discards them. A block that does
not match is discarded at both ends and counted.

Hand-out: only the link's master node decides which bits become which key, so the two ends
never cut the same bits twice. A request at the master node is cut, committed, pushed to the
peer (which cuts the same ranges and keeps the bits for the slave SAEs), and only then
answered. A request at the other node asks the master node to cut (it keeps the bits for its
slave SAEs), cuts the same ranges itself, commits, and answers. At either end, requests that
come while earlier ones are under way wait and go together: one vault operation and one peer
call for all of them.

The stock: for a (master SAE, slave SAEs, size) that asks for keys steadily, the master SAE's
node agrees keys with the peer ahead of demand (cut and pushed at the link's master end,
allocated by the master node at the other end) and keeps them sealed; such a request is answered
from the stock after one commit here, without the peer round trip (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import secrets
import time
from hashlib import sha256

from qkdnode import native
from qkdnode.config import LinkConfig
from qkdnode.errors import (
    BlocksUnavailable,
    CarveConflict,
    DeviceRejected,
    DriverError,
    PeerRejected,
    PeerUnavailable,
    PoolExhausted,
    QkdnodeError,
)
from qkdnode.interfaces import KeySource
from qkdnode.metrics import NodeMetrics
from qkdnode.peer import BadMessage, PeerClient, field, ranges_of
from qkdnode.vault import STOCK, HandOut, Vault, new_key_ids

log = logging.getLogger("qkdnode.links")

OFFERS_IN_FLIGHT = 2         # rounds whose offer may be under way while the next round is fetched
FILL_CALLS_PER_ROUND = 8     # device calls whose blocks are stored and offered together
GROUP_BYTES = 16384          # device blocks without leakage joined into one stored block up to this size...
GROUP_PARTS = 128            # ...and this many device blocks
MAX_BATCH = 256              # hand-out requests cut and pushed (or allocated) together at most...
MAX_BATCH_KEYS = 4096        # ...and keys (a peer message of ~0.5 MB; a larger request goes alone)
MAX_BATCHES_IN_FLIGHT = 1    # a batch is cut, pushed and answered while the next requests gather (docs/performance.md)
OUTBOX_RETRY_AFTER = 5.0  # seconds a pushed hand-out may stay unconfirmed before the retry loop sends it again
OUTBOX_DISCARDS_PER_CALL = 512  # discards the outbox loop sends to the peer in one call

# The stock (either end; docs/vault.md): keys agreed with the peer ahead of demand for a (master
# SAE, slave SAEs, size) that asks for keys steadily, so that its requests are answered after one
# commit here, without the peer round trip.
STOCK_MIN_RATE = 50          # keys/s a (master, slaves, size) asks for before keys are stocked for it
STOCK_SECONDS = 2.0          # the stock aims at this many seconds of its recent rate...
STOCK_MIN_KEYS, STOCK_MAX_KEYS = 128, 8192   # ...within these bounds
STOCK_PUSH_KEYS = 256        # keys agreed at a time (a short vault operation beside the requests)
STOCK_POOL_SHARE = 4         # a refill takes at most 1/4 of the ready pool
STOCK_IDLE_AFTER = 60.0      # seconds without that demand before its stock is no longer topped up
STOCK_MAX_AGE = 1800.0       # stock older than this is discarded at both ends (well inside any key_ttl_hours)
STOCK_PLAN_EVERY = 1.0       # seconds between looks at the demand


PA_SECURITY_BITS = 50  # privacy amplification fails with probability at most 2^-50 per block (docs/relay.md)


def pa_output_bits(n_in: int, leaked_bits: int) -> int:
    """Final key length after privacy amplification of a reconciled block (leftover hash lemma):
    the input less what reconciliation disclosed and twice the security parameter, in whole bytes."""
    return max(n_in - leaked_bits - 2 * PA_SECURITY_BITS, 0) // 8 * 8


def block_digest(salt: bytes, link: str, block_id: str, bits: bytes | bytearray) -> str:
    """Keyed digest that lets two ends compare a block without revealing it (fresh salt per offer)."""
    return hmac.new(salt, b"%s|%s|" % (link.encode(), block_id.encode()) + bytes(bits), sha256).hexdigest()[:32]


class LinkPool:
    def __init__(self, cfg: LinkConfig, node_id: str, vault: Vault, source: KeySource, peer: PeerClient,
                 metrics: NodeMetrics, saes: dict[str, str]):
        self.cfg, self.node_id = cfg, node_id
        self.saes = saes  # SAE ID -> node ID, to check what the peer says about a hand-out
        self.vault, self.source, self.peer, self.metrics = vault, source, peer, metrics
        self._tasks: list[asyncio.Task] = []
        self._offer_lock = asyncio.Lock()
        self._confirmed: list[str] = []  # outbox entries the peer acknowledged, removed with the next batch
        self._offer_slots = asyncio.Semaphore(OFFERS_IN_FLIGHT)
        self._offering: set[str] = set()          # block IDs of offers under way
        self._background: set[asyncio.Task] = set()
        self._waiting: list[tuple] = []  # hand-out requests not yet in a batch
        self._in_flight = 0
        self._batch_tasks: set[asyncio.Task] = set()
        self._batch_starting: asyncio.Task | None = None  # created, not yet run (has taken no request)
        # The stock, by (master SAE, sorted slave SAEs, size in bits): ready keys (chunk ID, index
        # in the chunk, key_ID, created), oldest first; how many to keep; keys asked since the last
        # look; when that demand was last seen.
        self._stock: dict[tuple, collections.deque] = {}
        self._stock_target: dict[tuple, int] = {}
        self._demand: dict[tuple, int] = {}
        self._demand_seen: dict[tuple, float] = {}
        self._stock_wake = asyncio.Event()
        self.device_ok = False
        self.ready_bits = 0        # as of the last gauge refresh
        self.ingest_bps = 0.0      # agreed key per second, smoothed (routing weighs links by it)
        self.consumed_bits = 0     # key cut from this pool since start, by either end (the SDN model's consumption)
        self._ingest_at = time.monotonic()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.refresh_gauge()
        await self._load_stock()
        # Both ends: the outbox (at the other end it holds only discards of its stock), the stock.
        self._tasks.append(asyncio.create_task(self._outbox_loop(), name=f"outbox {self.cfg.id}"))
        self._tasks.append(asyncio.create_task(self._stock_loop(), name=f"stock {self.cfg.id}"))
        if self.cfg.is_master:
            self._tasks.append(asyncio.create_task(self._fill_loop(), name=f"fill {self.cfg.id}"))
        else:  # the device is opened now, not at the first offer: some (a CV-QKD receiver) must be started
            self._tasks.append(asyncio.create_task(self._connect_loop(), name=f"connect {self.cfg.id}"))

    async def _connect_loop(self) -> None:
        backoff = 0.5
        while not self.device_ok:
            try:
                await self._ensure_device()
                return
            except asyncio.CancelledError:
                raise
            except DriverError as exc:
                self._device(False)
                log.warning("link %s: device: %s", self.cfg.id, exc)
            except Exception:
                log.exception("link %s: unexpected failure opening the device", self.cfg.id)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def stop(self) -> None:
        for t in (*self._tasks, *self._background):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        self._tasks.clear()
        await self.source.close()

    async def _ensure_device(self) -> None:
        if not self.device_ok:
            await self.source.connect()
            self._device(True)

    def _device(self, ok: bool) -> None:
        self.device_ok = ok
        self.metrics.driver_up.labels(self.cfg.id).set(1 if ok else 0)

    async def refresh_gauge(self) -> int:
        """Update the pool gauges; returns the ready bytes (as of the vault's last commit)."""
        bits = self.vault.committed_pool_bits(self.cfg.id)
        for state, n in bits.items():
            self.metrics.pool_bits.labels(self.cfg.id, state).set(n)
        self.metrics.pool_bits.labels(self.cfg.id, STOCK).set(self.vault.committed_stock_bits(self.cfg.id))
        self.metrics.pool_ready_bits.labels(self.cfg.id).set(bits["ready"])
        self.ready_bits = bits["ready"]
        return bits["ready"] // 8

    def _ingested(self, nbits: int) -> None:
        """Smooth the agreed-key rate over about ten seconds."""
        now = time.monotonic()
        dt = max(now - self._ingest_at, 1e-3)
        self._ingest_at = now
        w = min(dt / 10.0, 1.0)
        self.ingest_bps = (1 - w) * self.ingest_bps + w * (nbits / dt)

    # ------------------------------------------------------------ agreement, master side

    async def _fill_loop(self) -> None:
        backoff = self.cfg.fetch_interval
        while True:
            try:
                await self._ensure_device()
                if await self.fill_once():
                    await asyncio.sleep(0)  # more to fetch: the next round at once, after whatever waits
                    continue
                backoff = self.cfg.fetch_interval
            except asyncio.CancelledError:
                raise
            except DriverError as exc:
                self._device(False)
                log.warning("link %s: device: %s", self.cfg.id, exc)
                backoff = min(backoff * 2, 30.0)
            except QkdnodeError as exc:
                log.warning("link %s: %s", self.cfg.id, exc)
                backoff = min(backoff * 2, 30.0)
            except Exception:
                log.exception("link %s: unexpected failure in the fill loop", self.cfg.id)
                backoff = min(backoff * 2, 30.0)
            await asyncio.sleep(backoff)

    async def fill_once(self) -> bool:
        """Confirm blocks left pending (after a restart or a peer outage), then top the pool up.
        True if it took key and the pool is still below its target (worth another round now)."""
        if self.vault.committed_pool_bits(self.cfg.id)["pending"] and not self._offering:
            # (Blocks of an offer still under way are pending too: never offered again beside it.)
            pending = await self.vault.run(self.vault.pending_blocks, self.cfg.id)
            if pending:
                parts, pa = await self.vault.run(self.vault.pending_offers, self.cfg.id)
                await self._offer(pending, pa, parts)
        # Ready and pending key as of the vault's last commit: no vault round trip (under load it
        # would wait behind the hand-outs' commits every round). Blocks of an offer still under
        # way are pending, so they count.
        want = self.cfg.pool_target_bits - sum(self.vault.committed_pool_bits(self.cfg.id).values())
        if want <= 0:
            return False
        # A device that answers a full batch (a KME hands out at most max_key_per_request keys a
        # call) is asked again, up to FILL_CALLS_PER_ROUND times, and the next round follows at
        # once; then one vault operation and one offer for all of it. Other devices (a CV-QKD
        # module hands over what it has buffered) are asked once a round, every fetch_interval.
        blocks: list = []
        got, full = 0, False
        for _ in range(FILL_CALLS_PER_ROUND):
            more = await self.source.fetch_new(want - got)
            blocks.extend(more)
            got += sum(len(b.bits) for b in more) * 8
            limit = getattr(getattr(self.source, "last_status", None), "max_key_per_request", None)
            full = bool(more) and isinstance(limit, int) and len(more) >= limit
            if not full or got >= want:
                break
        if not blocks:
            return False
        pa: dict[str, dict] = {}
        parts: dict[str, list[str]] = {}
        final: list[tuple[str, bytearray]] = []
        group: list = []  # device blocks without leakage, stored and offered as one block

        def close_group() -> None:
            if len(group) == 1:
                final.append((group[0].block_id, group[0].bits))
            elif group:
                parts[group[0].block_id] = [b.block_id for b in group]
                final.append((group[0].block_id, bytearray(b"".join(b.bits for b in group))))
                for b in group:
                    b.wipe()
            group.clear()

        group_bytes = 0
        for b in blocks:
            if b.leaked_bits:
                close_group()
                n_out = pa_output_bits(len(b.bits) * 8, b.leaked_bits)
                if n_out <= 0:
                    self.metrics.blocks_discarded.labels(self.cfg.id, "too_leaky").inc()
                    b.wipe()
                    continue
                seed = secrets.token_bytes((native.toeplitz_seed_bits(len(b.bits) * 8, n_out) + 7) // 8)
                pa[b.block_id] = {"seed": seed.hex(), "n_out": n_out}
                final.append((b.block_id, bytearray(native.toeplitz_hash(seed, b.bits, len(b.bits) * 8, n_out))))
                b.wipe()
            else:
                if group and (len(group) >= GROUP_PARTS or group_bytes + len(b.bits) > GROUP_BYTES):
                    close_group()
                    group_bytes = 0
                group.append(b)
                group_bytes += len(b.bits)
        close_group()
        if not final:
            return False
        await self.vault.run(self.vault.add_blocks, self.cfg.id, final, "pending", parts, pa)
        if full and got < want:
            # The device has more: fetch the next round while the peer confirms this one.
            await self._offer_slots.acquire()
            self._offering.update(bid for bid, _ in final)
            self._in_background(self._offer_in_background(final, pa, parts, blocks))
            return True
        try:
            await self._offer(final, pa, parts)
        finally:
            for b in blocks:
                b.wipe()
        return False

    def _in_background(self, coro) -> None:
        """A task the pool keeps (and `stop` ends) but nobody awaits."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _offer_in_background(self, final, pa, parts, blocks) -> None:
        try:
            await self._offer(final, pa, parts)
        except QkdnodeError as exc:  # the blocks stay pending; the fill loop offers them again
            log.warning("link %s: %s", self.cfg.id, exc)
        except Exception:
            log.exception("link %s: unexpected failure offering blocks", self.cfg.id)
        finally:
            self._offering.difference_update(bid for bid, _ in final)
            for b in blocks:
                b.wipe()
            self._offer_slots.release()

    async def _offer(self, blocks: list[tuple[str, bytearray]], pa: dict[str, dict] | None = None,
                     parts: dict[str, list[str]] | None = None) -> None:
        """Offer blocks by keyed digest. Blocks in `pa` were privacy-amplified here; the peer
        applies the same Toeplitz seed to its copy before it compares. A block in `parts` is the
        device's blocks of those IDs end to end (stored as one, named by the first); the peer
        fetches them all and joins them the same way. Both are kept with the pending blocks in
        the vault, so an offer made again (after an outage or a restart) carries them too."""
        salt = secrets.token_bytes(16)
        pa, parts = pa or {}, parts or {}
        offers = [{"block_ID": bid, "size": len(bits), "digest": block_digest(salt, self.cfg.id, bid, bits),
                   **({"pa": pa[bid]} if bid in pa else {}), **({"parts": parts[bid]} if bid in parts else {})}
                  for bid, bits in blocks]
        for _, bits in blocks:
            bits[:] = bytes(len(bits))
        answer = await self.peer.call(self.cfg.id, "offer", {"salt": salt.hex(), "blocks": offers}, timeout=300)
        results = answer.get("results")
        if not isinstance(results, dict):
            raise PeerRejected(f"link {self.cfg.id}: offer answer without results")
        ready = [o["block_ID"] for o in offers if results.get(o["block_ID"]) == "ready"]
        discard = {o["block_ID"]: str(results.get(o["block_ID"], "no answer"))[:40] for o in offers
                   if o["block_ID"] not in ready}
        # A block the peer did not answer for stays pending and is offered again.
        discard = {k: v for k, v in discard.items() if v in ("mismatch", "unavailable", "pa")}
        await self.vault.run(self.vault.settle_blocks, self.cfg.id, ready, discard)
        # The metrics count device blocks, whether stored alone or joined.
        count = {o["block_ID"]: len(o.get("parts", ())) or 1 for o in offers}
        self.metrics.blocks_ready.labels(self.cfg.id).inc(sum(count[b] for b in ready))
        sizes = {o["block_ID"]: o["size"] for o in offers}
        self._ingested(8 * sum(sizes[b] for b in ready))
        for bid, reason in discard.items():
            self.metrics.blocks_discarded.labels(self.cfg.id, reason).inc(count[bid])
        if discard:
            log.warning("link %s: %d block(s) discarded at both ends (%s)", self.cfg.id, len(discard),
                        ", ".join(sorted(set(discard.values()))))
        await self.refresh_gauge()

    # ------------------------------------------------------------ agreement, slave side

    async def on_offer(self, body: dict) -> dict:
        try:
            salt = bytes.fromhex(field(body, "salt", str))
        except ValueError:
            raise BadMessage("salt is not hex") from None
        offers = field(body, "blocks", list)
        wanted: dict[str, tuple[int, str]] = {}
        pa: dict[str, tuple[bytes, int]] = {}
        parts: dict[str, list[str]] = {}
        for o in offers:
            if not isinstance(o, dict):
                raise BadMessage("each offered block is an object")
            bid = field(o, "block_ID", str)
            wanted[bid] = (field(o, "size", int), field(o, "digest", str))
            if "parts" in o:
                p = o["parts"]
                if not isinstance(p, list) or not 1 <= len(p) <= 4096 or p[0] != bid or \
                        not all(isinstance(x, str) for x in p) or len(set(p)) != len(p):
                    raise BadMessage("parts must be an array of distinct block IDs, the first the block's own")
                parts[bid] = p
            if "pa" in o:
                p = o["pa"] if isinstance(o["pa"], dict) else {}
                try:
                    pa[bid] = (bytes.fromhex(field(p, "seed", str)), field(p, "n_out", int))
                except ValueError:
                    raise BadMessage("pa.seed is not hex") from None
        async with self._offer_lock:  # a retried offer waits for the first and finds its blocks ready
            have = await self.vault.run(self.vault.ready_block_ids, self.cfg.id, list(wanted))
            results = {bid: "ready" for bid in have}
            todo = [bid for bid in wanted if bid not in have]
            if todo:
                ids = [p for bid in todo for p in parts.get(bid, [bid])]
                if len(set(ids)) != len(ids):
                    raise BadMessage("a device block is named by two offered blocks")
                await self._ensure_device()
                # Single blocks in one call, as before; each joined block on its own, so that a part
                # the device has lost costs that block alone.
                missing: dict[str, str] = {}
                singles = [bid for bid in todo if bid not in parts]
                try:
                    by_id = {b.block_id: b for b in (await self._fetch_each(singles, missing) if singles else [])}
                    for bid in todo:
                        if bid in parts:
                            by_id.update((b.block_id, b) for b in await self._fetch_each(parts[bid], missing))
                except DriverError:  # this end's device failed: show it here, not only in the master's log
                    self._device(False)
                    raise
                self._device(True)
                matching = []
                for bid in todo:
                    got = [by_id.get(p) for p in parts.get(bid, [bid])]
                    if any(b is None for b in got):
                        results[bid] = "unavailable"
                        for b in got:
                            if b is not None:
                                b.wipe()
                        continue
                    size, digest = wanted[bid]
                    if len(got) == 1:
                        bits = self._amplify(got[0], pa.get(bid))
                    else:  # joined device blocks are never amplified: leakage is per device block
                        bits = None if bid in pa or any(b.leaked_bits for b in got) else \
                            bytearray(b"".join(b.bits for b in got))
                    for b in got:
                        b.wipe()
                    if bits is None:
                        results[bid] = "pa"
                        continue
                    ok = len(bits) == size and hmac.compare_digest(digest, block_digest(salt, self.cfg.id, bid, bits))
                    if ok:
                        matching.append((bid, bytes(bits)))
                    results[bid] = "ready" if ok else "mismatch"
                    bits[:] = bytes(len(bits))
                await self.vault.run(self.vault.add_blocks, self.cfg.id, matching, "ready")
                for bid, r in results.items():  # in device blocks, as at the master end
                    if r != "ready":
                        self.metrics.blocks_discarded.labels(self.cfg.id, r).inc(len(parts.get(bid, ())) or 1)
                self.metrics.blocks_ready.labels(self.cfg.id).inc(sum(len(parts.get(b, ())) or 1 for b, _ in matching))
                self._ingested(8 * sum(len(b) for _, b in matching))
        await self.refresh_gauge()
        return {"results": results}

    @staticmethod
    def _amplify(block, pa: tuple[bytes, int] | None) -> bytearray | None:
        """This end's copy of a block as the master end stored it: privacy-amplified with the
        master's seed where the device reported leakage. None if the two ends disagree on
        whether or how much to amplify (this end checks the length against its own leakage)."""
        n_in = len(block.bits) * 8
        if pa is None:
            return None if block.leaked_bits else bytearray(block.bits)
        seed, n_out = pa
        if not 0 < n_out <= pa_output_bits(n_in, block.leaked_bits) or \
                len(seed) != (native.toeplitz_seed_bits(n_in, n_out) + 7) // 8:
            return None
        return bytearray(native.toeplitz_hash(seed, block.bits, n_in, n_out))

    async def _fetch_each(self, ids: list[str], results: dict[str, str]):
        """All blocks at once; if the device refuses the batch, the rest without the blocks it
        names as missing, else one by one to find the missing ones."""
        try:
            return await self.source.fetch_by_ids(ids)
        except BlocksUnavailable as exc:  # one wait for all the missing blocks, not one per block
            gone = set(exc.block_ids) & set(ids)
            if gone:
                for bid in gone:
                    results[bid] = "unavailable"
                ids = [bid for bid in ids if bid not in gone]
                if not ids:
                    return []
                try:
                    return await self.source.fetch_by_ids(ids)
                except DeviceRejected:
                    pass
        except DeviceRejected:
            pass
        got = []
        for bid in ids:
            try:
                got.extend(await self.source.fetch_by_ids([bid]))
            except DeviceRejected:
                results[bid] = "unavailable"
        return got

    # ------------------------------------------------------------ hand-out

    async def hand_out(self, master: str, slaves: list[str], number: int, size_bits: int) -> list[HandOut]:
        """Keys for a master SAE at this node and slave SAEs at the peer node, durable at both.
        Requests that arrive while earlier ones are under way wait and go together: at the master
        end one vault operation and one push for all of them, at the other end one `allocate`
        call to the master node and one vault operation (docs/performance.md)."""
        combo = (master, tuple(sorted(slaves)), size_bits)
        self._demand[combo] = self._demand.get(combo, 0) + number
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((master, slaves, number, size_bits, fut))
        self._start_batches()
        handouts = await fut
        self.consumed_bits += number * size_bits
        return handouts

    def _start_batches(self) -> None:
        # A batch takes the requests waiting when its task first runs, not when it is created: the
        # requests parsed in the same turn of the event loop then go together, instead of the first
        # of them filling a batch alone (one vault operation and one push for one request).
        if self._waiting and self._batch_starting is None and self._in_flight < MAX_BATCHES_IN_FLIGHT:
            self._in_flight += 1
            task = self._batch_starting = asyncio.create_task(self._hand_out_batch())
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task) -> None:
        self._batch_tasks.discard(task)
        if self._batch_starting is task:  # cancelled before it ran
            self._batch_starting = None
        self._in_flight -= 1
        self._start_batches()

    async def _hand_out_batch(self) -> None:
        self._batch_starting = None
        n, keys = 0, 0
        for _, _, number, _, _ in self._waiting[:MAX_BATCH]:
            if n and keys + number > MAX_BATCH_KEYS:
                break
            n, keys = n + 1, keys + number
        batch, self._waiting = self._waiting[:n], self._waiting[n:]
        self._start_batches()  # more than one batch waiting
        if batch:
            await (self._cut_batch(batch) if self.cfg.is_master else self._allocate_batch(batch))

    async def _cut_batch(self, batch: list[tuple]) -> None:
        """Master end: cut keys for several requests in one vault operation (with their outbox
        rows), push them to the peer in one call, and answer each request. A request the pool
        cannot cover fails alone (PoolExhausted); one the peer refuses fails alone; if the push
        fails, every request of the batch fails and none of their keys is handed out."""
        stocked: list[tuple] = []
        try:
            stocked, batch = self._take_stock(batch)
            calls = []
            for master, slaves, number, size_bits, _ in batch:
                message = {"master": master, "slaves": slaves, "size": size_bits}
                calls.append((new_key_ids(number), size_bits // 8, master, slaves, False, message))
            # The outbox entries of the batches the peer has taken go in this batch's transaction:
            # a few dozen rows each time, not thousands at once from the outbox loop (a writer
            # stall of ~20 ms every second under load: docs/performance.md).
            confirmed, self._confirmed = self._confirmed, []
            # Keys from the stock and keys cut now: submitted in one turn, so one commit for both.
            work = [self.vault.run(self.vault.carve_batch, self.cfg.id, calls, confirmed)] if calls else []
            if stocked:
                work.append(self._issue_stock(stocked))
            try:
                done = await asyncio.gather(*work)
                carved = done[0] if calls else []
            except BaseException:
                self._confirmed[:0] = confirmed
                raise
            pushed = []  # (request, its hand-outs, its push message)
            for (master, slaves, number, size_bits, fut), (handouts, exc) in zip(batch, carved):
                if exc is not None:
                    if not fut.done():
                        fut.set_exception(exc)
                    continue
                push = {"master": master, "slaves": slaves, "size": size_bits,
                        "keys": [{"key_ID": h.key_ID, "ranges": h.ranges} for h in handouts]}
                pushed.append((fut, handouts, push))
            if not pushed:
                return
            refused = await self._push(pushed)
            discard = [h.key_ID for i, (_, handouts, _) in enumerate(pushed) if i in refused for h in handouts]
            if discard:
                await self.vault.run(self.vault.outbox_to_discard, discard)
            await self.refresh_gauge()
            for i, (fut, handouts, _) in enumerate(pushed):
                if i in refused:
                    exc = PeerUnavailable(f"peer node {self.cfg.peer} could not take the keys ({refused[i]}); "
                                          "none were handed out")
                    if not fut.done():
                        fut.set_exception(exc)
                    continue
                self._confirmed.extend(h.key_ID for h in handouts)
                if not fut.done():
                    fut.set_result(handouts)
        except BaseException as exc:  # anything else: no request of the batch may wait for ever
            for *_, fut in (*batch, *(r for r, _ in stocked)):
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else PeerUnavailable("stopping"))
            if not isinstance(exc, Exception):
                raise

    async def _push(self, pushed: list[tuple]) -> dict[int, Exception]:
        """Send the cut keys of several requests to the peer; returns the ones it did not take."""
        results = await self._batch_call("keys", [p for _, _, p in pushed])
        return {i: r if isinstance(r, Exception) else PeerRejected(f"peer node {self.cfg.peer}: stored no keys")
                for i, r in enumerate(results) if not (isinstance(r, dict) and "stored" in r)}

    async def _allocate_batch(self, batch: list[tuple]) -> None:
        """The link's other end: requests its stock covers are answered from it; for the others
        the master node cuts the keys in one call (`allocate`; it keeps the bits for its slave
        SAEs), they are cut here in one vault operation, and each request is answered. A request
        the master node cannot serve fails alone (PoolExhausted when it has too little key); keys
        this end cannot cut are discarded at both ends."""
        stocked, batch = self._take_stock(batch)
        await asyncio.gather(*([self._issue_stock(stocked)] if stocked else ()),
                             *([self._allocate(batch)] if batch else ()))

    def _allocated(self, answer: dict | Exception, number: int) -> tuple[list[dict], list[str], list]:
        """The keys the master node cut for an `allocate` of `number` keys: the answer's items,
        their key_IDs and ranges (the refusal is raised; a malformed answer is PeerRejected)."""
        if isinstance(answer, Exception):
            raise answer
        try:
            items = field(answer, "keys", list)
            key_ids = [field(i, "key_ID", str) if isinstance(i, dict) else "" for i in items]
            ranges = [ranges_of(i) for i in items]
        except BadMessage as exc:
            raise PeerRejected(f"peer node {self.cfg.peer}: allocate answered: {exc}") from None
        if len(key_ids) != number:
            raise PeerRejected(f"peer node {self.cfg.peer} allocated {len(key_ids)} keys, asked {number}")
        return items, key_ids, ranges

    async def _allocate(self, batch: list[tuple]) -> None:
        try:
            answers = await self._batch_call("allocate", [{"master": m, "slaves": s, "number": n, "size": size}
                                                          for m, s, n, size, _ in batch])
            calls, asked = [], []
            for (master, slaves, number, size_bits, fut), answer in zip(batch, answers):
                try:
                    items, key_ids, ranges = self._allocated(answer, number)
                except QkdnodeError as exc:
                    fut.set_exception(exc)
                    continue
                calls.append((key_ids, ranges, size_bits // 8, master, slaves, False))
                asked.append((fut, items))
            if not calls:
                return
            cut = await self.vault.run(self.vault.apply_carve_batch, self.cfg.id, calls)
            undone = []
            for (fut, items), (handouts, exc) in zip(asked, cut):
                if exc is None and len(handouts) != len(items):  # key IDs this node has seen before
                    exc = CarveConflict(f"link {self.cfg.id}: the peer allocated key IDs already known here")
                elif isinstance(exc, CarveConflict):
                    undone.extend(items)
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(handouts)
            if undone:
                self._in_background(self._discard_at_peer(undone, "the other end could not cut these keys"))
            await self.refresh_gauge()
        except BaseException as exc:  # anything else: no request of the batch may wait for ever
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else PeerUnavailable("stopping"))
            if not isinstance(exc, Exception):
                raise

    async def _batch_call(self, verb: str, messages: list[dict]) -> list[dict | Exception]:
        """Several messages of one kind to the peer in one call (`{"batch": [...]}`, answered
        `{"results": [...]}`, one each); a lone message goes as itself. Each message gets its
        answer, or the exception that refused it (PoolExhausted if the peer had too little key)."""
        refusals = (PeerUnavailable, PeerRejected, PoolExhausted)
        if len(messages) == 1:
            try:
                return [await self.peer.call(self.cfg.id, verb, messages[0])]
            except refusals as exc:
                return [exc]
        try:
            answer = await self.peer.call(self.cfg.id, verb, {"batch": messages})
        except PeerRejected as exc:
            if exc.answer.get("message", "").startswith("field 'master'"):  # a peer without batches
                return [(await self._batch_call(verb, [m]))[0] for m in messages]
            return [exc] * len(messages)
        except refusals as exc:
            return [exc] * len(messages)
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != len(messages):
            return [PeerRejected(f"peer node {self.cfg.peer}: a batch of {len(messages)} {verb} messages answered "
                                 "without one result each")] * len(messages)
        out: list[dict | Exception] = []
        for r in results:
            if not isinstance(r, dict) or "error" in r:
                error = r.get("error") if isinstance(r, dict) else r
                out.append((PoolExhausted if isinstance(r, dict) and r.get("exhausted") is True else PeerRejected)(
                    f"peer node {self.cfg.peer}: {error}"))
            else:
                out.append(r)
        return out

    # ------------------------------------------------------------ the stock (either end)

    def stock_bits_for(self, master: str, slaves: list[str]) -> int:
        """Key in the ready stock for this master SAE and these slave SAEs, any key size (ETSI 014
        status counts it as stored key of the pair: it was taken from the pool for them)."""
        pair = (master, tuple(sorted(slaves)))
        return sum(len(ready) * size for (m, s, size), ready in self._stock.items() if (m, s) == pair)

    def _take_stock(self, batch: list[tuple]) -> tuple[list[tuple], list[tuple]]:
        """Split a batch: requests the ready stock covers (each with the stock entries it takes:
        chunk ID, index, key_ID, created) and the others, which are cut now."""
        stocked, fresh = [], []
        for request in batch:
            master, slaves, number, size_bits, _ = request
            combo = (master, tuple(sorted(slaves)), size_bits)
            ready = self._stock.get(combo)
            if ready is not None and len(ready) >= number:
                stocked.append((request, [ready.popleft() for _ in range(number)]))
                if len(ready) < self._stock_target.get(combo, 0) // 2:
                    self._stock_wake.set()
            else:
                fresh.append(request)
        return stocked, fresh

    async def _issue_stock(self, stocked: list[tuple]) -> None:
        """Hand stock keys to the requests they were taken for: durable here (the peer has them
        already). Answers every request itself, and raises nothing."""
        calls = [([k[:3] for k in keys], master, sorted(slaves), size_bits)
                 for (master, slaves, _, size_bits, _), keys in stocked]
        try:
            results = await self.vault.run(self.vault.issue_stock, self.cfg.id, calls)
        except BaseException as exc:  # nothing was issued: the keys stay in the stock
            for (master, slaves, _, size_bits, fut), keys in stocked:
                self._stock.setdefault((master, tuple(sorted(slaves)), size_bits), collections.deque()).extendleft(
                    reversed(keys))
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else PeerUnavailable("stopping"))
            if not isinstance(exc, Exception):
                raise
            return
        for ((*_, fut), _), (handouts, exc) in zip(stocked, results):
            if exc is not None:  # the vault and this list disagree: never expected; the request gets 503
                log.error("link %s: %s", self.cfg.id, exc)
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(handouts)

    async def _load_stock(self) -> None:
        """At start: ready stock serves again; stock whose push was not confirmed is discarded at
        both ends (the peer may or may not have stored it)."""
        unconfirmed = []
        for chunk_id, master, slaves, size_bits, state, created, keys in await self.vault.run(self.vault.stock_rows,
                                                                                             self.cfg.id):
            if state == "ready":
                self._stock.setdefault((master, tuple(slaves), size_bits), collections.deque()).extend(
                    (chunk_id, i, key_id, created) for i, key_id in keys)
            else:
                unconfirmed.append(chunk_id)
        if unconfirmed:
            n = await self.vault.run(self.vault.stock_discard, self.cfg.id, unconfirmed,
                                     "stock push unconfirmed at stop")
            log.info("link %s: %d stock key(s) pushed without confirmation before the stop: discarded at both ends",
                     self.cfg.id, n)

    async def _stock_loop(self) -> None:
        last = time.monotonic()

        async def wake() -> None:  # a hand-out took the stock below half its target, or a second passed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stock_wake.wait(), STOCK_PLAN_EVERY)
            self._stock_wake.clear()

        async def step() -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= STOCK_PLAN_EVERY:
                self._plan_stock(now - last, now)
                last = now
                await self._expire_stock()
            await self._refill_stock()

        await self._keep_going("stock", wake, step)

    async def _keep_going(self, what: str, wait, step) -> None:
        """A background loop of the link: `wait`, then `step`, for ever; a failure is logged once
        per outage, not once a round, and the loop goes on."""
        failing = False
        while True:
            await wait()
            try:
                await step()
                if failing:
                    log.info("link %s: %s works again", self.cfg.id, what)
                failing = False
            except asyncio.CancelledError:
                raise
            except QkdnodeError as exc:
                (log.debug if failing else log.warning)("link %s: %s: %s", self.cfg.id, what, exc)
                failing = True
            except Exception:
                log.exception("link %s: unexpected failure in the %s loop", self.cfg.id, what)

    def _plan_stock(self, elapsed: float, now: float) -> None:
        """How many keys to keep in stock for each (master, slaves, size), from what it asked for."""
        for combo, n in self._demand.items():
            rate = n / elapsed
            if rate >= STOCK_MIN_RATE:
                self._stock_target[combo] = min(STOCK_MAX_KEYS, max(STOCK_MIN_KEYS, int(rate * STOCK_SECONDS)))
                self._demand_seen[combo] = now
        self._demand.clear()
        for combo in [c for c, seen in self._demand_seen.items() if now - seen > STOCK_IDLE_AFTER]:
            del self._stock_target[combo], self._demand_seen[combo]

    async def _refill_stock(self) -> None:
        for combo, target in list(self._stock_target.items()):
            ready = self._stock.setdefault(combo, collections.deque())
            if len(ready) >= target // 2:
                continue
            while len(ready) < target and self._stock_target.get(combo) == target:
                await self.refresh_gauge()
                n = min(target - len(ready), STOCK_PUSH_KEYS, self.ready_bits // STOCK_POOL_SHARE // combo[2])
                if n < 1 or not await self._stock_up(combo, n):
                    break

    async def _stock_up(self, combo: tuple, n: int) -> bool:
        """Put n keys agreed with the peer into the stock; ready once both ends hold them. At the
        master end they are cut here and pushed to the peer; at the other end the master node
        cuts them (`allocate`; it keeps the bits for its slave SAEs) and they are cut here the
        same. Until ready, a chunk is `pushing` (a stop then leaves it to the next start, which
        discards it at both ends)."""
        master, slaves, size_bits = combo
        if self.cfg.is_master:
            ((handouts, exc),) = await self.vault.run(self.vault.carve_batch, self.cfg.id,
                                                      [(new_key_ids(n), size_bits // 8, master, list(slaves), STOCK,
                                                        None)])
            if exc is not None:  # PoolExhausted: the pool has just been drawn down; try again later
                return False
            push = {"master": master, "slaves": list(slaves), "size": size_bits,
                    "keys": [{"key_ID": h.key_ID, "ranges": h.ranges} for h in handouts]}
            try:
                await self.peer.call(self.cfg.id, "keys", push)
            except QkdnodeError as exc:
                await self.vault.run(self.vault.stock_discard, self.cfg.id, [handouts[0].key_ID], "stock push failed")
                log.warning("link %s: stock push of %d key(s) failed: %s", self.cfg.id, n, exc)
                return False
        else:
            (answer,) = await self._batch_call("allocate", [{"master": master, "slaves": list(slaves), "number": n,
                                                             "size": size_bits}])
            try:
                items, key_ids, ranges = self._allocated(answer, n)
            except PoolExhausted:  # the master node's pool has just been drawn down; try again later
                return False
            except QkdnodeError as exc:
                log.warning("link %s: stock allocation of %d key(s) failed: %s", self.cfg.id, n, exc)
                return False
            try:
                handouts = await self.vault.run(self.vault.apply_carve, self.cfg.id, key_ids, ranges, size_bits // 8,
                                                master, list(slaves), STOCK)
            except CarveConflict:
                self._in_background(self._discard_at_peer(items, "the other end could not cut these keys"))
                return False
            if len(handouts) != n:  # key IDs this node has seen before: not stock to rely on
                if handouts:
                    await self.vault.run(self.vault.stock_discard, self.cfg.id, [handouts[0].key_ID],
                                         "the peer allocated key IDs already known here")
                return False
        key_ids = [h.key_ID for h in handouts]
        chunk = key_ids[0]
        await self.vault.run(self.vault.stock_ready, self.cfg.id, [chunk])
        now = time.time()
        self._stock.setdefault(combo, collections.deque()).extend((chunk, i, k, now) for i, k in enumerate(key_ids))
        return True

    async def _expire_stock(self) -> None:
        cutoff, old = time.time() - STOCK_MAX_AGE, set()
        for ready in self._stock.values():
            while ready and ready[0][3] < cutoff:  # a chunk's keys are next to each other
                old.add(ready.popleft()[0])
        if old:
            await self.vault.run(self.vault.stock_discard, self.cfg.id, sorted(old),
                                 f"stock older than {STOCK_MAX_AGE:.0f} s")

    async def _discard_at_peer(self, items: list[dict], reason: str) -> None:
        try:
            await self.peer.call(self.cfg.id, "discard", {"keys": items, "reason": reason})
        except QkdnodeError as exc:
            log.warning("link %s: could not ask the peer to discard %d key(s): %s", self.cfg.id, len(items), exc)

    async def on_allocate(self, body: dict) -> dict:
        """The peer's SAE is the master; our SAEs are the slaves and get the bits from us. A body
        with `batch` carries several requests (the peer's SAEs asking at once): one vault
        operation for all, each answered in `results` ({"keys": [...]} or {"error": ...})."""
        if not self.cfg.is_master:
            raise BadMessage(f"node {self.node_id} is not the master end of link {self.cfg.id}")

        def parse(m: dict) -> tuple:
            master, slaves = self._parties(m)
            number, size = field(m, "number", int), field(m, "size", int)
            if number < 1 or size < 8 or size % 8:
                raise BadMessage("number >= 1 and size a positive multiple of 8 expected")
            return new_key_ids(number), size // 8, master, slaves, True

        def answer(call: tuple, handouts: list[HandOut]) -> dict:
            self.consumed_bits += len(handouts) * call[1] * 8
            return {"keys": [{"key_ID": h.key_ID, "ranges": h.ranges} for h in handouts]}

        return await self._messages(body, parse, self.vault.carve_batch, answer)

    async def on_keys(self, body: dict) -> dict:
        """The link's master node cut keys for its SAE; keep the same bits for our slave SAEs.
        A body with `batch` carries several such messages: each is checked and stored on its own
        (one vault operation for all), and answered in `results` ({"stored": n} or {"error": ...})."""
        if self.cfg.is_master:
            raise BadMessage(f"node {self.node_id} is the master end of link {self.cfg.id}; it cuts its own keys")

        def parse(m: dict) -> tuple:
            (master, slaves), size = self._parties(m), field(m, "size", int)
            items = field(m, "keys", list)
            if size < 8 or size % 8:
                raise BadMessage("size must be a positive multiple of 8")
            key_ids = [field(k, "key_ID", str) if isinstance(k, dict) else "" for k in items]
            return key_ids, [ranges_of(k) for k in items], size // 8, master, slaves, True

        def answer(call: tuple, stored: list[HandOut]) -> dict:
            self.consumed_bits += len(stored) * call[2] * 8
            return {"stored": len(stored)}

        return await self._messages(body, parse, self.vault.apply_carve_batch, answer)

    async def _messages(self, body: dict, parse, op, answer) -> dict:
        """A peer message, or several (`batch`): each checked by `parse` into the arguments of one
        call of the vault operation `op` (a BadMessage refuses that message alone), all of them in
        one operation, each answered by `answer`. A lone message that fails raises, as it did
        before batches; in a batch the failure is that message's result (`exhausted` when the
        pool had too little key)."""
        batch = "batch" in body
        messages = field(body, "batch", list) if batch else [body]
        results: list[dict | None] = [None] * len(messages)
        calls, at = [], []
        for i, m in enumerate(messages):
            try:
                if not isinstance(m, dict):
                    raise BadMessage("each message of a batch is an object")
                calls.append(parse(m))
                at.append(i)
            except BadMessage as exc:
                if not batch:
                    raise
                results[i] = {"error": str(exc)}
        if calls:
            done = await self.vault.run(op, self.cfg.id, calls)
            for i, call, (out, exc) in zip(at, calls, done):
                if exc is None:
                    results[i] = answer(call, out)
                elif not batch:
                    raise exc
                else:
                    if not isinstance(exc, PoolExhausted):
                        log.error("link %s: %s", self.cfg.id, exc)
                    results[i] = {"error": str(exc), "exhausted": isinstance(exc, PoolExhausted)}
        await self.refresh_gauge()
        return {"results": results} if batch else results[0]

    async def on_discard(self, body: dict) -> dict:
        reason = str(body.get("reason", "hand-out failed"))[:200]
        items = field(body, "keys", list)
        discards = [(field(item, "key_ID", str) if isinstance(item, dict) else "", ranges_of(item)) for item in items]
        # Submitted together: one group commit for them all (a discarded stock may be thousands of keys).
        await asyncio.gather(*(self.vault.run(self.vault.discard_key, self.cfg.id, key_id, ranges, reason)
                               for key_id, ranges in discards))
        await self.refresh_gauge()
        return {"discarded": len(items)}

    def _parties(self, body: dict) -> tuple[str, list[str]]:
        """The master SAE (at the peer node) and the slave SAEs (at this node) of a peer message."""
        master, slaves = field(body, "master", str), field(body, "slaves", list)
        if not slaves or not all(isinstance(s, str) for s in slaves):
            raise BadMessage("slaves must be a non-empty array of SAE IDs")
        if self.saes.get(master) != self.cfg.peer:
            raise BadMessage(f"SAE {master!r} is not attached to node {self.cfg.peer}")
        strangers = [s for s in slaves if self.saes.get(s) != self.node_id]
        if strangers:
            raise BadMessage(f"SAE(s) {strangers} are not attached to node {self.node_id}")
        return master, slaves

    # ------------------------------------------------------------ outbox: pushes the peer must see

    async def _outbox_loop(self) -> None:
        await self._keep_going("outbox", lambda: asyncio.sleep(1.0), self.flush_outbox)

    async def flush_outbox(self, min_age: float = OUTBOX_RETRY_AFTER) -> None:
        """Forget acknowledged pushes; send again those a crash or an outage left unconfirmed."""
        done, self._confirmed = self._confirmed, []
        if done:
            await self.vault.run(self.vault.outbox_done, done)
        items = await self.vault.run(self.vault.outbox_items, self.cfg.id)
        now = time.time()
        discards: dict[str, list[dict]] = {}  # by the reason the peer records
        for key_id, kind, msg, created in items:
            if kind == "keys" and (now - created < min_age or key_id in self._confirmed):
                continue  # probably still in flight on the request's own path
            item = {"key_ID": key_id, "ranges": msg["ranges"]}
            if kind == "keys":
                await self.peer.call(self.cfg.id, "keys", {**msg, "keys": [item]})
                await self.vault.run(self.vault.outbox_done, [key_id])
            else:
                discards.setdefault(msg.get("reason", "hand-out failed"), []).append(item)
        for reason, group in discards.items():
            for i in range(0, len(group), OUTBOX_DISCARDS_PER_CALL):
                chunk = group[i:i + OUTBOX_DISCARDS_PER_CALL]
                await self.peer.call(self.cfg.id, "discard", {"keys": chunk, "reason": reason})
                await self.vault.run(self.vault.outbox_done, [item["key_ID"] for item in chunk])
