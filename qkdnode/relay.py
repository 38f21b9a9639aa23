"""Keys for any pair of SAEs: direct links, trusted-node relay and routing (docs/relay.md).

A key for SAEs on a node this node shares a link with is a plain hand-out of that link's pool.
A key for SAEs further away travels hop by hop. At each hop X -> Y, X takes a fresh piece of
the X-Y link key (a hand-out between the pseudo-SAEs `node:X` and `node:Y`, durable at both
ends like any other) of `n + 32` bytes for `n` bytes of keys: the first `n` bytes are the
one-time pad, the last 32 the Wegman-Carter hash key and tag pad. Only the ciphertext and the
tag cross the classical network; Y checks the tag before it decrypts, stores or forwards
anything. At the first hop the keys are the pad itself (nothing to encrypt: the origin and the
first hop already share them), so every relayed bit is true link key, and the message still
carries a tag over its header so that nobody can redirect the keys.

Routes: a static route from the config if it has key, otherwise the cheapest path over the
link-state database that every node keeps from the adverts its neighbours send each second
(`lsa` on the peer channel): each link's ready key and measured key rate at both ends. A
failed hop (node down, link exhausted) reports which link failed; the origin routes around it
and tries again, so a request is lost only when no path with key is left.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import json
import logging
import time
import uuid
from dataclasses import dataclass, field as dc_field
from typing import TYPE_CHECKING, Any

from qkdnode import native
from qkdnode.errors import (
    CarveConflict,
    NoRoute,
    NotYourKey,
    PeerRejected,
    PeerUnavailable,
    PoolExhausted,
    QkdnodeError,
    RelayFailed,
    RelayRejected,
    UnknownKey,
)
from qkdnode.peer import BadMessage, field
from qkdnode.vault import HandOut

if TYPE_CHECKING:
    from qkdnode.links import LinkPool
    from qkdnode.node import Node

log = logging.getLogger("qkdnode.relay")

AUTH_BYTES = native.WC_KEY_BYTES + native.WC_TAG_BYTES  # hash key + tag pad, fresh for each message
LSA_PERIOD = 1.0      # seconds between adverts to each neighbour
LSA_MAX_AGE = 5.0     # an origin not heard of for this long is taken as down
MAX_ATTEMPTS = 4      # paths tried for one request before giving up
HOP_TIMEOUT = 20.0


def node_sae(node_id: str) -> str:
    """The pseudo-SAE that stands for a node in hand-outs of relay key (':' is not allowed in SAE IDs)."""
    return f"node:{node_id}"


@dataclass
class Advert:
    seq: int
    heard: float                    # time.monotonic() when this seq first arrived
    links: dict[str, dict[str, Any]] = dc_field(default_factory=dict)  # peer -> ready_bits, rate_bps, up


def link_cost(ready_bits: int, rate_bps: float) -> float:
    """A hop costs 1, more when its pool runs low or its key comes slowly (documented in docs/relay.md)."""
    return 1.0 + 65536.0 / (ready_bits + 1) + 10.0 / (1.0 + rate_bps / 10_000.0)


class Router:
    def __init__(self, node: "Node"):
        self.node = node
        self.me = node.cfg.node_id
        self.metrics = node.metrics
        self._direct_keys: dict[str, object] = {}  # route_keys children of direct hand-outs, looked up once
        self.lsdb: dict[str, Advert] = {}
        self._seq = time.time_ns()
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._advertise_loop(), name="link-state adverts"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # ------------------------------------------------------------ link state

    def _own_links(self) -> dict[str, dict[str, Any]]:
        out = {}
        for pool in self.node.pools.values():
            out[pool.cfg.peer] = {"ready_bits": pool.ready_bits, "rate_bps": round(pool.ingest_bps, 1),
                                  "up": self.node.peers[pool.cfg.peer].up is not False}
        return out

    async def _advertise_loop(self) -> None:
        while True:
            try:
                await self.advertise()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("link-state adverts failed")
            await asyncio.sleep(LSA_PERIOD)

    async def advertise(self) -> None:
        """Send every fresh advert we know (our own, renewed) to each neighbour."""
        self._seq = max(self._seq + 1, time.time_ns())
        self.lsdb[self.me] = Advert(self._seq, time.monotonic(), self._own_links())
        now = time.monotonic()
        adverts = [{"origin": o, "seq": a.seq, "links": a.links} for o, a in self.lsdb.items()
                   if now - a.heard < LSA_MAX_AGE]

        async def send(pool: "LinkPool") -> None:
            try:
                await self.node.peers[pool.cfg.peer].call(pool.cfg.id, "lsa", {"adverts": adverts}, timeout=2.0)
            except QkdnodeError:
                pass  # the peer's `up` flag now says so; the next advert carries it

        await asyncio.gather(*(send(p) for p in self.node.pools.values()))

    async def on_lsa(self, pool: "LinkPool", body: dict) -> dict:
        adverts = field(body, "adverts", list)
        now = time.monotonic()
        for a in adverts[:1000]:
            if not isinstance(a, dict):
                raise BadMessage("each advert is an object")
            origin, seq, links = field(a, "origin", str), field(a, "seq", int), field(a, "links", dict)
            if origin == self.me:
                continue
            known = self.lsdb.get(origin)
            if known is None or seq > known.seq:
                clean = {}
                for peer, link in list(links.items())[:256]:
                    if isinstance(link, dict):
                        ready, rate = link.get("ready_bits"), link.get("rate_bps")
                        clean[str(peer)] = {"ready_bits": ready if isinstance(ready, int) else 0,
                                            "rate_bps": float(rate) if isinstance(rate, (int, float)) else 0.0,
                                            "up": link.get("up") is True}
                self.lsdb[origin] = Advert(seq, now, clean)
        return {"known": len(self.lsdb)}

    def graph(self, need_bits: int, exclude: set[tuple[str, str]] = frozenset()) -> dict[str, dict[str, float]]:
        """Usable links and their costs: both ends have advertised lately (both nodes live), one
        of them at least reached the other on its last call, the link holds at least `need_bits`
        of ready key at both ends, and it has not failed this request."""
        now = time.monotonic()
        fresh = {o: a.links for o, a in self.lsdb.items() if now - a.heard < LSA_MAX_AGE}
        fresh[self.me] = self._own_links()
        g: dict[str, dict[str, float]] = {}
        for x, links in fresh.items():
            for y, link in links.items():
                back = fresh.get(y, {}).get(x)
                if back is None or not (link["up"] or back["up"]):
                    continue
                if (x, y) in exclude or (y, x) in exclude:
                    continue
                ready = min(link["ready_bits"], back["ready_bits"])
                if ready < need_bits:
                    continue
                # Both ends measure the agreed key; one that has not seen any yet reports 0.
                g.setdefault(x, {})[y] = link_cost(ready, max(link["rate_bps"], back["rate_bps"]))
        return g

    def route(self, dest: str, need_bits: int, exclude: set[tuple[str, str]] = frozenset()) -> list[str] | None:
        """The path [this node, ..., dest]: the static route if all its links are usable, else the cheapest."""
        g = self.graph(need_bits, exclude)
        static = self.node.cfg.routes.get(dest)
        if static:
            path = [self.me, *static]
            if all(b in g.get(a, {}) for a, b in zip(path, path[1:])):
                return path
        dist, prev, heap = {self.me: 0.0}, {}, [(0.0, self.me)]
        while heap:
            d, x = heapq.heappop(heap)
            if x == dest:
                path = [dest]
                while path[-1] != self.me:
                    path.append(prev[path[-1]])
                return path[::-1]
            if d > dist.get(x, float("inf")):
                continue
            for y, c in g.get(x, {}).items():
                if d + c < dist.get(y, float("inf")):
                    dist[y], prev[y] = d + c, x
                    heapq.heappush(heap, (d + c, y))
        return None

    def ready_bits_to(self, dest: str) -> tuple[int, int]:
        """(ready bits on the best path to dest, the first hop's pool target) for ETSI 014 status."""
        pool = self.node.pool_to(dest)
        if pool is not None:
            return pool.ready_bits, pool.cfg.pool_target_bits
        path = self.route(dest, 1)
        if path is None:
            return 0, 0
        links = {o: a.links for o, a in self.lsdb.items()}
        links[self.me] = self._own_links()
        # Each relayed bit takes one bit of pad per hop: the path's poorest link bounds it.
        ready = min(links.get(a, {}).get(b, {}).get("ready_bits", 0) for a, b in zip(path, path[1:]))
        first = self.node.pool_to(path[1])
        return ready, first.cfg.pool_target_bits if first else 0

    # ------------------------------------------------------------ hand-out for any SAE pair

    async def hand_out(self, master: str, slaves: list[str], number: int, size_bits: int) -> list[HandOut]:
        """Keys for `master` (at this node) shared with `slaves` (on one or more other nodes)."""
        groups: dict[str, list[str]] = {}
        for s in slaves:
            groups.setdefault(self.node.cfg.saes[s], []).append(s)
        (first_node, first_slaves), *others = groups.items()
        handouts = await self._new_keys(master, first_node, first_slaves, number, size_bits)
        for dest, group in others:
            await self._send_known(handouts, master, dest, group, size_bits)
        return handouts

    async def _new_keys(self, master: str, dest: str, slaves: list[str], number: int, size: int) -> list[HandOut]:
        pool = self.node.pool_to(dest)
        exclude: set[tuple[str, str]] = set()
        if pool is not None:
            try:
                handouts = await pool.hand_out(master, slaves, number, size)
                counter = self._direct_keys.get(dest)
                if counter is None:
                    counter = self._direct_keys[dest] = self.metrics.route_keys.labels(dest, f"{self.me}>{dest}")
                counter.inc(number)
                return handouts
            except (PoolExhausted, PeerUnavailable) as exc:
                log.info("link %s cannot serve this request (%s); trying relay paths", pool.cfg.id, exc)
                exclude.add((self.me, dest))
                last: QkdnodeError = exc
        else:
            last = NoRoute(f"no path with {number * size} bits of key from node {self.me} to node {dest}")
        return await self._over_paths(dest, number * size, exclude, last,
                                      lambda path: self._forward(path, master, slaves, size, number, None))

    async def _send_known(self, handouts: list[HandOut], master: str, dest: str, slaves: list[str],
                          size: int) -> None:
        keys = [(h.key_ID, h.bits) for h in handouts]
        await self._over_paths(dest, len(keys) * size, set(), NoRoute(f"no path with key to node {dest}"),
                               lambda path: self._forward(path, master, slaves, size, len(keys), keys))

    async def _over_paths(self, dest: str, need_bits: int, exclude: set[tuple[str, str]], last: QkdnodeError, send):
        for _ in range(MAX_ATTEMPTS):
            path = self.route(dest, need_bits + 8 * AUTH_BYTES, exclude)
            if path is None:
                break
            try:
                return await send(path)
            except RelayFailed as exc:
                log.warning("relay to node %s over %s failed at link %s-%s: %s", dest, ">".join(path), *exc.link,
                            exc)
                exclude.add(exc.link)
                last = exc
        if isinstance(last, (PoolExhausted, NoRoute)) or getattr(last, "exhausted", False):
            raise NoRoute(f"no path from node {self.me} to node {dest} has {need_bits} bits of key left "
                          f"({last})")
        raise PeerUnavailable(f"no path from node {self.me} to node {dest} could take the keys ({last})")

    # ------------------------------------------------------------ one hop

    async def _forward(self, path: list[str], master: str, slaves: list[str], size: int, number: int,
                       keys: list[tuple[str, bytes]] | None, relay_id: str | None = None) -> list[HandOut]:
        """Send keys from this node to the next node of `path`. With `keys` None this node is the
        origin and the keys are the pad itself (fresh key IDs); returns them as hand-outs."""
        i = path.index(self.me)
        nxt = path[i + 1]
        pool = self.node.pool_to(nxt)
        n = number * size // 8
        if pool is None:
            raise RelayFailed(f"node {self.me} has no link to node {nxt}", (self.me, nxt))
        try:
            (pad_h,) = await pool.hand_out(node_sae(self.me), [node_sae(nxt)], 1, (n + AUTH_BYTES) * 8)
        except (PoolExhausted, PeerUnavailable, PeerRejected, CarveConflict) as exc:
            raise RelayFailed(f"link {pool.cfg.id}: {exc}", (self.me, nxt),
                              exhausted=isinstance(exc, PoolExhausted)) from None
        pad = pad_h.bits
        if keys is None:
            data = pad[:n]
            keys = [(str(uuid.uuid4()), data[j * (size // 8):(j + 1) * (size // 8)]) for j in range(number)]
            ciphertext = b""
        else:
            data = b"".join(bits for _, bits in keys)
            ciphertext = native.otp_encrypt(pad[:n], data)
        header = {"relay_ID": relay_id or str(uuid.uuid4()), "path": path, "master": master, "slaves": slaves,
                  "size": size, "key_IDs": [k for k, _ in keys], "pad_key_ID": pad_h.key_ID,
                  "key_from_pad": not ciphertext}
        tag = native.wc_tag(pad[n:n + native.WC_KEY_BYTES], pad[n + native.WC_KEY_BYTES:], _signed(header, ciphertext))
        body = dict(header, ciphertext=base64.b64encode(ciphertext).decode(), tag=tag.hex())
        self.metrics.relay_link_bits.labels(pool.cfg.id, "pad").inc(n * 8)
        self.metrics.relay_link_bits.labels(pool.cfg.id, "tag").inc(AUTH_BYTES * 8)
        try:
            await self.node.peers[nxt].call(pool.cfg.id, "relay", body, timeout=HOP_TIMEOUT * (len(path) - 1 - i))
        except PeerRejected as exc:
            failed = exc.answer.get("failed_link")
            if isinstance(failed, list) and len(failed) == 2 and all(isinstance(x, str) for x in failed):
                raise RelayFailed(str(exc), (failed[0], failed[1]), exhausted=exc.answer.get("exhausted") is True)
            raise RelayFailed(str(exc), (self.me, nxt)) from None
        except (PeerUnavailable, PoolExhausted) as exc:
            raise RelayFailed(str(exc), (self.me, nxt)) from None
        self.metrics.relay_messages.labels("sent").inc()
        if i == 0:
            self.metrics.route_keys.labels(path[-1], ">".join(path)).inc(number)
            await self.node.vault.run(self.node.vault.record_issued, [k for k, _ in keys], master, slaves, size,
                                      "relay:" + ">".join(path))
        return [HandOut(k, [], bits) for k, bits in keys]

    async def on_relay(self, pool: "LinkPool", body: dict) -> dict:
        """A relay message from the node at the other end of `pool`'s link."""
        try:
            return await self._on_relay(pool, body)
        except RelayRejected as exc:
            self.metrics.relay_rejected.labels(exc.reason).inc()
            log.warning("relay message from node %s rejected: %s", pool.cfg.peer, exc)
            raise BadMessage(f"relay message rejected: {exc}") from None

    async def _on_relay(self, pool: "LinkPool", body: dict) -> dict:
        sender = pool.cfg.peer
        relay_id, path = field(body, "relay_ID", str), field(body, "path", list)
        master, slaves, size = field(body, "master", str), field(body, "slaves", list), field(body, "size", int)
        key_ids, pad_id = field(body, "key_IDs", list), field(body, "pad_key_ID", str)
        from_pad = body.get("key_from_pad")
        if not all(isinstance(x, str) for x in path + slaves + key_ids) or not isinstance(from_pad, bool):
            raise _rejected("malformed", "path, slaves and key_IDs are arrays of strings; key_from_pad a boolean")
        try:
            i = path.index(self.me)
        except ValueError:
            raise _rejected("malformed", f"the path {path} does not pass node {self.me}") from None
        if i == 0 or path[i - 1] != sender or len(set(path)) != len(path):
            raise _rejected("malformed", f"the path {path} does not come to node {self.me} from node {sender}")
        if size < 8 or size % 8 or not key_ids or len(set(key_ids)) != len(key_ids) or len(key_ids) > 100_000:
            raise _rejected("malformed", "size a positive multiple of 8 and distinct key_IDs expected")
        try:
            ciphertext = base64.b64decode(field(body, "ciphertext", str), validate=True)
            tag = bytes.fromhex(field(body, "tag", str))
        except ValueError:
            raise _rejected("malformed", "ciphertext is not base64 or tag is not hex") from None
        n = len(key_ids) * size // 8
        if (not from_pad and len(ciphertext) != n) or (from_pad and ciphertext):
            raise _rejected("malformed", f"ciphertext of {len(ciphertext)} bytes for {n} bytes of keys")
        header = {"relay_ID": relay_id, "path": path, "master": master, "slaves": slaves, "size": size,
                  "key_IDs": key_ids, "pad_key_ID": pad_id, "key_from_pad": from_pad}
        try:  # consumes the pad: a replayed message finds it gone
            ((_, pad),) = await self.node.vault.run(self.node.vault.deliver, node_sae(self.me), node_sae(sender),
                                                   [pad_id])
        except (UnknownKey, NotYourKey):
            raise _rejected("pad", f"pad {pad_id} is unknown or already used here (a replayed message?)") from None
        if len(pad) != n + AUTH_BYTES:
            raise _rejected("malformed", f"the pad has {len(pad)} bytes, the message needs {n + AUTH_BYTES}")
        if not native.wc_verify(pad[n:n + native.WC_KEY_BYTES], pad[n + native.WC_KEY_BYTES:],
                                _signed(header, ciphertext), tag):
            raise _rejected("tag", "the Wegman-Carter tag does not match (altered in flight?)")
        data = pad[:n] if from_pad else native.otp_decrypt(pad[:n], ciphertext)
        step = size // 8
        keys = [(k, data[j * step:(j + 1) * step]) for j, k in enumerate(key_ids)]
        self.metrics.relay_messages.labels("received").inc()
        dest = path[-1]
        if dest != self.me:
            await self._forward(path, master, slaves, size, len(keys), keys, relay_id)
            return {"forwarded": len(keys)}
        saes = self.node.cfg.saes
        if saes.get(master) != path[0]:
            raise _rejected("malformed", f"SAE {master!r} is not attached to node {path[0]}, the origin")
        strangers = [s for s in slaves if saes.get(s) != self.me]
        if not slaves or strangers:
            raise _rejected("malformed", f"SAE(s) {strangers} are not attached to node {self.me}")
        try:
            await self.node.vault.run(self.node.vault.store_relayed, "relay:" + ">".join(path), key_ids,
                                      [b for _, b in keys], master, slaves)
        except CarveConflict as exc:
            raise _rejected("replay", str(exc)) from None
        self.metrics.keys_relayed.inc(len(keys))
        return {"stored": len(keys)}


def _signed(header: dict, ciphertext: bytes) -> bytes:
    """What the tag covers: the canonical JSON of the header, a NUL, then the ciphertext."""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\0" + ciphertext


def _rejected(reason: str, message: str) -> RelayRejected:
    return RelayRejected(message, reason)
