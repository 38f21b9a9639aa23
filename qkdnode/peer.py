"""The peer channel between two qkdnode daemons: HTTPS with mutual TLS, JSON messages.

No key bits cross it. Messages carry block IDs with keyed digests (to agree which blocks are
identical at both ends), and key_IDs with the byte ranges of blocks they are cut from (so
the other end cuts the same bits). The caller's node ID is its certificate's commonName, and a
link's messages are accepted only from that link's peer.

    POST /peer/v1/links/{link}/offer     master -> slave: blocks to confirm by digest
    POST /peer/v1/links/{link}/keys      link master -> other end: keys it allocated
    POST /peer/v1/links/{link}/allocate  other end -> link master: allocate keys for my SAE
    POST /peer/v1/links/{link}/discard   either way: forget keys whose hand-out failed
    POST /peer/v1/links/{link}/relay     either way: keys for SAEs further on (docs/relay.md)
    POST /peer/v1/links/{link}/lsa       either way: link-state advertisements for routing
    POST /peer/v1/node/{verb}            node to node, no link needed: the SDN agents' switched-link
                                         set-up (plan, apply, release; docs/sdn.md)
    GET  /peer/v1/health
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from qkdnode.config import PeerConfig
from qkdnode.errors import (
    CarveConflict,
    PeerRejected,
    PeerUnavailable,
    PoolExhausted,
    QkdnodeError,
    RelayFailed,
    RelayRejected,
    SdnRefused,
)
from qkdnode.tlsutil import peer_identity

if TYPE_CHECKING:
    from qkdnode.links import LinkPool

log = logging.getLogger("qkdnode.peer")


class PeerClient:
    """Talks to one peer node. One session, our node certificate, the peer's URL from config.

    The peer is verified by host name, as any TLS server: `server_hostname` from the config (or
    the URL's host). Every node's certificate comes from the same CA, so that name must be one
    only the peer's certificate carries: where nodes share an address (a lab on one host), set
    `server_hostname` to a name in the peer's certificate alone."""

    def __init__(self, cfg: PeerConfig, ssl_context, metrics=None):
        self.cfg = cfg
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._metrics = metrics
        self.up: bool | None = None  # did the peer answer the last call (None: not asked yet)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64))

    async def close(self) -> None:
        if self._session:
            await self._session.close()
            self._session = None

    async def call(self, link: str, verb: str, body: dict, timeout: float = 15.0) -> dict:
        return await self._post(f"{self.cfg.url}/peer/v1/links/{link}/{verb}", body, timeout)

    async def call_node(self, verb: str, body: dict, timeout: float = 15.0) -> dict:
        """A node-level message: one that belongs to no link (the peer may share none with us yet)."""
        return await self._post(f"{self.cfg.url}/peer/v1/node/{verb}", body, timeout)

    async def _post(self, url: str, body: dict, timeout: float) -> dict:
        try:
            async with self._session.post(url, json=body, server_hostname=self.cfg.server_hostname,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                status = resp.status
                try:
                    answer = await resp.json(content_type=None)
                except (ValueError, RecursionError):
                    answer = None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._up(0)
            raise PeerUnavailable(f"peer node {self.cfg.node_id} ({url}): {exc.__class__.__name__} {exc}") from None
        self._up(1)
        if not isinstance(answer, dict):
            raise PeerRejected(f"peer node {self.cfg.node_id}: HTTP {status} without a JSON object")
        if status == 503:
            raise PoolExhausted(str(answer.get("message", "peer has no key")))
        if status != 200:
            raise PeerRejected(f"peer node {self.cfg.node_id}: HTTP {status}: {answer.get('message')}", answer)
        return answer

    def _up(self, value: int) -> None:
        self.up = bool(value)
        if self._metrics:
            self._metrics.peer_up.labels(self.cfg.node_id).set(value)


# The largest peer message a node takes: one hand-out of max_key_per_request keys (the config
# allows up to 100,000) crosses as one message of ~120 to ~250 bytes a key; batches of requests
# stay far below it (links.MAX_BATCH_KEYS). Only nodes with a certificate of the network's CA
# get this far.
PEER_MAX_BODY = 32 << 20


class BadMessage(QkdnodeError):
    """A peer message that does not have the documented shape."""


def make_peer_app(node_id: str, pools: dict[str, "LinkPool"],
                  node_verbs: dict[str, Callable[["LinkPool", dict], Awaitable[dict]]] | None = None,
                  node_calls: dict[str, Callable[[str, dict], Awaitable[dict]]] | None = None,
                  peers: "set[str] | frozenset[str]" = frozenset()) -> web.Application:
    """The server side of the peer channel: routes messages to the link pool they belong to, or
    to a node-level handler (`node_verbs`: relay, routing) that is told which link they came on.
    `node_calls` take messages that belong to no link, from any node in `peers` (the caller's
    node ID is passed to the handler)."""
    node_verbs = node_verbs or {}
    node_calls = node_calls or {}

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"node": node_id})

    async def link_call(request: web.Request) -> web.Response:
        link_id, verb = request.match_info["link"], request.match_info["verb"]
        pool = pools.get(link_id)
        caller = peer_identity(request.transport)
        if pool is None:
            return _error(404, f"node {node_id} has no link {link_id!r}")
        if caller != pool.cfg.peer:
            return _error(403, f"link {link_id} belongs to node {pool.cfg.peer}; the caller is {caller!r}")
        handler = {"offer": pool.on_offer, "keys": pool.on_keys, "allocate": pool.on_allocate,
                   "discard": pool.on_discard}.get(verb)
        if handler is None and verb in node_verbs:
            handler = functools.partial(node_verbs[verb], pool)
        if handler is None:
            return _error(404, f"no peer call {verb!r}")
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            return _error(400, "body is not JSON")
        except web.HTTPException as exc:      # 413: larger than client_max_size
            return _error(exc.status, exc.reason)
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        return await _answer(link_id, handler, body)

    async def node_call(request: web.Request) -> web.Response:
        verb, caller = request.match_info["verb"], peer_identity(request.transport)
        if caller not in peers:
            return _error(403, f"node {node_id} takes node-level calls from its peers only; the caller is {caller!r}")
        handler = node_calls.get(verb)
        if handler is None:
            return _error(404, f"no node-level peer call {verb!r}")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        return await _answer(f"(node call {verb})", functools.partial(handler, caller), body)

    async def _answer(link_id: str, handler, body: dict) -> web.Response:
        try:
            return web.json_response(await handler(body))
        except BadMessage as exc:
            return _error(400, str(exc))
        except SdnRefused as exc:  # the SDN agent said no and changed nothing: tell the other agent why
            return web.json_response({"message": str(exc), "refused": exc.tag}, status=409)
        except PoolExhausted as exc:
            return _error(503, str(exc))
        except RelayRejected as exc:
            return _error(400, str(exc))
        except CarveConflict as exc:
            log.error("link %s: %s", link_id, exc)
            return _error(409, str(exc))
        except RelayFailed as exc:  # a hop further on failed: say which, so the origin routes around it
            return web.json_response({"message": str(exc), "failed_link": list(exc.link),
                                      "exhausted": exc.exhausted}, status=502)
        except QkdnodeError as exc:  # e.g. this node's device failed while confirming an offer
            return _error(502, str(exc))

    app = web.Application(client_max_size=PEER_MAX_BODY)
    app.router.add_get("/peer/v1/health", health)
    app.router.add_post("/peer/v1/links/{link}/{verb}", link_call)
    app.router.add_post("/peer/v1/node/{verb}", node_call)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


# -- message checking, shared by the handlers in links.py

def field(body: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadMessage(f"field {name!r} missing or of the wrong type")
    return value


def ranges_of(item: Any) -> list[tuple[str, int, int]]:
    raw = item.get("ranges") if isinstance(item, dict) else None
    if not isinstance(raw, list) or not raw:
        raise BadMessage("each key needs a non-empty 'ranges' array")
    out = []
    for r in raw:
        if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in r[1:]) and 0 <= r[1] < r[2]):
            raise BadMessage("a range is [block_ID, start, end] with 0 <= start < end")
        out.append((r[0], r[1], r[2]))
    return out
