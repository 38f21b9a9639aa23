"""Emulated vendor KME pair: the two ends of one QKD link, speaking ETSI GS QKD 014 over HTTPS.

Both servers require a client certificate from the CA and take the caller's SAE ID from its
commonName. They share one key stream that accrues at a set secret key rate up to
`max_key_count` keys. `enc_keys` at one end takes key from the stream and leaves it waiting
at the other end, where `dec_keys` hands it out once. `status` tells the truth about the
stream. Profiles imitate the vendors' limits; faults are set per end on command.

Beyond what a vendor's KME says over ETSI 014, `status` carries the link's QBER and secret key
rate in its `status_extension` object (`qber`, `secret_key_rate_bps`): an emulator-only habit
that gives the node's etsi014 driver true figures to report (docs/metrics.md). `qber.force()`
makes the link's QBER exceed a threshold.

This module is deliberately independent of qkdnode's own ETSI 014 server: it plays a vendor's
box, and a shared parser would hide a shared bug.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import ssl
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from hil.qber import QberDrift

PROFILES = {
    # No vendor publishes its limits; these are in the ranges seen on published demo KMEs.
    "idq": dict(key_size=256, min_key_size=256, max_key_size=256, max_key_per_request=8, max_SAE_ID_count=0),
    "toshiba": dict(key_size=256, min_key_size=128, max_key_size=1024, max_key_per_request=128,
                    max_SAE_ID_count=0),
}


class KeyStream:
    """Secret key shared by the two ends of a link, accruing at `rate_bps` (None: unlimited)."""

    def __init__(self, key_size: int, max_key_count: int, rate_bps: float | None, initial_keys: int = 0):
        self.key_size = key_size
        self.cap_bits = key_size * max_key_count
        self.rate_bps = rate_bps
        self._bits = float(min(initial_keys * key_size, self.cap_bits))
        self._at = time.monotonic()

    def available_bits(self) -> int:
        if self.rate_bps is None:
            return self.cap_bits
        now = time.monotonic()
        self._bits = min(self.cap_bits, self._bits + (now - self._at) * self.rate_bps)
        self._at = now
        return int(self._bits)

    def take(self, nbits: int) -> bytes | None:
        if self.available_bits() < nbits:
            return None
        if self.rate_bps is not None:
            self._bits -= nbits
        return secrets.token_bytes(nbits // 8)


@dataclass
class Faults:
    """Faults of one end, set by tests and the testbed: `delay` seconds before each answer,
    `down` answers 503 to everything, `hang` never answers, `garbage` answers non-JSON,
    `corrupt` flips one bit of every key this end hands out (a link whose ends disagree),
    `disconnect` drops every connection without an answer, `reply` answers these bytes (200,
    JSON) to every call (a hostile or broken KME), `tls` is a server context this end presents
    instead of its own at the next handshakes (a certificate the client does not trust: TLS
    failure); with `tls` set, connections already open are dropped so that clients handshake
    again."""

    delay: float = 0.0
    down: bool = False
    hang: bool = False
    garbage: bool = False
    corrupt: bool = False
    disconnect: bool = False
    reply: bytes | None = None
    tls: ssl.SSLContext | None = None


@dataclass
class KmeEnd:
    kme_id: str
    sae_id: str
    waiting: dict[str, tuple[bytes, str, frozenset[str]]] = field(default_factory=dict)  # key_ID -> bits, master, slaves
    faults: Faults = field(default_factory=Faults)
    site: web.TCPSite | None = None
    port: int = 0


class KmePair:
    def __init__(self, *, sae_a: str, sae_b: str, profile: str = "idq", rate_bps: float | None = 10_000.0,
                 max_key_count: int = 4096, initial_keys: int = 0, kme_ids: tuple[str, str] = ("KME-A", "KME-B"),
                 **limits: int):
        self.limits = {**PROFILES[profile], **limits}
        self.stream = KeyStream(self.limits["key_size"], max_key_count, rate_bps, initial_keys)
        self.max_key_count = max_key_count
        self.ends = {"A": KmeEnd(kme_ids[0], sae_a), "B": KmeEnd(kme_ids[1], sae_b)}
        self.qber = QberDrift()
        self._runners: list[web.AppRunner] = []

    def other(self, side: str) -> KmeEnd:
        return self.ends["B" if side == "A" else "A"]

    def url(self, side: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.ends[side].port}"

    async def start(self, ssl_a: ssl.SSLContext, ssl_b: ssl.SSLContext, host: str = "127.0.0.1",
                    ports: tuple[int, int] = (0, 0)) -> None:
        for side, ctx, port in (("A", ssl_a, ports[0]), ("B", ssl_b, ports[1])):
            ctx.sni_callback = self._tls_fault(side)
            app = web.Application(middlewares=[self._faults_mw(side)])
            app.router.add_get("/api/v1/keys/{sae}/status", self._handler(side, self.status))
            app.router.add_route("*", "/api/v1/keys/{sae}/enc_keys", self._handler(side, self.enc_keys))
            app.router.add_route("*", "/api/v1/keys/{sae}/dec_keys", self._handler(side, self.dec_keys))
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)  # `hang` handlers never end
            await runner.setup()
            site = web.TCPSite(runner, host, port, ssl_context=ctx)
            await site.start()
            self._runners.append(runner)
            end = self.ends[side]
            end.site, end.port = site, site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    # -- plumbing

    def _tls_fault(self, side: str):
        def pick(sslobj, server_name, ctx):
            other = self.ends[side].faults.tls
            if other is not None:
                sslobj.context = other
        return pick

    def _faults_mw(self, side: str):
        @web.middleware
        async def mw(request, handler):
            f = self.ends[side].faults
            if f.disconnect or f.tls is not None:
                request.transport.abort()    # nothing reaches the client: the answer below is never sent
                return web.Response(status=503)
            if f.reply is not None:
                return web.Response(status=200, body=f.reply, content_type="application/json")
            if f.hang:
                await asyncio.Event().wait()
            if f.delay:
                await asyncio.sleep(f.delay)
            if f.down:
                return _error(503, "KME out of service")
            if f.garbage:
                return web.Response(status=200, text="<html>\x00\xff garbage", content_type="text/html")
            return await handler(request)
        return mw

    def _handler(self, side: str, fn):
        async def handle(request: web.Request) -> web.Response:
            caller = _cn(request)
            end = self.ends[side]
            if caller != end.sae_id:
                return _error(401, f"SAE {caller!r} is not registered at {end.kme_id}")
            try:
                return await fn(side, caller, request)
            except _Bad as exc:
                return _error(400, str(exc))
        return handle

    # -- the API

    async def status(self, side: str, caller: str, request: web.Request) -> web.Response:
        slave = request.match_info["sae"]
        if slave != self.other(side).sae_id:
            return _error(400, f"unknown SAE {slave!r}")
        return web.json_response({
            "source_KME_ID": self.ends[side].kme_id, "target_KME_ID": self.other(side).kme_id,
            "master_SAE_ID": caller, "slave_SAE_ID": slave, "key_size": self.limits["key_size"],
            "stored_key_count": self.stream.available_bits() // self.limits["key_size"],
            "max_key_count": self.max_key_count, "max_key_per_request": self.limits["max_key_per_request"],
            "max_key_size": self.limits["max_key_size"], "min_key_size": self.limits["min_key_size"],
            "max_SAE_ID_count": self.limits["max_SAE_ID_count"],
            "status_extension": self.status_extension(),
        })

    def status_extension(self) -> dict:
        ext = {"qber": self.qber.value()}
        if self.stream.rate_bps is not None:
            ext["secret_key_rate_bps"] = float(self.stream.rate_bps)
        return ext

    async def enc_keys(self, side: str, caller: str, request: web.Request) -> web.Response:
        slave = request.match_info["sae"]
        if slave != self.other(side).sae_id:
            return _error(400, f"unknown SAE {slave!r}")
        if request.method == "GET":
            number = _int(request.query.get("number", "1"), "number")
            size = _int(request.query.get("size", str(self.limits["key_size"])), "size")
        elif request.method == "POST":
            body = await _json(request)
            number, size = body.get("number", 1), body.get("size", self.limits["key_size"])
            if not isinstance(number, int) or not isinstance(size, int):
                raise _Bad("number and size must be integers")
            if body.get("additional_slave_SAE_IDs"):
                raise _Bad("this KME does not serve additional slave SAEs")
        else:
            return _error(405, "GET or POST")
        if not 1 <= number <= self.limits["max_key_per_request"]:
            raise _Bad(f"number must be 1..{self.limits['max_key_per_request']}")
        if size % 8 or not self.limits["min_key_size"] <= size <= self.limits["max_key_size"]:
            raise _Bad(f"size must be a multiple of 8 in {self.limits['min_key_size']}..{self.limits['max_key_size']}")
        bits = self.stream.take(number * size)
        if bits is None:
            return _error(503, "not enough key available")
        keys = []
        step = size // 8
        for i in range(number):
            key_id = str(uuid.uuid4())
            chunk = bits[i * step:(i + 1) * step]
            self.other(side).waiting[key_id] = (chunk, caller, frozenset([slave]))
            if self.ends[side].faults.corrupt:
                chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
            keys.append({"key_ID": key_id, "key": base64.b64encode(chunk).decode()})
        return web.json_response({"keys": keys})

    async def dec_keys(self, side: str, caller: str, request: web.Request) -> web.Response:
        master = request.match_info["sae"]
        if request.method == "GET":
            ids = [request.query.get("key_ID", "")]
        elif request.method == "POST":
            body = await _json(request)
            items = body.get("key_IDs")
            if not isinstance(items, list) or not items:
                raise _Bad("key_IDs must be a non-empty array")
            ids = [i.get("key_ID") if isinstance(i, dict) else None for i in items]
        else:
            return _error(405, "GET or POST")
        end = self.ends[side]
        for key_id in ids:
            entry = end.waiting.get(key_id) if isinstance(key_id, str) else None
            if entry is None or entry[1] != master or caller not in entry[2]:
                raise _Bad(f"key_ID {key_id!r} is not available")
        keys = []
        for key_id in ids:
            chunk = end.waiting.pop(key_id)[0]
            if end.faults.corrupt:
                chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
            keys.append({"key_ID": key_id, "key": base64.b64encode(chunk).decode()})
        return web.json_response({"keys": keys})


class _Bad(Exception):
    pass


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


def _int(text: str, name: str) -> int:
    if not text.isdigit():
        raise _Bad(f"{name} must be a positive integer")
    return int(text)


async def _json(request: web.Request) -> dict:
    try:
        body = json.loads(await request.text())
    except ValueError:
        raise _Bad("body is not JSON") from None
    if not isinstance(body, dict):
        raise _Bad("body must be a JSON object")
    return body


def _cn(request: web.Request) -> str | None:
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None
