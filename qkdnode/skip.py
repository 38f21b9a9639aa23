"""Northbound SKIP, the Secure Key Integration Protocol (draft-cisco-skip), for routers.

A router (an IKEv2 peer importing a post-quantum pre-shared key) is an SAE: its SAE ID is its
client certificate's commonName and it is registered in `[saes]` like any other. SKIP's system
IDs are SAE IDs: `localSystemID` is the calling router, `remoteSystemID` the router at the other
end. The three calls map onto the node facade, so SKIP shares the pools, the vault, the audit
and the once-per-slave rule with ETSI 014 and 004:

    GET /capabilities                           what this node offers the caller
    GET /key?remoteSystemID=R2[&size=BITS]      a new key shared with R2: node.hand_out(R1, [R2])
    GET /key/{keyId}?remoteSystemID=R1          R2 fetches the same key: node.deliver(R2, R1)

keyId is the key's key_ID (a UUID) as 32 hexadecimal digits, key is the key in hexadecimal, as
the draft has them. Errors are JSON objects `{"message": ...}` with the HTTP status; no answer,
log line or metric ever holds key bits.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import Counter

from qkdnode.config import ConfigInForce
from qkdnode.errors import (
    CarveConflict,
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

if TYPE_CHECKING:
    from qkdnode.node import Node

log = logging.getLogger("qkdnode.skip")

DEFAULT_SIZE = 256  # bits, when the router names no size (the draft's default)
KEY_ID = re.compile(r"[0-9a-fA-F]{32}")


class SkipError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def _entity_info() -> str:
    try:
        return f"qkdnode {version('qkdnode')}"
    except PackageNotFoundError:
        return "qkdnode"


def make_skip_app(node: "Node") -> web.Application:
    cfg, metrics, limits = ConfigInForce(node), node.metrics, node.limits  # a SIGHUP may add SAEs
    requests = Counter("qkdnode_skip_requests_total", "SKIP requests by call and HTTP status", ["call", "status"],
                       registry=metrics.registry)
    entity = f"{_entity_info()}, trusted node {cfg.node_id}"

    @web.middleware
    async def errors(request: web.Request, handler):
        call = request.match_info.route.name or "other"
        try:
            resp = await handler(request)
        except SkipError as exc:
            resp = web.json_response({"message": exc.message}, status=exc.status)
            if exc.retry_after is not None:
                resp.headers["Retry-After"] = str(int(exc.retry_after))
        except web.HTTPException as exc:  # 404, 405 from aiohttp itself: still JSON
            resp = web.json_response({"message": exc.reason}, status=exc.status)
        requests.labels(call, str(resp.status)).inc()
        return resp

    def caller_of(request: web.Request) -> str:
        try:
            return node.caller(request.transport, noun="system")  # [limits]: shared with ETSI 014 and 004
        except NotAuthorized as exc:
            raise SkipError(401, str(exc)) from None
        except LimitExceeded as exc:
            raise SkipError(429, str(exc), exc.retry_after) from None

    def query_of(request: web.Request, allowed: set[str], required: set[str]) -> dict[str, str]:
        unknown = sorted(set(request.query) - allowed)
        if unknown:
            raise SkipError(400, f"unknown query parameter(s) {unknown}; allowed: {sorted(allowed)}")
        repeated = sorted(k for k in set(request.query) if len(request.query.getall(k)) > 1)
        if repeated:
            raise SkipError(400, f"query parameter(s) {repeated} given more than once")
        missing = sorted(required - set(request.query))
        if missing:
            raise SkipError(400, f"missing query parameter(s) {missing}")
        return dict(request.query)

    def remote_of(caller: str, remote: str) -> str:
        if remote not in cfg.saes:
            raise SkipError(400, f"remoteSystemID {remote[:80]!r} is not a registered system")
        if remote == caller:
            raise SkipError(400, "remoteSystemID names the caller itself")
        if cfg.saes[remote] == cfg.node_id:
            raise SkipError(400, f"remoteSystemID {remote} is attached to this node ({cfg.node_id}): no QKD link "
                                 "joins the two systems")
        return remote

    async def capabilities(request: web.Request) -> web.Response:
        caller = caller_of(request)
        query_of(request, set(), set())
        remotes = sorted(s for s, n in cfg.saes.items() if n != cfg.node_id)
        return web.json_response({"entityInfo": entity, "localSystemID": caller, "remoteSystemID": remotes,
                                  "key": True, "entropy": False})

    async def new_key(request: web.Request) -> web.Response:
        caller = caller_of(request)
        q = query_of(request, {"remoteSystemID", "size"}, {"remoteSystemID"})
        remote = remote_of(caller, q["remoteSystemID"])
        size = DEFAULT_SIZE
        if "size" in q:
            text = q["size"]
            if not (text.isascii() and text.isdigit()) or len(text) > 9:  # '²' is a digit to str.isdigit
                raise SkipError(400, "size must be a decimal number of bits")
            size = int(text)
        k = cfg.keys
        if size % 8 or not k.min_key_size <= size <= k.max_key_size:
            raise SkipError(400, f"size must be a multiple of 8 from {k.min_key_size} to {k.max_key_size} (bits)")
        start = time.perf_counter()
        try:
            with limits.key_bits(caller, size):  # the day's quota, shared with ETSI 014 and 004
                (h,) = await node.hand_out(caller, [remote], 1, size)
        except LimitExceeded as exc:
            raise SkipError(429, str(exc), exc.retry_after) from None
        except (PoolExhausted, NoRoute) as exc:
            raise SkipError(503, f"not enough key toward {remote}: {exc}") from None
        except (PeerUnavailable, PeerRejected, CarveConflict) as exc:
            log.warning("SKIP key for %s: %s", caller, exc)
            raise SkipError(503, f"no key handed out: {exc}") from None
        except QkdnodeError as exc:
            log.error("SKIP key for %s: %s", caller, exc)
            raise SkipError(503, f"no key handed out: {exc}") from None
        metrics.keys_served.labels("skip_key").inc()
        log.debug("SKIP key for %s and %s in %.1f ms", caller, remote, (time.perf_counter() - start) * 1000)
        return web.json_response({"keyId": uuid.UUID(h.key_ID).hex, "key": h.bits.hex()})

    async def key_by_id(request: web.Request) -> web.Response:
        caller = caller_of(request)
        key_id = request.match_info["keyId"]
        q = query_of(request, {"remoteSystemID"}, {"remoteSystemID"})
        if not KEY_ID.fullmatch(key_id):
            raise SkipError(400, "keyId must be 32 hexadecimal digits")
        remote = remote_of(caller, q["remoteSystemID"])
        key_uuid = str(uuid.UUID(hex=key_id))
        try:
            ((_, bits),) = await node.deliver(caller, remote, [key_uuid])
        except UnknownKey as exc:
            state = "was already fetched" if exc.was_known else "is not known at this node"
            raise SkipError(404, f"keyId {key_id.lower()} {state}") from None
        except NotYourKey:
            raise SkipError(403, f"keyId {key_id.lower()} was not made for {caller} by {remote}") from None
        metrics.keys_served.labels("skip_key_by_id").inc()
        return web.json_response({"keyId": key_id.lower(), "key": bits.hex()})

    app = web.Application(middlewares=[errors], client_max_size=4 * 1024)
    app.router.add_get("/capabilities", capabilities, name="capabilities")
    app.router.add_get("/key", new_key, name="key")
    app.router.add_get("/key/{keyId}", key_by_id, name="key_by_id")
    return app
