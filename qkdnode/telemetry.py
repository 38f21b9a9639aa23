"""What the node measures for its metrics, beside the key path.

Every `TELEMETRY_INTERVAL` seconds, for each link: the figures its device reports (QBER, excess
noise, secret key rate, state) where the driver implements `TelemetrySource`, the device's
health, the pool's target, and the pool's projected time to empty from the history of its
ready-bits gauge. Certificate expiry is read from the PEM files at start and on every reload.

A device that does not answer costs its link's figures (the series vanish rather than freeze
at their last value) and nothing else: this loop never touches the vault or a hand-out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from qkdnode.config import NodeConfig
from qkdnode.errors import DriverError
from qkdnode.interfaces import DeviceHealth, TelemetrySource
from qkdnode.metrics import NodeMetrics

if TYPE_CHECKING:
    from qkdnode.links import LinkPool

log = logging.getLogger("qkdnode.telemetry")

TELEMETRY_INTERVAL = 2.0   # seconds between two polls of every link's device
DRAW_WINDOW = 60.0         # seconds of ready-bits history behind the time to empty
TELEMETRY_TIMEOUT = 10.0   # a device slower than this counts as not answering, for this round


class TimeToEmpty:
    """Projected time until a pool is empty, from samples of its ready bits.

    The draw is the *net* decline over the last `window` seconds, what SAEs and relays took
    minus what the link added meanwhile: the negated slope of a least-squares line through the
    samples (every sample counts, so the sawtooth of a pool topped up between draws does not
    pass for a trend the way two end points would). A pool refilled as fast as it is drawn will
    not empty, and says so (+Inf): gross draw alone would call every busy, healthy link doomed.
    +Inf also when nothing is drawn, or before two samples a moment apart exist (no evidence of
    a decline). 0 when the pool is empty."""

    def __init__(self, window: float = DRAW_WINDOW):
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, when: float, ready_bits: float) -> float:
        self._samples.append((when, ready_bits))
        while len(self._samples) > 2 and when - self._samples[0][0] > self.window:
            self._samples.popleft()
        return self.seconds()

    def seconds(self) -> float:
        if not self._samples:
            return math.inf
        now, ready = self._samples[-1]
        if ready <= 0:
            return 0.0
        n = len(self._samples)
        mean_t = sum(t for t, _ in self._samples) / n
        mean_r = sum(r for _, r in self._samples) / n
        spread = sum((t - mean_t) ** 2 for t, _ in self._samples)
        if n < 2 or spread <= 0:
            return math.inf
        slope = sum((t - mean_t) * (r - mean_r) for t, r in self._samples) / spread
        return ready / -slope if slope < 0 else math.inf


def certificate_expiries(cfg: NodeConfig) -> dict[str, float]:
    """`cert` label -> Unix time the certificate expires, for every certificate the node uses:
    `tls` (the node's own, for its servers and as a client), `tls_ca` (the earliest-expiring
    certificate in tls.ca) and, per link whose driver settings name them, `link:ID:cert` and
    `link:ID:ca`. A file that cannot be read is logged and left out."""
    files: dict[str, Path] = {"tls": cfg.tls.cert, "tls_ca": cfg.tls.ca}
    for link in cfg.links:
        for name in ("cert", "ca"):
            value = link.settings.get(name)
            if isinstance(value, str) and value:
                files[f"link:{link.id}:{name}"] = Path(value)
    out: dict[str, float] = {}
    for label, path in files.items():
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("certificate expiry: cannot read %s (%s): %s", path, label, exc)
            continue
        if certs:
            out[label] = min(c.not_valid_after_utc.timestamp() for c in certs)
    return out


class Telemetry:
    def __init__(self, metrics: NodeMetrics, pools: dict[str, "LinkPool"], interval: float = TELEMETRY_INTERVAL,
                 sources: dict[str, TelemetrySource] | None = None):
        self.metrics, self.pools, self.interval = metrics, pools, interval
        # Links whose figures come from another device than their key source ([[devices]] kind telemetry).
        self.sources = sources or {}
        self._drain = {link: TimeToEmpty() for link in pools}
        self._failing: set[str] = set()

    def certificates(self, cfg: NodeConfig) -> None:
        self.metrics.set_certificate_expiry(certificate_expiries(cfg))

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("unexpected failure in the telemetry loop")
            await asyncio.sleep(self.interval)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll_link(link, pool) for link, pool in self.pools.items()))

    async def _poll_link(self, link: str, pool: "LinkPool") -> None:
        m, source = self.metrics, pool.source
        m.pool_target_bits.labels(link).set(pool.cfg.pool_target_bits)
        ready = m.registry.get_sample_value("qkdnode_pool_ready_bits", {"link": link})
        if ready is not None:
            drain = self._drain.setdefault(link, TimeToEmpty())  # links come and go (switched links)
            m.pool_time_to_empty.labels(link).set(drain.add(time.monotonic(), ready))
        if link in self.sources:
            src = self.sources[link]
            m.set_link_telemetry(link, await self._figures(link, src))
            h = getattr(src, "health", None)
            m.set_device_health(f"{link}:telemetry", "telemetry", h.state if isinstance(h, DeviceHealth) else "unknown")
        elif isinstance(source, TelemetrySource):
            m.set_link_telemetry(link, await self._figures(link, source) if pool.device_ok else None)
        health = getattr(source, "health", None)
        if isinstance(health, DeviceHealth):
            state = health.state
        else:
            state = "up" if pool.device_ok else "unknown"
        m.set_device_health(link, pool.cfg.driver, state)

    async def _figures(self, link: str, source: TelemetrySource):
        try:
            figures = await asyncio.wait_for(source.telemetry(), TELEMETRY_TIMEOUT)
        except (DriverError, asyncio.TimeoutError) as exc:
            if link not in self._failing:  # once per outage, not once per round
                self._failing.add(link)
                log.warning("link %s: no telemetry from its device: %s", link, exc or "no answer in time")
            return None
        if link in self._failing:
            self._failing.discard(link)
            log.info("link %s: telemetry from its device again", link)
        return figures
