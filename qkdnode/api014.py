"""Northbound ETSI GS QKD 014 v1.1.1: status, enc_keys and dec_keys (GET and POST) for SAEs.

The caller's SAE ID is the commonName of its verified client certificate. An SAE may call
only the node it is attached to (the SAE registry in the config). Every non-200 answer is an
ETSI Error object. Requests are checked whole before anything changes: a bad request takes
no key, and a 503 for lack of key takes none either.
"""

from __future__ import annotations

import binascii
import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

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

log = logging.getLogger("qkdnode.api014")

PREFIX = "/api/v1/keys"
ENC_FIELDS = {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory", "extension_optional"}
DEC_FIELDS = {"key_IDs", "key_IDs_extension"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, **details: Any):
        super().__init__(message)
        self.status, self.message = status, message
        self.details = [details] if details else []


def _error(status: int, message: str, details: list | None = None) -> web.Response:
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = details
    return web.json_response(body, status=status)


def make_api_app(node: "Node") -> web.Application:
    cfg, metrics = ConfigInForce(node), node.metrics
    limits = node.limits  # [limits], shared with ETSI 004 and SKIP: 429 before anything is taken
    counted: dict[tuple[str, int], Any] = {}  # the metrics' labelled children, looked up once
    timed: dict[str, Any] = {}
    served: dict[str, Any] = {}  # looked up at the first key served (a series appears only then)

    def count_served(call: str, n: int) -> None:
        counter = served.get(call)
        if counter is None:
            counter = served[call] = metrics.keys_served.labels(call)
        counter.inc(n)

    @web.middleware
    async def errors(request: web.Request, handler):
        call = request.match_info.route.name or "other"
        start = time.perf_counter()
        try:
            resp = await handler(request)
        except ApiError as exc:
            resp = _error(exc.status, exc.message, exc.details)
        except LimitExceeded as exc:
            resp = _error(429, str(exc), [{"retry_after_seconds": exc.retry_after}])
            resp.headers["Retry-After"] = str(int(exc.retry_after))
        except web.HTTPException as exc:  # 404, 405, 413 from aiohttp itself: still an Error object
            resp = _error(exc.status, exc.reason)
        requests = counted.get((call, resp.status))
        if requests is None:
            requests = counted[call, resp.status] = metrics.requests.labels(call, str(resp.status))
        latency = timed.get(call)
        if latency is None:
            latency = timed[call] = metrics.latency.labels(call)
        requests.inc()
        latency.observe(time.perf_counter() - start)
        return resp

    def caller_of(request: web.Request) -> str:
        try:
            return node.caller(request.transport)  # LimitExceeded: 429 in the middleware
        except NotAuthorized as exc:
            raise ApiError(401, str(exc)) from None

    def check_slaves(master: str, slaves: list[str]) -> None:
        """Slaves are registered SAEs of other nodes (adjacent or not: keys are relayed)."""
        saes, node_id = cfg.saes, cfg.node_id  # (the config in force, read once)
        for s in slaves:
            if s not in saes:
                raise ApiError(400, f"unknown SAE ID {s!r}", parameter="slave_SAE_ID", value=s)
        if master in slaves:
            raise ApiError(400, f"SAE {master} cannot be its own slave")
        if any(saes[s] == node_id for s in slaves):
            raise ApiError(400, "every slave SAE must be attached to another node than the master SAE's "
                                f"(node {cfg.node_id})")

    def limits_check(number: Any, size: Any, extra_slaves: list[str]) -> None:
        k = cfg.keys
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= k.max_key_per_request:
            raise ApiError(400, f"number must be an integer from 1 to {k.max_key_per_request}", parameter="number",
                           value=number)
        if not isinstance(size, int) or isinstance(size, bool) or size % 8 or \
                not k.min_key_size <= size <= k.max_key_size:
            raise ApiError(400, f"size must be a multiple of 8 from {k.min_key_size} to {k.max_key_size} (bits)",
                           parameter="size", value=size)
        if len(extra_slaves) > k.max_SAE_ID_count:
            raise ApiError(400, f"at most {k.max_SAE_ID_count} additional_slave_SAE_IDs",
                           parameter="additional_slave_SAE_IDs")

    async def body_of(request: web.Request, allowed: set[str]) -> dict:
        try:
            body = json.loads(await request.read() or b"{}")
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        return body

    def query_of(request: web.Request, allowed: set[str]) -> dict[str, str]:
        unknown = sorted(set(request.query) - allowed)
        if unknown:
            raise ApiError(400, f"unknown query parameter(s) {unknown}; allowed: {sorted(allowed)}")
        return dict(request.query)

    def query_int(q: dict[str, str], name: str, default: int) -> int:
        if name not in q:
            return default
        text = q[name]
        if not (text.isascii() and text.isdigit()) or len(text) > 18:  # '²' is a digit to str.isdigit
            raise ApiError(400, f"{name} must be a decimal integer", parameter=name, value=text)
        return int(text)

    # -- status

    async def status(request: web.Request) -> web.Response:
        master = caller_of(request)
        slave = request.match_info["sae"]
        check_slaves(master, [slave])
        target = cfg.saes[slave]
        pool = node.pool_to(target)
        if pool is not None:
            await pool.refresh_gauge()
        ready, capacity = node.router.ready_bits_to(target)
        if pool is not None:  # the pair's stock (docs/vault.md) is stored key too, held beside the pool's target
            ready += pool.stock_bits_for(master, [slave])
            capacity = max(capacity, ready)
        k = cfg.keys
        return web.json_response({
            "source_KME_ID": cfg.node_id, "target_KME_ID": target,
            "master_SAE_ID": master, "slave_SAE_ID": slave,
            "key_size": k.key_size, "stored_key_count": ready // k.key_size,
            "max_key_count": capacity // k.key_size,
            "max_key_per_request": k.max_key_per_request, "max_key_size": k.max_key_size,
            "min_key_size": k.min_key_size, "max_SAE_ID_count": k.max_SAE_ID_count,
        })

    # -- enc_keys

    async def enc_keys(request: web.Request) -> web.Response:
        master = caller_of(request)
        slave = request.match_info["sae"]
        extra: list[str] = []
        if request.method == "GET":
            q = query_of(request, {"number", "size"})
            number, size = query_int(q, "number", 1), query_int(q, "size", cfg.keys.key_size)
        else:
            body = await body_of(request, ENC_FIELDS)
            number, size = body.get("number", 1), body.get("size", cfg.keys.key_size)
            extra = body.get("additional_slave_SAE_IDs", [])
            if not isinstance(extra, list) or not all(isinstance(s, str) for s in extra) or \
                    len(set(extra)) != len(extra) or slave in extra:
                raise ApiError(400, "additional_slave_SAE_IDs must be an array of distinct SAE IDs other than "
                                    "the slave in the path", parameter="additional_slave_SAE_IDs")
            for name in ("extension_mandatory", "extension_optional"):
                ext = body.get(name, [])
                if not isinstance(ext, list) or not all(isinstance(e, dict) for e in ext):
                    raise ApiError(400, f"{name} must be an array of objects", parameter=name)
            mandatory = sorted({n for e in body.get("extension_mandatory", []) for n in e})
            if mandatory:
                raise ApiError(400, f"unsupported mandatory extension(s): {mandatory}",
                               parameter="extension_mandatory")
        limits_check(number, size, extra)
        slaves = [slave, *extra]
        check_slaves(master, slaves)
        try:
            with limits.key_bits(master, number * size):
                handouts = await node.hand_out(master, slaves, number, size)
        except (PoolExhausted, NoRoute) as exc:
            raise ApiError(503, f"not enough key: {exc}") from None
        except (PeerUnavailable, PeerRejected, CarveConflict) as exc:
            log.warning("enc_keys for %s: %s", master, exc)
            raise ApiError(503, f"no key handed out: {exc}") from None
        except QkdnodeError as exc:
            log.error("enc_keys for %s: %s", master, exc)
            raise ApiError(503, f"no key handed out: {exc}") from None
        count_served("enc_keys", len(handouts))
        return _key_container([(h.key_ID, h.bits) for h in handouts])

    # -- dec_keys

    async def dec_keys(request: web.Request) -> web.Response:
        slave = caller_of(request)
        master = request.match_info["sae"]
        if request.method == "GET":
            q = query_of(request, {"key_ID"})
            if "key_ID" not in q:
                raise ApiError(400, "key_ID is required", parameter="key_ID")
            ids = [q["key_ID"]]
        else:
            body = await body_of(request, DEC_FIELDS)
            items = body.get("key_IDs")
            if not isinstance(items, list) or not items:
                raise ApiError(400, "key_IDs must be a non-empty array", parameter="key_IDs")
            if not all(isinstance(i, dict) and set(i) <= {"key_ID", "key_ID_extension"} for i in items):
                raise ApiError(400, "each key_IDs entry is an object with key_ID", parameter="key_IDs")
            ids = [i.get("key_ID") for i in items]
        if len(ids) > cfg.keys.max_key_per_request:
            raise ApiError(400, f"at most {cfg.keys.max_key_per_request} key_IDs per request", parameter="key_IDs")
        for key_id in ids:
            if not isinstance(key_id, str) or not _is_uuid(key_id):
                raise ApiError(400, f"key_ID {key_id!r} is not a UUID", parameter="key_ID", value=str(key_id))
        if len(set(ids)) != len(ids):
            raise ApiError(400, "a key_ID is named twice", parameter="key_IDs")
        if master not in cfg.saes:
            raise ApiError(400, f"unknown master SAE ID {master!r}", parameter="master_SAE_ID")
        try:
            keys = await node.deliver(slave, master, ids)
        except UnknownKey as exc:
            raise ApiError(400, str(exc), parameter="key_ID", value=exc.key_id) from None
        except NotYourKey as exc:
            raise ApiError(401, str(exc), parameter="key_ID", value=exc.key_id) from None
        count_served("dec_keys", len(keys))
        return _key_container(keys)

    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    app.router.add_get(PREFIX + "/{sae}/status", status, name="status")
    app.router.add_route("GET", PREFIX + "/{sae}/enc_keys", enc_keys, name="enc_keys")
    app.router.add_route("POST", PREFIX + "/{sae}/enc_keys", enc_keys)
    app.router.add_route("GET", PREFIX + "/{sae}/dec_keys", dec_keys, name="dec_keys")
    app.router.add_route("POST", PREFIX + "/{sae}/dec_keys", dec_keys)
    return app


_PLAIN_ID = re.compile(r"[0-9A-Za-z-]{1,64}").fullmatch  # needs no escaping in JSON


def _key_container(keys: list[tuple[str, bytes | bytearray]]) -> web.Response:
    """The Key container: the same bytes as web.json_response({"keys": [...]}) gives, written out
    (json.dumps and its encoder cost ~2 us of a request's ~4 here); an ID that would need escaping
    goes through json.dumps."""
    items = []
    for key_id, bits in keys:
        quoted = f'"{key_id}"' if _PLAIN_ID(key_id) else json.dumps(key_id)
        items.append(f'{{"key_ID": {quoted}, "key": "{binascii.b2a_base64(bits, newline=False).decode("ascii")}"}}')
    return web.Response(text=f'{{"keys": [{", ".join(items)}]}}', content_type="application/json")


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False
