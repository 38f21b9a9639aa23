"""Northbound ETSI GS QKD 004 (v2.1.1): key streams with a QoS, as JSON over HTTPS (docs/apis.md).

OPEN_CONNECT, GET_KEY and CLOSE are POSTs of JSON objects; the caller's SAE ID is its client
certificate's commonName, as on the ETSI 014 listener. The outcome of a call is the spec's
status code in an HTTP 200 answer; HTTP errors (400, 401) are kept for requests that cannot be
a call at all (malformed, unknown fields, a caller who is not a party of the stream).

How one stream works across two nodes (docs/apis.md has the long form):
- The *source* SAE opens first, at its node (the stream's source end), and gets a
  key_stream_ID; the *destination* SAE opens the same stream at its own node with that ID.
  The destination's node asks the source's node over the peer channel (verb `etsi004`) to join.
- Only the source end allocates: key index i is one ordinary hand-out of the node facade
  (`node.hand_out(source, [destination], n, chunk)`), so its bits are durable, sealed for the
  destination SAE at the destination's node, before the index exists. The source end keeps the
  index -> key_ID table and the source SAE's copy of the bits (in memory, the reservation);
  the destination end learns key_IDs by index from the source end (`keys`) and hands the key
  out with `node.deliver`. Key bits never cross the peer channel for a stream.
- Each end serves an index once. QoS: a token bucket paces each end to max_bps (burst of one
  chunk plus `jitter` ms); the source end keeps a reservation of chunks allocated ahead; an
  OPEN_CONNECT whose min_bps the path cannot sustain over the TTL is refused (QOS_NOT_MET,
  with a counter-proposal); GET_KEY gives up after `timeout` ms (TIMEOUT_ERROR); a stream
  ends when its TTL runs out.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field as dc_field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter, Gauge

from qkdnode.config import ConfigInForce
from qkdnode.errors import (
    NoRoute,
    NotAuthorized,
    NotYourKey,
    PeerRejected,
    PeerUnavailable,
    PoolExhausted,
    QkdnodeError,
    UnknownKey,
)
from qkdnode.limits import LimitExceeded
from qkdnode.peer import BadMessage, field

if TYPE_CHECKING:
    from qkdnode.links import LinkPool
    from qkdnode.node import Node

log = logging.getLogger("qkdnode.api004")

PREFIX = "/etsi004/v1"
MAX_STREAMS = 1024          # open streams per node (both ends together)
RESERVE_SECONDS = 1.0       # the source end holds about this much of max_bps allocated ahead
MAX_RESERVE = 64            # ... but never more chunks than this
HELD_FACTOR = 4             # chunks the source end may hold unread: this many reservations
MAP_KEEP = 4096             # index -> key_ID entries kept behind the newest index
MAX_HOPS = 16               # peer messages forwarded across trusted nodes at most this far
RETRY_EVERY = 0.05          # seconds between attempts while a GET_KEY waits for key
MAX_TIMEOUT_MS = 60_000     # a GET_KEY holds an HTTP request (and a stopping node waits for it): a minute at most
MAX_TTL_S = 366 * 86400
UINT32 = (1 << 32) - 1
MIMETYPE = "application/json"


class Status(enum.IntEnum):
    """Status codes of ETSI GS QKD 004 V2.1.1 (numbering as in docs/apis.md, with its sources)."""

    SUCCESSFUL = 0
    PEER_NOT_CONNECTED = 1             # OPEN_CONNECT succeeded, the other application has not opened yet
    INSUFFICIENT_KEY_AVAILABLE = 2     # GET_KEY failed: not enough key
    PEER_NOT_CONNECTED_GET_KEY = 3     # GET_KEY failed: the other application is not connected
    NO_QKD_CONNECTION_AVAILABLE = 4    # no QKD connection (or no such stream)
    KSID_ALREADY_IN_USE = 5            # OPEN_CONNECT failed: the key_stream_ID is in use
    TIMEOUT_ERROR = 6                  # the call could not complete within the QoS timeout
    QOS_NOT_MET = 7                    # OPEN_CONNECT failed: the QoS cannot be met (counter-proposal given)
    METADATA_SIZE_INSUFFICIENT = 8     # GET_KEY failed: the caller's metadata buffer is too small


QOS_FIELDS = ("key_chunk_size", "max_bps", "min_bps", "jitter", "priority", "timeout", "TTL")


@dataclass(frozen=True)
class QoS:
    key_chunk_size: int   # bytes per key
    max_bps: int          # most key per second each end may read, in bits
    min_bps: int          # key per second the path must be able to sustain, in bits
    jitter: int           # ms a call may come early without being paced (burst allowance)
    priority: int         # recorded and reported; not used for scheduling (docs/apis.md)
    timeout: int          # ms a GET_KEY may wait for key
    TTL: int              # s the stream lives after the source's OPEN_CONNECT
    metadata_mimetype: str = MIMETYPE

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def chunk_bits(self) -> int:
        return self.key_chunk_size * 8


class ApiError(Exception):
    """A request that is not a call at all: answered with an HTTP error and a message."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class Outcome(Exception):
    """A call that ends with a status of the spec other than success."""

    def __init__(self, status: Status, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class Pacer:
    """Token bucket for max_bps: a burst of one chunk plus `jitter` ms of the rate, then the rate."""

    def __init__(self, rate_bps: int, chunk_bits: int, jitter_ms: int):
        self.rate = float(rate_bps)
        self.capacity = chunk_bits + self.rate * jitter_ms / 1000.0
        self.tokens = self.capacity
        self.at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, bits: int) -> float:
        self._refill()
        return max(0.0, (bits - self.tokens) / self.rate)

    def take(self, bits: int) -> None:
        self._refill()
        self.tokens -= bits


@dataclass(eq=False)
class Stream:
    ksid: str
    role: str              # "source": this node allocates; "destination": it learns key_IDs from the source end
    source: str
    destination: str
    qos: QoS
    peer_node: str         # the node of the other end
    expires: float         # time.monotonic()
    joined: bool = False   # both ends have opened
    peer_closed: bool = False
    peer_served: set[int] = dc_field(default_factory=set)  # indices the other end read, once it closed
    served: set[int] = dc_field(default_factory=set)       # indices this end handed to its SAE
    cursor: int = 0        # the next index when GET_KEY names none
    floor: int = 0         # indices below this are no longer served here (MAP_KEEP behind the cursor)
    key_ids: dict[int, str] = dc_field(default_factory=dict)   # index -> key_ID (a cache at the destination end)
    held: dict[int, bytearray] = dc_field(default_factory=dict)  # source end: the source SAE's bits, unread
    allocated: int = 0     # source end: indices below this have keys
    pulled: int = 0        # source end: one past the highest index the destination end asked for
    reserve: int = 1       # chunks to hold allocated ahead
    closed: bool = False
    lock: asyncio.Lock = dc_field(default_factory=asyncio.Lock)
    alloc_lock: asyncio.Lock = dc_field(default_factory=asyncio.Lock)
    wake: asyncio.Event = dc_field(default_factory=asyncio.Event)
    pacer: Pacer | None = None

    @property
    def local_sae(self) -> str:
        return self.source if self.role == "source" else self.destination

    def wipe(self) -> None:
        for bits in self.held.values():
            bits[:] = bytes(len(bits))
        self.held.clear()
        self.closed = True
        self.wake.set()

    def __repr__(self) -> str:  # never the held bits
        return f"Stream({self.ksid}, {self.role} end, {self.source} -> {self.destination})"


class Streams:
    """The key streams of one node: both ends, the reservation at source ends, the peer verb."""

    def __init__(self, node: "Node"):
        self.node = node
        self.me = node.cfg.node_id
        self.streams: dict[str, Stream] = {}
        self._tasks: set[asyncio.Task] = set()
        r = node.metrics.registry
        self.m_requests = Counter("qkdnode_etsi004_requests_total", "ETSI 004 calls by call and outcome",
                                  ["call", "outcome"], registry=r)
        self.m_streams = Gauge("qkdnode_etsi004_streams", "Open ETSI 004 key streams at this node, by end",
                               ["end"], registry=r)
        self.m_reserved = Gauge("qkdnode_etsi004_reserved_bits",
                                "Key allocated ahead for ETSI 004 streams at their source ends", registry=r)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Expire streams whose TTL ran out; on stop, wipe every reservation."""
        try:
            while True:
                now = time.monotonic()
                for s in [s for s in self.streams.values() if s.expires <= now]:
                    log.info("key stream %s expired (TTL %d s)", s.ksid, s.qos.TTL)
                    self._drop(s)
                self._gauges()
                await asyncio.sleep(0.5)
        finally:
            for s in list(self.streams.values()):
                self._drop(s)
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _gauges(self) -> None:
        for end in ("source", "destination"):
            self.m_streams.labels(end).set(sum(1 for s in self.streams.values() if s.role == end))
        self.m_reserved.set(sum(len(b) * 8 for s in self.streams.values() for b in s.held.values()))

    def _drop(self, s: Stream) -> None:
        if self.streams.get(s.ksid) is s:
            del self.streams[s.ksid]
        s.wipe()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _live(self, ksid: str, caller: str) -> Stream:
        s = self.streams.get(ksid)
        if s is None:
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE, f"no key stream {ksid} at node {self.me}")
        if caller != s.local_sae:
            raise ApiError(401, f"key stream {ksid} belongs to SAE {s.local_sae} at this node, not to {caller}")
        if s.expires <= time.monotonic():
            self._drop(s)
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE, f"key stream {ksid} expired (TTL {s.qos.TTL} s)")
        return s

    # ------------------------------------------------------------ OPEN_CONNECT

    async def open_source(self, source: str, destination: str, qos: QoS, ksid: str | None) -> dict:
        dest_node = self.node.cfg.saes[destination]
        if ksid is not None and ksid in self.streams:
            raise Outcome(Status.KSID_ALREADY_IN_USE, f"key_stream_ID {ksid} is in use at node {self.me}")
        if len(self.streams) >= MAX_STREAMS:
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE, f"node {self.me} has {MAX_STREAMS} streams open")
        capacity = await self._capacity_bps(dest_node, qos.TTL)
        if capacity is None:
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE,
                          f"no path of QKD links from node {self.me} to node {dest_node}")
        if qos.min_bps > 0 and qos.min_bps > capacity:  # min_bps 0: best effort, always accepted
            offer = dict(qos.to_json(), min_bps=max(int(capacity), 0))
            offer["max_bps"] = max(offer["max_bps"], offer["min_bps"], 1)
            raise Outcome(Status.QOS_NOT_MET,
                          f"min_bps {qos.min_bps} exceeds the {int(capacity)} bit/s the path to node {dest_node} "
                          f"can sustain over the stream's TTL of {qos.TTL} s", qos=offer)
        if ksid is not None and ksid in self.streams:  # taken while the capacity was worked out
            raise Outcome(Status.KSID_ALREADY_IN_USE, f"key_stream_ID {ksid} is in use at node {self.me}")
        ksid = ksid or str(uuid.uuid4())
        s = Stream(ksid, "source", source, destination, qos, dest_node, time.monotonic() + qos.TTL,
                   reserve=_reserve(qos), pacer=Pacer(qos.max_bps, qos.chunk_bits, qos.jitter))
        self.streams[ksid] = s
        self._gauges()
        log.info("key stream %s opened at its source end: %s -> %s (node %s)", ksid, source, destination, dest_node)
        return {"status": Status.PEER_NOT_CONNECTED, "key_stream_ID": ksid, "qos": qos.to_json(),
                "message": f"waiting for {destination} to open the stream at node {dest_node}"}

    async def open_destination(self, source: str, destination: str, qos: QoS | None, ksid: str) -> dict:
        src_node = self.node.cfg.saes[source]
        if ksid in self.streams:
            raise Outcome(Status.KSID_ALREADY_IN_USE, f"key_stream_ID {ksid} is in use at node {self.me}")
        if len(self.streams) >= MAX_STREAMS:
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE, f"node {self.me} has {MAX_STREAMS} streams open")
        # Hold the ID while the source end answers, so that a second OPEN_CONNECT finds it in use.
        placeholder = Stream(ksid, "destination", source, destination, qos or _ANY_QOS, src_node,
                             time.monotonic() + 60.0)
        self.streams[ksid] = placeholder
        try:
            answer = await self._call(src_node, {"op": "open", "key_stream_ID": ksid, "source": source,
                                                 "destination": destination,
                                                 "qos": qos.to_json() if qos else None}, timeout=10.0)
            status = answer.get("status")
            if status != Status.SUCCESSFUL:
                raise Outcome(Status(status) if status in _CODES else Status.NO_QKD_CONNECTION_AVAILABLE,
                              str(answer.get("message", "refused by the source end"))[:500],
                              **({"qos": answer["qos"]} if isinstance(answer.get("qos"), dict) else {}))
            agreed = _qos_from_peer(answer.get("qos"))
            ttl_left = answer.get("ttl_left")
            if not isinstance(ttl_left, (int, float)) or not 0 < ttl_left <= MAX_TTL_S:
                raise PeerRejected(f"node {src_node} answered OPEN_CONNECT without a valid ttl_left")
        except (PeerUnavailable, PeerRejected, PoolExhausted) as exc:
            self._drop(placeholder)
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE,
                          f"the source end of key stream {ksid} at node {src_node} is not reachable: {exc}") from None
        except BaseException:
            self._drop(placeholder)
            raise
        s = Stream(ksid, "destination", source, destination, agreed, src_node, time.monotonic() + ttl_left,
                   joined=True, pacer=Pacer(agreed.max_bps, agreed.chunk_bits, agreed.jitter))
        if placeholder.closed:  # CLOSE came while the source end was answering
            self._spawn(self._tell_closed(s, []))
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE, f"key stream {ksid} was closed while it opened")
        self.streams[ksid] = s
        self._gauges()
        log.info("key stream %s opened at its destination end: %s -> %s", ksid, source, destination)
        return {"status": Status.SUCCESSFUL, "key_stream_ID": ksid, "qos": agreed.to_json()}

    async def _capacity_bps(self, dest_node: str, ttl: int) -> float | None:
        """What the path can sustain for one more stream over `ttl` seconds: the key it holds,
        spread over the TTL, plus the rate its slowest link makes key, less the min_bps of the
        streams already open from this node to the same node. None: no path at all."""
        router = self.node.router
        pool = self.node.pool_to(dest_node)
        if pool is not None:
            await pool.refresh_gauge()
            rate = pool.ingest_bps
        else:
            path = router.route(dest_node, 1)
            if path is None:
                return None
            adverts = {origin: a.links for origin, a in router.lsdb.items()}
            rate = min(float(adverts.get(a, {}).get(b, {}).get("rate_bps", 0.0)) for a, b in zip(path, path[1:]))
        ready, _ = router.ready_bits_to(dest_node)
        promised = sum(s.qos.min_bps for s in self.streams.values()
                       if s.role == "source" and s.peer_node == dest_node)
        return rate + ready / ttl - promised

    # ------------------------------------------------------------ GET_KEY

    async def get_key(self, caller: str, ksid: str, index: int | None, metadata_size: int | None) -> dict:
        s = self._live(ksid, caller)
        deadline = time.monotonic() + s.qos.timeout / 1000.0
        try:
            await asyncio.wait_for(s.lock.acquire(), timeout=max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise Outcome(Status.TIMEOUT_ERROR, f"another GET_KEY on stream {ksid} held it beyond the timeout "
                                                f"of {s.qos.timeout} ms") from None
        try:
            return await self._get_key(s, index, metadata_size, deadline)
        except QkdnodeError as exc:  # the other node broke the protocol; nothing was served
            log.warning("key stream %s: %s", ksid, exc)
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE, f"key stream {ksid}: {exc}") from None
        finally:
            s.lock.release()

    async def _get_key(self, s: Stream, index: int | None, metadata_size: int | None, deadline: float) -> dict:
        if s.closed:
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE, f"key stream {s.ksid} was closed")
        if not s.joined:
            raise Outcome(Status.PEER_NOT_CONNECTED_GET_KEY,
                          f"{s.destination} has not opened key stream {s.ksid} at node {s.peer_node} yet")
        i = s.cursor if index is None else index
        if i in s.served:
            raise ApiError(400, f"index {i} of key stream {s.ksid} was already served at this end")
        if i < s.floor:
            raise ApiError(400, f"index {i} of key stream {s.ksid} lies more than {MAP_KEEP} indices behind the "
                                "newest read at this end; it is no longer served")
        if s.peer_closed and i not in s.peer_served:
            other = s.destination if s.role == "source" else s.source
            raise Outcome(Status.PEER_NOT_CONNECTED_GET_KEY,
                          f"{other} closed key stream {s.ksid} without reading index {i}")
        meta = json.dumps({"key_stream_ID": s.ksid, "index": i, "source": s.source, "destination": s.destination,
                           "key_chunk_size": s.qos.key_chunk_size}, separators=(",", ":"))
        if metadata_size is not None and len(meta.encode()) > metadata_size:
            raise Outcome(Status.METADATA_SIZE_INSUFFICIENT,
                          f"the metadata needs {len(meta.encode())} bytes, metadata_size is {metadata_size}",
                          metadata_size=len(meta.encode()))
        wait = s.pacer.wait_for(s.qos.chunk_bits)
        if wait and time.monotonic() + wait > deadline:
            raise Outcome(Status.TIMEOUT_ERROR, f"max_bps {s.qos.max_bps} allows the next key in {wait * 1000:.0f} ms, "
                                                f"beyond the timeout of {s.qos.timeout} ms")
        if wait:
            await asyncio.sleep(wait)
        if s.role == "source":
            bits = await self._source_key(s, i, deadline)
        else:
            bits = await self._destination_key(s, i, deadline)
        try:
            s.pacer.take(s.qos.chunk_bits)
            _note_served(s, i)
            self.node.metrics.keys_served.labels("etsi004_get_key").inc()
            return {"status": Status.SUCCESSFUL, "key_stream_ID": s.ksid, "index": i,
                    "key_buffer": base64.b64encode(bits).decode("ascii"),
                    "metadata": {"mimetype": MIMETYPE, "size": len(meta.encode()), "buffer": meta}}
        finally:
            bits[:] = bytes(len(bits))
            s.wake.set()  # the reservation refills behind the reader

    async def _source_key(self, s: Stream, i: int, deadline: float) -> bytearray:
        while True:
            if i < s.allocated:
                bits = s.held.pop(i, None)
                if bits is None:  # never: an index leaves `held` only when served here, or when the peer closed
                    raise Outcome(Status.PEER_NOT_CONNECTED_GET_KEY, f"index {i} of key stream {s.ksid} is gone")
                return bits
            why = await self._allocate(s, i + 1)
            if why is None:
                continue
            retry, message = why
            self._give_up_unless_time(s, retry, message, deadline)
            await asyncio.sleep(RETRY_EVERY)

    async def _destination_key(self, s: Stream, i: int, deadline: float) -> bytearray:
        while i not in s.key_ids:
            if s.peer_closed:
                raise Outcome(Status.PEER_NOT_CONNECTED_GET_KEY, f"{s.source} closed key stream {s.ksid}")
            timeout = min(max(deadline - time.monotonic(), 2.0), 10.0)
            try:
                answer = await self._call(s.peer_node, {"op": "keys", "key_stream_ID": s.ksid, "index": i},
                                          timeout=timeout)
            except (PeerUnavailable, PeerRejected, PoolExhausted) as exc:
                self._give_up_unless_time(s, True, f"the source end at node {s.peer_node} did not answer: {exc}",
                                          deadline, Status.TIMEOUT_ERROR)
                await asyncio.sleep(RETRY_EVERY)
                continue
            status = answer.get("status")
            if status == Status.SUCCESSFUL:
                for pair in answer.get("key_IDs", []):
                    if (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
                            and isinstance(pair[1], str) and pair[0] not in s.served):
                        s.key_ids[pair[0]] = pair[1]
                if i not in s.key_ids:
                    raise PeerRejected(f"node {s.peer_node} did not name the key_ID of index {i}")
                _prune(s.key_ids, i)
            elif status == Status.INSUFFICIENT_KEY_AVAILABLE:
                self._give_up_unless_time(s, answer.get("retry") is True, str(answer.get("message"))[:300], deadline)
                await asyncio.sleep(RETRY_EVERY)
            elif status in (Status.PEER_NOT_CONNECTED_GET_KEY, Status.NO_QKD_CONNECTION_AVAILABLE):
                if status == Status.NO_QKD_CONNECTION_AVAILABLE:
                    self._drop(s)
                raise Outcome(Status(status), str(answer.get("message", "the source end refused"))[:300])
            else:
                raise PeerRejected(f"node {s.peer_node} answered keys with status {status!r}")
        key_id = s.key_ids.pop(i)
        try:
            ((_, bits),) = await self.node.deliver(s.destination, s.source, [key_id])
        except (UnknownKey, NotYourKey) as exc:
            raise ApiError(409, f"the key of index {i} of key stream {s.ksid} is not held at node {self.me} "
                                f"({exc.__class__.__name__}); it may have been fetched through another API") from None
        return bytearray(bits)

    @staticmethod
    def _give_up_unless_time(s: Stream, retry: bool, message: str, deadline: float,
                             late: Status = Status.TIMEOUT_ERROR) -> None:
        if not retry:
            raise Outcome(Status.INSUFFICIENT_KEY_AVAILABLE, message)
        if s.qos.timeout == 0:
            raise Outcome(Status.INSUFFICIENT_KEY_AVAILABLE, f"{message} (timeout 0: not waiting)")
        if time.monotonic() + RETRY_EVERY > deadline:
            raise Outcome(late, f"{message}; gave up after the timeout of {s.qos.timeout} ms")

    # ------------------------------------------------------------ the source end's allocation

    async def _allocate(self, s: Stream, upto: int) -> tuple[bool, str] | None:
        """Hand out keys so that indices below `upto` exist. None when done; else (may a retry
        succeed, why not)."""
        if upto > s.allocated + s.reserve:
            return False, (f"index {upto - 1} of key stream {s.ksid} lies beyond its reservation window "
                           f"(indices below {s.allocated + s.reserve} can be served now)")
        async with s.alloc_lock:
            need = upto - s.allocated
            if need <= 0:
                return None
            if s.closed:
                return False, f"key stream {s.ksid} was closed"
            if len(s.held) + need > HELD_FACTOR * s.reserve:
                return True, (f"{s.source} has {len(s.held)} keys of key stream {s.ksid} unread; "
                              "the stream waits for it to catch up")
            per = self.node.cfg.keys.max_key_per_request
            try:
                while need > 0:
                    n = min(need, per)
                    # The source SAE's key-bit quota of [limits], shared with ETSI 014 and SKIP.
                    with self.node.limits.key_bits(s.source, n * s.qos.chunk_bits):
                        handouts = await self.node.hand_out(s.source, [s.destination], n, s.qos.chunk_bits)
                    if s.closed:  # closed while the hand-out ran: the bits are not kept
                        return False, f"key stream {s.ksid} was closed"
                    for h in handouts:
                        s.key_ids[s.allocated] = h.key_ID
                        s.held[s.allocated] = bytearray(h.bits)
                        s.allocated += 1
                    need -= n
            except LimitExceeded as exc:  # not before the next UTC day: no use waiting
                return False, str(exc)
            except (PoolExhausted, NoRoute) as exc:
                return True, f"not enough key toward node {s.peer_node}: {exc}"
            except QkdnodeError as exc:  # peer trouble: PeerUnavailable, PeerRejected, CarveConflict
                log.warning("key stream %s: allocation failed: %s", s.ksid, exc)
                return True, f"no key handed out: {exc}"
            _prune(s.key_ids, s.allocated - 1)
            return None

    async def _refill(self, s: Stream) -> None:
        """Keep `reserve` chunks allocated ahead of both readers while the stream lives."""
        while not s.closed and not s.peer_closed:
            s.wake.clear()
            target = max(s.cursor, s.pulled) + s.reserve
            try:
                if s.allocated < target and len(s.held) < HELD_FACTOR * s.reserve:
                    upto = min(target, s.allocated + s.reserve,
                               s.allocated + HELD_FACTOR * s.reserve - len(s.held))
                    if await self._allocate(s, upto) is not None:
                        await asyncio.sleep(0.2)  # no key now: try again soon
                    self._gauges()
                    continue
            except Exception:
                log.exception("key stream %s: the reservation failed", s.ksid)
                await asyncio.sleep(1.0)
                continue
            try:
                await asyncio.wait_for(s.wake.wait(), timeout=1.0)
            except TimeoutError:
                pass

    # ------------------------------------------------------------ CLOSE

    async def close(self, caller: str, ksid: str) -> dict:
        s = self.streams.get(ksid)
        if s is None:
            raise Outcome(Status.NO_QKD_CONNECTION_AVAILABLE, f"no key stream {ksid} at node {self.me}")
        if caller != s.local_sae:
            raise ApiError(401, f"key stream {ksid} belongs to SAE {s.local_sae} at this node, not to {caller}")
        self._drop(s)
        self._gauges()
        log.info("key stream %s closed at its %s end (%d keys read here)", ksid, s.role, len(s.served))
        if s.joined and not s.peer_closed:
            served = sorted(i for i in s.served if i >= s.cursor - MAP_KEEP)[-MAP_KEEP:]
            self._spawn(self._tell_closed(s, served))
        return {"status": Status.SUCCESSFUL, "key_stream_ID": ksid}

    async def _tell_closed(self, s: Stream, served: list[int]) -> None:
        try:
            await self._call(s.peer_node, {"op": "close", "key_stream_ID": s.ksid, "served": served}, timeout=10.0)
        except QkdnodeError as exc:  # the other end expires by its TTL
            log.warning("key stream %s: could not tell node %s it was closed: %s", s.ksid, s.peer_node, exc)

    # ------------------------------------------------------------ the peer channel (verb `etsi004`)

    async def _call(self, dest: str, body: dict, timeout: float, hops: int = 0, origin: str | None = None) -> dict:
        """A message to the node `dest`: directly if a link joins us, else through the next hop
        of the route (trusted nodes pass it on; it carries key IDs, never key bits)."""
        if self.node.pool_to(dest) is not None:
            nxt = dest
        else:
            path = self.node.router.route(dest, 0)
            if not path or len(path) < 2:
                raise PeerUnavailable(f"no path from node {self.me} to node {dest}")
            nxt = path[1]
        pool = self.node.pool_to(nxt)
        if pool is None:
            raise PeerUnavailable(f"node {self.me} has no link to node {nxt}")
        message = dict(body, to=dest, origin=origin or self.me, hops=hops)
        return await self.node.peers[nxt].call(pool.cfg.id, "etsi004", message, timeout=timeout)

    async def on_peer(self, pool: "LinkPool", body: dict) -> dict:
        to, origin, hops = field(body, "to", str), field(body, "origin", str), field(body, "hops", int)
        if not 0 <= hops < MAX_HOPS:
            raise BadMessage(f"hops must be from 0 to {MAX_HOPS - 1}")
        if hops == 0 and origin != pool.cfg.peer:
            raise BadMessage(f"a message from node {pool.cfg.peer} that says it comes from node {origin}")
        if to != self.me:
            if hops + 1 >= MAX_HOPS or (to not in self.node.cfg.saes.values() and to not in self.node.cfg.peers):
                raise BadMessage(f"cannot pass a message on to node {to!r}")
            inner = {k: v for k, v in body.items() if k not in ("to", "origin", "hops")}
            return await self._call(to, inner, timeout=10.0, hops=hops + 1, origin=origin)
        op, ksid = field(body, "op", str), field(body, "key_stream_ID", str)
        handler = {"open": self._peer_open, "keys": self._peer_keys, "close": self._peer_close}.get(op)
        if handler is None:
            raise BadMessage(f"no etsi004 operation {op!r}")
        return await handler(origin, ksid, body)

    async def _peer_open(self, origin: str, ksid: str, body: dict) -> dict:
        source, destination = field(body, "source", str), field(body, "destination", str)
        s = self.streams.get(ksid)
        if s is None or s.role != "source" or s.closed:
            return _answer(Status.NO_QKD_CONNECTION_AVAILABLE, f"no key stream {ksid} waits at node {self.me}")
        if (s.source, s.destination) != (source, destination) or self.node.cfg.saes.get(destination) != origin \
                or s.peer_node != origin:
            return _answer(Status.NO_QKD_CONNECTION_AVAILABLE,
                           f"key stream {ksid} at node {self.me} does not join {source} to {destination}")
        if s.joined:
            return _answer(Status.KSID_ALREADY_IN_USE, f"{destination} has already opened key stream {ksid}")
        raw = body.get("qos")
        if raw is not None:
            try:
                theirs = _qos_from_peer(raw)
            except PeerRejected:
                theirs = None
            if theirs != s.qos:
                return _answer(Status.QOS_NOT_MET, f"the QoS differs from the one {source} opened key stream "
                                                   f"{ksid} with", qos=s.qos.to_json())
        left = s.expires - time.monotonic()
        if left <= 0:
            self._drop(s)
            return _answer(Status.NO_QKD_CONNECTION_AVAILABLE, f"key stream {ksid} expired")
        s.joined = True
        self._spawn(self._refill(s))
        log.info("key stream %s: %s joined at node %s", ksid, destination, origin)
        return {"status": Status.SUCCESSFUL, "qos": s.qos.to_json(), "ttl_left": left}

    async def _peer_keys(self, origin: str, ksid: str, body: dict) -> dict:
        index = field(body, "index", int)
        if index < 0:
            raise BadMessage("index must be >= 0")
        s = self.streams.get(ksid)
        if s is None or s.role != "source" or s.peer_node != origin:
            return _answer(Status.NO_QKD_CONNECTION_AVAILABLE, f"no key stream {ksid} at node {self.me}")
        if s.expires <= time.monotonic():
            self._drop(s)
            return _answer(Status.NO_QKD_CONNECTION_AVAILABLE, f"key stream {ksid} expired")
        if s.peer_closed or not s.joined:
            return _answer(Status.NO_QKD_CONNECTION_AVAILABLE, f"key stream {ksid} is not open for node {origin}")
        if index < s.allocated + s.reserve:  # the reservation follows the reader, not a far jump
            s.pulled = max(s.pulled, index + 1)
            s.wake.set()
        why = await self._allocate(s, index + 1)
        if why is not None:
            retry, message = why
            return dict(_answer(Status.INSUFFICIENT_KEY_AVAILABLE, message), retry=retry)
        if index not in s.key_ids:
            return dict(_answer(Status.INSUFFICIENT_KEY_AVAILABLE,
                                f"index {index} of key stream {ksid} is too old to be served"), retry=False)
        pairs = [[i, s.key_ids[i]] for i in range(index, min(s.allocated, index + 64)) if i in s.key_ids]
        return {"status": Status.SUCCESSFUL, "key_IDs": pairs}

    async def _peer_close(self, origin: str, ksid: str, body: dict) -> dict:
        served = field(body, "served", list)
        if len(served) > MAP_KEEP or not all(isinstance(i, int) and not isinstance(i, bool) for i in served):
            raise BadMessage(f"served must be an array of at most {MAP_KEEP} indices")
        s = self.streams.get(ksid)
        if s is None or s.peer_node != origin:
            return {"status": Status.SUCCESSFUL, "known": False}
        s.peer_closed, s.peer_served = True, set(served)
        for i in [i for i in s.held if i not in s.peer_served]:  # bits nobody at the other end will read
            bits = s.held.pop(i)
            bits[:] = bytes(len(bits))
        s.wake.set()
        self._gauges()
        log.info("key stream %s closed by the other end (node %s)", ksid, origin)
        return {"status": Status.SUCCESSFUL, "known": True}


_ANY_QOS = QoS(1, 1, 0, 0, 0, 0, 1)
_CODES = {int(c) for c in Status}


def _note_served(s: Stream, i: int) -> None:
    """Remember that index i was served at this end; forget (and refuse) indices far behind,
    so that a long stream's bookkeeping stays bounded."""
    s.served.add(i)
    s.cursor = max(s.cursor, i + 1)
    if len(s.served) > 2 * MAP_KEEP:
        s.floor = max(s.floor, s.cursor - MAP_KEEP)
        s.served = {j for j in s.served if j >= s.floor}
        for j in [j for j in s.held if j < s.floor]:
            bits = s.held.pop(j)
            bits[:] = bytes(len(bits))


def _reserve(qos: QoS) -> int:
    return max(1, min(MAX_RESERVE, math.ceil(qos.max_bps * RESERVE_SECONDS / qos.chunk_bits)))


def _prune(key_ids: dict[int, str], newest: int) -> None:
    if len(key_ids) > MAP_KEEP:
        for i in [i for i in key_ids if i < newest - MAP_KEEP]:
            del key_ids[i]


def _answer(status: Status, message: str, **extra: Any) -> dict:
    return {"status": int(status), "message": message, **extra}


def _qos_from_peer(raw: Any) -> QoS:
    if not isinstance(raw, dict) or set(raw) != set(QOS_FIELDS) | {"metadata_mimetype"} or not all(
            isinstance(raw[k], int) and not isinstance(raw[k], bool) and 0 <= raw[k] <= UINT32 for k in QOS_FIELDS):
        raise PeerRejected("a QoS from the other node that does not have the documented shape")
    qos = QoS(**raw)
    if qos.key_chunk_size < 1 or qos.max_bps < 1 or qos.TTL < 1:
        raise PeerRejected("a QoS from the other node that cannot be served")
    return qos


# ---------------------------------------------------------------- the HTTPS listener


def make_api004_app(node: "Node") -> web.Application:
    cfg, streams = ConfigInForce(node), node.streams  # the config in force: a SIGHUP may add SAEs

    @web.middleware
    async def errors(request: web.Request, handler):
        call = request.match_info.route.name or "other"
        try:
            resp = await handler(request)
        except ApiError as exc:
            resp = web.json_response({"message": exc.message}, status=exc.status)
            if exc.retry_after is not None:
                resp.headers["Retry-After"] = str(int(exc.retry_after))
        except web.HTTPException as exc:  # 404, 405, 413 from aiohttp itself: still JSON
            resp = web.json_response({"message": exc.reason}, status=exc.status)
        outcome = resp.headers.get("X-Etsi004-Status") or f"http_{resp.status}"
        streams.m_requests.labels(call, outcome).inc()
        return resp

    def answer(body: dict) -> web.Response:
        status = Status(body["status"])
        out = dict(body, status=int(status), status_name=status.name)
        return web.json_response(out, headers={"X-Etsi004-Status": status.name})

    async def run(call):
        try:
            return answer(await call)
        except Outcome as exc:
            return answer({"status": exc.status, "message": exc.message, **exc.extra})

    def caller_of(request: web.Request) -> str:
        try:
            return node.caller(request.transport)  # [limits]: the same bucket as on ETSI 014 and SKIP
        except NotAuthorized as exc:
            raise ApiError(401, str(exc)) from None
        except LimitExceeded as exc:
            raise ApiError(429, str(exc), exc.retry_after) from None

    async def body_of(request: web.Request, required: set[str], optional: set[str]) -> dict:
        try:
            body = json.loads(await request.read() or b"null")
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - required - optional)
        if unknown:
            raise ApiError(400, f"unknown field(s) {unknown}; allowed: {sorted(required | optional)}")
        missing = sorted(required - set(body))
        if missing:
            raise ApiError(400, f"missing field(s) {missing}")
        return body

    def ksid_of(value: Any, name: str = "key_stream_ID") -> str:
        if not isinstance(value, str) or not _is_uuid(value):
            raise ApiError(400, f"{name} must be a UUID in its canonical lower-case form")
        return value

    def integer(value: Any, name: str, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ApiError(400, f"{name} must be an integer from {lo} to {hi}")
        return value

    def qos_of(raw: Any) -> QoS:
        if not isinstance(raw, dict):
            raise ApiError(400, "qos must be an object")
        unknown = sorted(set(raw) - set(QOS_FIELDS) - {"metadata_mimetype"})
        if unknown:
            raise ApiError(400, f"unknown qos field(s) {unknown}; allowed: {sorted(QOS_FIELDS)} and metadata_mimetype")
        missing = [k for k in QOS_FIELDS if k not in raw]
        if missing:
            raise ApiError(400, f"missing qos field(s) {missing}")
        k = cfg.keys
        chunk = integer(raw["key_chunk_size"], "qos.key_chunk_size", k.min_key_size // 8, k.max_key_size // 8)
        max_bps = integer(raw["max_bps"], "qos.max_bps", 1, UINT32)
        min_bps = integer(raw["min_bps"], "qos.min_bps", 0, UINT32)
        if min_bps > max_bps:
            raise ApiError(400, f"qos.min_bps ({min_bps}) must not exceed qos.max_bps ({max_bps})")
        mimetype = raw.get("metadata_mimetype", MIMETYPE)
        if mimetype != MIMETYPE:
            raise ApiError(400, f"qos.metadata_mimetype must be {MIMETYPE!r}, the only metadata format served")
        return QoS(chunk, max_bps, min_bps, integer(raw["jitter"], "qos.jitter", 0, UINT32),
                   integer(raw["priority"], "qos.priority", 0, UINT32),
                   integer(raw["timeout"], "qos.timeout", 0, MAX_TIMEOUT_MS),
                   integer(raw["TTL"], "qos.TTL", 1, MAX_TTL_S), mimetype)

    def party(value: Any, name: str) -> str:
        if not isinstance(value, str) or value not in cfg.saes:
            raise ApiError(400, f"{name} must be the SAE ID of a registered SAE; {str(value)[:80]!r} is not")
        return value

    async def open_connect(request: web.Request) -> web.Response:
        caller = caller_of(request)
        body = await body_of(request, {"source", "destination"}, {"qos", "key_stream_ID"})
        source, destination = party(body["source"], "source"), party(body["destination"], "destination")
        if caller not in (source, destination):
            raise ApiError(401, f"SAE {caller} is neither the source nor the destination of this stream")
        if source == destination:
            raise ApiError(400, "source and destination must be two different SAEs")
        ksid = ksid_of(body["key_stream_ID"]) if body.get("key_stream_ID") is not None else None
        qos = qos_of(body["qos"]) if body.get("qos") is not None else None
        if caller == source and qos is None:
            raise ApiError(400, "the source's OPEN_CONNECT must carry a qos")
        if caller == destination and ksid is None:
            raise ApiError(400, "the destination opens the stream the source opened: name its key_stream_ID")
        if cfg.saes[source] == cfg.saes[destination]:
            return answer({"status": Status.NO_QKD_CONNECTION_AVAILABLE,
                           "message": f"{source} and {destination} are both at node {cfg.saes[source]}: "
                                      "no QKD link joins them"})
        if caller == source:
            return await run(streams.open_source(source, destination, qos, ksid))
        return await run(streams.open_destination(source, destination, qos, ksid))

    async def get_key(request: web.Request) -> web.Response:
        caller = caller_of(request)
        body = await body_of(request, {"key_stream_ID"}, {"index", "metadata_size"})
        ksid = ksid_of(body["key_stream_ID"])
        index = integer(body["index"], "index", 0, UINT32) if body.get("index") is not None else None
        msize = integer(body["metadata_size"], "metadata_size", 0, UINT32) \
            if body.get("metadata_size") is not None else None
        return await run(streams.get_key(caller, ksid, index, msize))

    async def close(request: web.Request) -> web.Response:
        caller = caller_of(request)
        body = await body_of(request, {"key_stream_ID"}, set())
        return await run(streams.close(caller, ksid_of(body["key_stream_ID"])))

    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    app.router.add_post(PREFIX + "/open_connect", open_connect, name="open_connect")
    app.router.add_post(PREFIX + "/get_key", get_key, name="get_key")
    app.router.add_post(PREFIX + "/close", close, name="close")
    return app


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
