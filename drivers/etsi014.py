"""ETSI GS QKD 014 key client: the node as an SAE of a vendor KME (ID Quantique, Toshiba).

Mutual TLS with hostname verification (`server_hostname` when the KME's certificate names a
host and the config reaches it by IP); `status` read at connect, and again before a fetch
that what it last said (less the key taken since) does not cover, so `number` and `size` stay
inside what the KME allows (a 503 or 400 to a fetch made without it reads it and asks again); a timeout per call, retries with
exponential backoff on timeouts, refused connections and 503; 400, 401 and a KME certificate
that fails verification raised at once as distinct errors. Key bits leave this module only inside KeyBlock objects.

Telemetry (`telemetry()`, for the node's metrics): ETSI 014 carries no QBER and no key rate. The
driver reads them from the status call's `status_extension` object when the KME puts them there
as `qber` (a fraction) and `secret_key_rate_bps` (our KME emulator does; no vendor we know of
does: an ID Quantique KME reports QBER over SNMP). Without them QBER is not reported, and the
secret key rate is estimated from key arrival over the last `ARRIVAL_WINDOW` seconds: key taken
from the KME by this node plus the change in what it holds. While the KME's store is full it
may be discarding key, so then the rate is not reported either.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import re
import time
import tomllib
import uuid
from collections import deque
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp

from qkdnode.errors import (
    DeviceProtocolError,
    DeviceRejected,
    DeviceUnauthorized,
    DeviceUnavailable,
    DeviceUntrusted,
    DriverError,
)
from qkdnode.interfaces import DeviceHealth, KeyBlock, LinkTelemetry, SourceStatus, driver_settings
from qkdnode.tlsutil import checked, client_context

log = logging.getLogger("drivers.etsi014")

PROFILES: dict[str, dict[str, Any]] = tomllib.loads(files("drivers").joinpath("etsi014_profiles.toml").read_text())
_STATUS_INTS = ("key_size", "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
                "min_key_size")
_SETTINGS = {"profile", "url", "peer_sae_id", "sae_id", "ca", "cert", "key", "server_hostname", "key_size",
             "timeout", "retries", "backoff", "backoff_max", "auth_400_pattern"}
ARRIVAL_WINDOW = 30.0  # seconds of status history behind the estimated secret key rate


class Etsi014KeySource:
    """One end of a vendor QKD link, reached as an SAE over ETSI GS QKD 014."""

    def __init__(self, *, url: str, peer_sae_id: str, ca: Path, cert: Path, key: Path, profile: str = "idq",
                 sae_id: str | None = None, server_hostname: str | None = None, key_size: int | None = None,
                 timeout: float, retries: int, backoff: float, backoff_max: float, auth_400_pattern: str = "",
                 ssl_context=None):
        self.name = f"etsi014/{profile}"
        self.base = url.rstrip("/") + "/api/v1/keys"
        self.peer_sae_id = peer_sae_id
        self.sae_id = sae_id
        self.server_hostname = server_hostname
        self.wanted_key_size = key_size
        self.timeout, self.retries = timeout, retries
        self.backoff, self.backoff_max = backoff, backoff_max
        self.auth_400_pattern = auth_400_pattern.lower()
        self._ssl = ssl_context or client_context(ca, cert, key)
        self._session: aiohttp.ClientSession | None = None
        self.last_status: SourceStatus | None = None
        self.health = DeviceHealth()
        self._taken_bits = 0  # key this end took from the KME, for the arrival estimate
        self._credit_bits = 0  # key the KME held as of last_status, less what this end took since
        self._arrivals: deque[tuple[float, int, int]] = deque()  # (time, bits the KME holds, _taken_bits)

    @classmethod
    def check_settings(cls, settings: dict[str, Any], *, file, key: str) -> dict[str, Any]:
        """Names, types and the profile of a link's settings, merged over the profile's defaults.
        Touches no file: `qkdnode check-config --no-files` runs it on a staging host."""
        _, err = driver_settings(settings, file=file, key=key, known=_SETTINGS, defaults={})
        profile = settings.get("profile", "idq")
        if profile not in PROFILES:
            raise err("profile", f"one of {', '.join(PROFILES)}", profile)
        merged = {**PROFILES[profile], **settings, "profile": profile}
        for name in ("url", "peer_sae_id", "ca", "cert", "key"):
            if not isinstance(merged.get(name), str) or not merged[name]:
                raise err(name, "a non-empty string", merged.get(name), missing=name not in merged)
        if not merged["url"].startswith("https://"):
            raise err("url", "the KME's https:// base URL", merged["url"])
        for name, kind in (("timeout", (int, float)), ("backoff", (int, float)), ("backoff_max", (int, float)),
                           ("retries", int)):
            if not isinstance(merged[name], kind) or isinstance(merged[name], bool) or merged[name] < 0:
                raise err(name, "a non-negative number", merged[name])
        ks = merged.get("key_size")
        if ks is not None and (not isinstance(ks, int) or isinstance(ks, bool) or ks <= 0 or ks % 8):
            raise err("key_size", "a positive multiple of 8 (bits)", ks)
        for name in ("sae_id", "server_hostname", "auth_400_pattern"):
            if name in merged and not isinstance(merged[name], str):
                raise err(name, "a string", merged[name])
        return merged

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, file, key: str) -> "Etsi014KeySource":
        m = cls.check_settings(settings, file=file, key=key)
        paths = {n: Path(m[n]) for n in ("ca", "cert", "key")}
        ctx = checked(file, client_context, *((f"{key}.{n}", paths[n]) for n in ("ca", "cert", "key")))
        return cls(url=m["url"], peer_sae_id=m["peer_sae_id"], profile=m["profile"], sae_id=m.get("sae_id"),
                   server_hostname=m.get("server_hostname"), key_size=m.get("key_size"),
                   timeout=float(m["timeout"]), retries=m["retries"], backoff=float(m["backoff"]),
                   backoff_max=float(m["backoff_max"]), auth_400_pattern=m["auth_400_pattern"], ssl_context=ctx,
                   **paths)

    # -- lifecycle

    async def connect(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl, limit=8))
        await self.status()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the three calls

    async def status(self) -> SourceStatus:
        return (await self._read_status())[0]

    async def _read_status(self) -> tuple[SourceStatus, dict]:
        body = await self._call("GET", f"{self.peer_sae_id}/status")
        try:
            return self._parse_status(body)
        except DeviceProtocolError as exc:
            self.health.failed(exc)  # it answered, but not what a KME answers
            raise

    def _parse_status(self, body: Any) -> tuple[SourceStatus, dict]:
        if not isinstance(body, dict):
            raise DeviceProtocolError(f"{self.base}: status is not a JSON object")
        values = {}
        for name in _STATUS_INTS:
            v = body.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise DeviceProtocolError(f"{self.base}: status field {name} should be a non-negative integer, "
                                          f"found {v!r}")
            values[name] = v
        st = SourceStatus(**values)
        if st.max_key_per_request < 1 or not st.min_key_size <= st.max_key_size:
            raise DeviceProtocolError(f"{self.base}: status limits make no sense: {values}")
        self.last_status = st
        self._credit_bits = st.stored_key_count * st.key_size  # key the KME holds for us, less what we take
        ext = body.get("status_extension")
        return st, ext if isinstance(ext, dict) else {}

    async def telemetry(self) -> LinkTelemetry:
        st, ext = await self._read_status()
        now, held = time.monotonic(), st.stored_key_count * st.key_size
        self._arrivals.append((now, held, self._taken_bits))
        while len(self._arrivals) > 2 and now - self._arrivals[0][0] > ARRIVAL_WINDOW:
            self._arrivals.popleft()
        qber = _figure(ext.get("qber"), 0.0, 1.0)
        skr = _figure(ext.get("secret_key_rate_bps"), 0.0, 1e13)
        if skr is None and st.stored_key_count < st.max_key_count:
            t0, held0, taken0 = self._arrivals[0]
            if now > t0:
                skr = max(0.0, (held - held0 + self._taken_bits - taken0) / (now - t0))
        state = ext.get("state") if isinstance(ext.get("state"), str) and ext["state"].isprintable() else None
        return LinkTelemetry(state=(state or ("no-key" if st.stored_key_count == 0 else "running"))[:40],
                             qber=qber, secret_key_rate_bps=skr)

    def key_size(self, st: SourceStatus) -> int:
        """The size we ask for: ours if set, else the KME's default; kept inside its limits."""
        size = self.wanted_key_size or st.key_size
        size = min(max(size, st.min_key_size), st.max_key_size)
        return size - size % 8 if size >= 8 else 8

    async def fetch_new(self, max_bits: int) -> list[KeyBlock]:
        # The KME's last status, less what we took since, still covering the whole request: ask
        # for the keys without reading the status again (its key only grows, unless another SAE
        # takes it). If the KME answers that it has not enough key (503) or refuses the request
        # (400: its limits changed), the status is read and the request made as below.
        st = self.last_status
        if st is not None:
            size = self.key_size(st)
            number = min(st.max_key_per_request, max(1, max_bits // size))
            if self._credit_bits >= number * size:
                try:
                    body = await self._call("POST", f"{self.peer_sae_id}/enc_keys", {"number": number, "size": size},
                                            retry_busy=False)
                except (_KmeBusy, DeviceRejected):
                    pass
                else:
                    return self._took(self._parse_keys(body, size, expect_ids=None))
        st = await self.status()
        size = self.key_size(st)
        number = min(st.max_key_per_request, st.stored_key_count * st.key_size // size, max(1, max_bits // size))
        if number <= 0:
            return []
        body = await self._call("POST", f"{self.peer_sae_id}/enc_keys", {"number": number, "size": size})
        return self._took(self._parse_keys(body, size, expect_ids=None))

    def _took(self, blocks: list[KeyBlock]) -> list[KeyBlock]:
        bits = sum(8 * len(b.bits) for b in blocks)
        self._taken_bits += bits
        self._credit_bits -= bits
        return blocks

    async def fetch_by_ids(self, block_ids: list[str]) -> list[KeyBlock]:
        st = self.last_status or await self.status()
        out: list[KeyBlock] = []
        for i in range(0, len(block_ids), st.max_key_per_request):
            chunk = block_ids[i:i + st.max_key_per_request]
            body = await self._call("POST", f"{self.peer_sae_id}/dec_keys",
                                    {"key_IDs": [{"key_ID": k} for k in chunk]})
            out.extend(self._parse_keys(body, None, expect_ids=chunk))
        self._taken_bits += sum(8 * len(b.bits) for b in out)
        return out

    # -- transport

    async def _call(self, method: str, path: str, payload: Any = None, retry_busy: bool = True) -> Any:
        if self._session is None:
            raise DeviceUnavailable(f"{self.base}: not connected")
        url = f"{self.base}/{path}"
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                answer = await self._once(method, url, payload)
            except DeviceRejected:
                self.health.ok()  # the KME answered properly; the request was out of its limits
                raise
            except DeviceUnavailable as exc:
                if not retry_busy and isinstance(exc, _KmeBusy):  # the caller has another way to go
                    raise
                if attempt == self.retries:
                    self.health.failed(exc)
                    raise
                log.warning("%s %s; retrying in %.2f s", method, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
            except DriverError as exc:
                self.health.failed(exc)
                raise
            else:
                self.health.ok()
                return answer

    async def _once(self, method: str, url: str, payload: Any) -> Any:
        try:
            async with self._session.request(
                method, url, json=payload, server_hostname=self.server_hostname,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                text = await resp.text(errors="replace")  # a body that is not UTF-8 is garbage, not a crash
                status = resp.status
        except asyncio.TimeoutError:
            raise DeviceUnavailable(f"{url}: no answer within {self.timeout} s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise DeviceUntrusted(f"{url}: TLS: the KME's certificate was not accepted: {exc.certificate_error} "
                                  "(check the CA and server_hostname)") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # Under TLS 1.3 a refused client certificate shows up here, not in the handshake.
            raise DeviceUnavailable(f"{url}: connection dropped ({exc.__class__.__name__}); the KME may have "
                                    "refused our client certificate") from None
        except aiohttp.ClientError as exc:
            raise DeviceUnavailable(f"{url}: {exc.__class__.__name__}: {exc}") from None
        if status == 200:
            try:
                return json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
                raise DeviceProtocolError(f"{url}: 200 with a body that is not JSON") from None
        message = _error_message(text)
        if status == 401 or (status == 400 and self.auth_400_pattern and self.auth_400_pattern in message.lower()):
            raise DeviceUnauthorized(f"{url}: {status}: {message}")
        if status == 400:
            raise DeviceRejected(f"{url}: 400: {message}")
        if status == 503:
            raise _KmeBusy(f"{url}: 503: {message}")
        raise DeviceProtocolError(f"{url}: unexpected HTTP {status}: {message}")

    def _parse_keys(self, body: Any, size: int | None, expect_ids: list[str] | None) -> list[KeyBlock]:
        try:
            return self._parse_key_container(body, size, expect_ids)
        except DeviceProtocolError as exc:
            self.health.failed(exc)
            raise

    def _parse_key_container(self, body: Any, size: int | None, expect_ids: list[str] | None) -> list[KeyBlock]:
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(keys, list):
            raise DeviceProtocolError(f"{self.base}: key container without a 'keys' array")
        blocks: dict[str, KeyBlock] = {}
        for i, item in enumerate(keys):
            if not isinstance(item, dict) or not isinstance(item.get("key_ID"), str) or \
                    not isinstance(item.get("key"), str):
                raise DeviceProtocolError(f"{self.base}: keys[{i}] lacks a string key_ID or key")
            key_id = item["key_ID"]
            try:
                if _CANONICAL_UUID(key_id) is None:  # the usual form checked fast; any other as uuid.UUID does
                    uuid.UUID(key_id)
                # = base64.b64decode(key, validate=True), without its Python wrapper
                bits = bytearray(binascii.a2b_base64(item["key"], strict_mode=True))
            except (ValueError, binascii.Error):
                raise DeviceProtocolError(f"{self.base}: keys[{i}] has a key_ID that is no UUID or a key that "
                                          "is no base64") from None
            if size is not None and len(bits) * 8 != size:
                raise DeviceProtocolError(f"{self.base}: keys[{i}] has {len(bits) * 8} bits, asked for {size}")
            if not bits or key_id in blocks:
                raise DeviceProtocolError(f"{self.base}: keys[{i}] is empty or repeats a key_ID")
            blocks[key_id] = KeyBlock(key_id, bits)
        if expect_ids is not None:
            if set(blocks) != set(expect_ids):
                raise DeviceProtocolError(f"{self.base}: dec_keys answered other key_IDs than asked")
            return [blocks[k] for k in expect_ids]
        if not blocks:
            raise DeviceProtocolError(f"{self.base}: enc_keys answered no keys")
        return list(blocks.values())



class _KmeBusy(DeviceUnavailable):
    """The KME answered 503 (out of service, or not enough key for the request)."""


# A key_ID in the canonical 8-4-4-4-12 hex form (what every KME sends); uuid.UUID accepts it too.
_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}").fullmatch

def _figure(value: Any, lo: float, hi: float) -> float | None:
    """A number a KME reported in status_extension, if it is one and in range; else not reported."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        return None
    return float(value)


def _error_message(text: str) -> str:
    """The `message` of an ETSI 014 Error object, or a short, printable excerpt of the body."""
    try:
        body = json.loads(text)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return body["message"][:300]
    except (ValueError, RecursionError):
        pass
    return repr(text[:120])
