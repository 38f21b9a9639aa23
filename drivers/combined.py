"""Key combining: one logical link made of two devices on one span (e.g. two vendors' DV pairs,
or a DV and a CV pair), whose key is the XOR of both. Whoever knows one device's key learns
nothing of the combined key, so trusting one vendor is not enough to break it.

The driver is a key source like any other, so agreement, pools, relay and the APIs work on
the combined link unchanged. Blocks are paired in arrival order: when one device gives smaller
blocks than the other, several of them are joined to cover one block of the other, and the
combined block is as long as the shorter side (the rest of the longer side is dropped). Its ID
names the parts, `{"a": [IDs], "b": [IDs]}` as compact JSON, so the other end of the link
fetches the same parts from its own two devices and combines them the same way. The leaked-bit
estimates of the parts add up, and the link pool's privacy amplification removes them. The
combined link's rate is the slower device's.

    [[links]]
    driver = "combined"
    [links.settings]
    parts = [ { driver = "etsi014", settings = { profile = "idq", ... } },
              { driver = "etsi014", settings = { profile = "toshiba", ... } } ]
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from pathlib import Path
from typing import Any

from qkdnode.errors import ConfigError, DeviceRejected
from qkdnode.interfaces import (DeviceHealth, KeyBlock, LinkTelemetry, SourceStatus, TelemetrySource, check_driver,
                                driver_settings, load_driver)

_SETTINGS = {"parts"}
_PATH_SETTINGS = ("ca", "cert", "key")


def _parts(settings: dict[str, Any], *, file, key: str) -> list[tuple[str, dict[str, Any], str]]:
    merged, err = driver_settings(settings, file=file, key=key, known=_SETTINGS, defaults={})
    parts = merged.get("parts")
    if not isinstance(parts, list) or len(parts) != 2:
        raise err("parts", "an array of exactly two tables {driver = NAME, settings = {...}}",
                  None if parts is None else f"{type(parts).__name__}", missing=parts is None)
    out = []
    for i, part in enumerate(parts):
        pkey = f"{key}.parts[{i}]"
        if not isinstance(part, dict) or set(part) - {"driver", "settings"} or not isinstance(part.get("driver"), str):
            raise ConfigError(file, pkey, "a table {driver = NAME, settings = {...}}", "something else")
        if part["driver"] == "combined":
            raise ConfigError(file, f"{pkey}.driver", "a device driver (combined links do not nest)", "combined")
        sub = part.get("settings", {})
        if not isinstance(sub, dict):
            raise ConfigError(file, f"{pkey}.settings", "a table of driver settings", type(sub).__name__)
        sub = dict(sub)
        for name in _PATH_SETTINGS:  # relative paths are relative to the config file, as everywhere
            if isinstance(sub.get(name), str) and file is not None and not Path(sub[name]).is_absolute():
                sub[name] = str((Path(file).parent / sub[name]).resolve())
        out.append((part["driver"], sub, pkey))
    return out


class CombinedKeySource:
    def __init__(self, a, b, name: str = "combined"):
        self.parts = (a, b)
        self.name = name
        self._queues: tuple[deque[KeyBlock], deque[KeyBlock]] = (deque(), deque())

    @classmethod
    def check_settings(cls, settings: dict[str, Any], *, file, key: str) -> dict[str, Any]:
        for driver, sub, pkey in _parts(settings, file=file, key=key):
            check_driver(driver, sub, file=file, key=f"{pkey}.driver")
        return settings

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, file, key: str) -> "CombinedKeySource":
        (da, sa, ka), (db, sb, kb) = _parts(settings, file=file, key=key)
        return cls(load_driver(da, sa, file=file, key=f"{ka}.driver"),
                   load_driver(db, sb, file=file, key=f"{kb}.driver"),
                   name=f"combined({da}+{db})")

    async def connect(self) -> None:
        await asyncio.gather(*(p.connect() for p in self.parts))

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.parts), return_exceptions=True)
        for q in self._queues:
            while q:
                q.popleft().wipe()

    async def fetch_new(self, max_bits: int) -> list[KeyBlock]:
        # A part whose queue already covers the request is not asked for more: the faster device's
        # blocks would otherwise pile up in memory without bound while the slower one lags.
        wants = [max_bits - 8 * sum(len(b.bits) for b in q) for q in self._queues]
        got = await asyncio.gather(*(p.fetch_new(w) if w > 0 else _nothing() for p, w in zip(self.parts, wants)))
        for q, blocks in zip(self._queues, got):
            q.extend(blocks)
        out: list[KeyBlock] = []
        while sum(len(b.bits) for b in out) * 8 < max_bits:
            group = _take_group(*self._queues)
            if group is None:
                break
            out.append(_combine(*group))
        return out

    async def fetch_by_ids(self, block_ids: list[str]) -> list[KeyBlock]:
        wanted = [_parse_id(bid) for bid in block_ids]
        ids_a = [i for a, _ in wanted for i in a]
        ids_b = [i for _, b in wanted for i in b]
        try:
            got_a, got_b = await asyncio.gather(self.parts[0].fetch_by_ids(ids_a), self.parts[1].fetch_by_ids(ids_b))
        except DeviceRejected as exc:
            raise DeviceRejected(f"combined link: a part device refused: {exc}") from None
        by_a = {b.block_id: b for b in got_a}
        by_b = {b.block_id: b for b in got_b}
        out = []
        for a, b in wanted:
            out.append(_combine([by_a[i] for i in a], [by_b[i] for i in b]))
        return out

    @property
    def health(self) -> DeviceHealth:
        """The worse of the two devices' health (a part without one counts as unknown)."""
        order = {s: i for i, s in enumerate(("up", "unknown", "degraded", "down"))}
        states = [getattr(getattr(p, "health", None), "state", "unknown") for p in self.parts]
        worst = max(states, key=lambda s: order.get(s, 1))
        h = DeviceHealth()
        h.state = worst
        return h

    async def telemetry(self) -> LinkTelemetry:
        """What the two devices report, as one link: the worse QBER and excess noise, the lower
        key rate (the combined link runs at the slower device's pace), the first state that is
        not "running". A part that reports no telemetry contributes nothing."""
        parts = [p for p in self.parts if isinstance(p, TelemetrySource)]
        got = await asyncio.gather(*(p.telemetry() for p in parts))
        worst = lambda values, pick: pick(v for v in values if v is not None) \
            if any(v is not None for v in values) else None  # noqa: E731
        skr = [t.secret_key_rate_bps for t in got]
        return LinkTelemetry(
            state=next((t.state for t in got if t.state != "running"), "running" if got else "unknown"),
            qber=worst([t.qber for t in got], max),
            excess_noise=worst([t.excess_noise for t in got], max),
            snr=worst([t.snr for t in got], min),
            channel_loss_db=worst([t.channel_loss_db for t in got], max),
            secret_key_rate_bps=min(skr) if got and all(v is not None for v in skr) and len(got) == 2 else None)

    async def status(self) -> SourceStatus:
        sa, sb = await asyncio.gather(*(p.status() for p in self.parts))
        return SourceStatus(key_size=min(sa.key_size, sb.key_size),
                            stored_key_count=min(sa.stored_key_count, sb.stored_key_count),
                            max_key_count=min(sa.max_key_count, sb.max_key_count),
                            max_key_per_request=min(sa.max_key_per_request, sb.max_key_per_request),
                            min_key_size=max(sa.min_key_size, sb.min_key_size),
                            max_key_size=min(sa.max_key_size, sb.max_key_size))


async def _nothing() -> list[KeyBlock]:
    return []


def _take_group(qa: deque[KeyBlock], qb: deque[KeyBlock]) -> tuple[list[KeyBlock], list[KeyBlock]] | None:
    """The next blocks to combine: one block of the side whose head is larger, covered by as
    many blocks of the other side as it takes; None (nothing taken) until both sides have them."""
    if not qa or not qb:
        return None
    big, small, swap = (qa, qb, False) if len(qa[0].bits) >= len(qb[0].bits) else (qb, qa, True)
    need, n, have = len(big[0].bits), 0, 0
    while have < need and n < len(small):
        have += len(small[n].bits)
        n += 1
    if have < need:
        return None
    g_big = [big.popleft()]
    g_small = [small.popleft() for _ in range(n)]
    return (g_small, g_big) if swap else (g_big, g_small)


def _combine(a: list[KeyBlock], b: list[KeyBlock]) -> KeyBlock:
    bits_a = bytearray().join(x.bits for x in a)
    bits_b = bytearray().join(x.bits for x in b)
    m = min(len(bits_a), len(bits_b))
    out = bytearray((int.from_bytes(bits_a[:m], "big") ^ int.from_bytes(bits_b[:m], "big")).to_bytes(m, "big"))
    leaked = sum(x.leaked_bits for x in a) + sum(x.leaked_bits for x in b)
    block_id = json.dumps({"a": [x.block_id for x in a], "b": [x.block_id for x in b]}, separators=(",", ":"))
    for buf in (bits_a, bits_b):
        buf[:] = bytes(len(buf))
    for x in (*a, *b):
        x.wipe()
    return KeyBlock(block_id, out, min(leaked, m * 8))


def _parse_id(block_id: str) -> tuple[list[str], list[str]]:
    try:
        parsed = json.loads(block_id)
        a, b = parsed["a"], parsed["b"]
        if not (isinstance(a, list) and isinstance(b, list) and a and b and
                all(isinstance(i, str) for i in a + b)):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise DeviceRejected("combined link: a block ID that does not name its parts") from None
    return a, b
