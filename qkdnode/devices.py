"""The node's optical gear and extra telemetry sources (`[[devices]]` in the config).

Each device has its own loop, every `poll_interval` seconds:
- switch: keep the configured cross-connects (set at start, and again when the map read back
  lacks one, e.g. after the switch rebooted; other cross-connects are left alone), then export
  the whole map;
- osa: one sweep over `sweep_nm`, the WDM analysis, and the power inside each quantum
  channel's band, with a warning (and the alert rule) when classical light exceeds
  `quantum_alarm_dbm`; the latest sweep is also written to `<vault folder>/spectrum/ID.json`
  for `qkdnode spectrum`;
- telemetry: nothing here; the telemetry loop (qkdnode/telemetry.py) reads the link's figures
  from this device instead of from the link's key source.
Every device's health goes to `qkdnode_device_up`/`qkdnode_device_state`. A device that fails
costs its own figures only: the loops never touch the vault or a hand-out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from qkdnode.config import DeviceConfig, NodeConfig
from qkdnode.errors import DriverError
from qkdnode.interfaces import DeviceHealth, Trace, load_driver, quantum_band_power
from qkdnode.metrics import NodeMetrics

log = logging.getLogger("qkdnode.devices")


class Device:
    def __init__(self, cfg: DeviceConfig, driver: Any):
        self.cfg, self.driver = cfg, driver
        self.connected = False
        self.last_map: dict[int, int] | None = None
        self.last_trace: Trace | None = None
        self.quantum: dict[int, float] = {}

    @property
    def state(self) -> str:
        health = getattr(self.driver, "health", None)
        if isinstance(health, DeviceHealth):
            return health.state
        return "up" if self.connected else "unknown"


class Devices:
    def __init__(self, cfg: NodeConfig, metrics: NodeMetrics):
        self.metrics = metrics
        self.spectrum_dir = cfg.vault.path.parent / "spectrum"
        self.devices: dict[str, Device] = {}
        for i, dev in enumerate(cfg.devices):
            driver = load_driver(dev.driver, dev.settings, file=cfg.file, key=f"devices[{i}].driver")
            self.devices[dev.id] = Device(dev, driver)
        self._tasks: list[asyncio.Task] = []
        self._alarmed: set[tuple[str, int]] = set()

    def telemetry_for(self, link: str) -> Any | None:
        """The telemetry device configured for a link, if any."""
        for d in self.devices.values():
            if d.cfg.kind == "telemetry" and d.cfg.link == link:
                return d.driver
        return None

    def start(self) -> None:
        for d in self.devices.values():
            if d.cfg.kind != "telemetry":
                self._tasks.append(asyncio.create_task(self._loop(d), name=f"device {d.cfg.id}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for d in self.devices.values():
            try:
                await d.driver.close()
            except Exception:  # a device gone already: nothing more to close
                log.debug("device %s: close failed", d.cfg.id, exc_info=True)

    async def _loop(self, d: Device) -> None:
        failing = False
        while True:
            try:
                if not d.connected:
                    await d.driver.connect()
                    d.connected = True
                if d.cfg.kind == "switch":
                    await self.poll_switch(d)
                else:
                    await self.poll_osa(d)
                if failing:
                    log.info("device %s answers again", d.cfg.id)
                failing = False
            except asyncio.CancelledError:
                raise
            except DriverError as exc:
                (log.debug if failing else log.warning)("device %s: %s", d.cfg.id, exc)
                failing = True
            except Exception:
                log.exception("device %s: unexpected failure", d.cfg.id)
                failing = True
            self.metrics.set_device_health(d.cfg.id, d.cfg.kind, d.state)
            await asyncio.sleep(d.cfg.poll_interval)

    async def poll_switch(self, d: Device) -> None:
        current = await d.driver.cross_connects()
        missing = {i: e for i, e in d.cfg.cross_connects.items() if current.get(i) != e}
        if missing:
            log.info("switch %s: setting the configured cross-connect(s) %s", d.cfg.id,
                     ", ".join(f"{i}->{e}" for i, e in sorted(missing.items())))
            await d.driver.connect_ports(missing)
            current = await d.driver.cross_connects()
        d.last_map = dict(current)
        self.metrics.set_switch_map(d.cfg.id, current)

    async def poll_osa(self, d: Device) -> None:
        start, stop = d.cfg.sweep_nm
        trace = await d.driver.sweep(start, stop)
        channels = await d.driver.channels()
        quantum = quantum_band_power(trace, d.cfg.quantum_channels, 50.0) if d.cfg.quantum_channels else {}
        d.last_trace, d.quantum = trace, quantum
        self.metrics.set_spectrum(d.cfg.id, channels, quantum)
        for ch, power in quantum.items():
            key = (d.cfg.id, ch)
            if power > d.cfg.quantum_alarm_dbm and key not in self._alarmed:
                self._alarmed.add(key)
                log.warning("osa %s: classical light in quantum channel %d: %.1f dBm (alarm above %.1f dBm)",
                            d.cfg.id, ch, power, d.cfg.quantum_alarm_dbm)
            elif power <= d.cfg.quantum_alarm_dbm and key in self._alarmed:
                self._alarmed.discard(key)
                log.info("osa %s: quantum channel %d dark again (%.1f dBm)", d.cfg.id, ch, power)
        self._save(d, trace, channels)

    def _save(self, d: Device, trace: Trace, channels) -> None:
        """The latest sweep for `qkdnode spectrum`, written atomically (no key material in it)."""
        doc = {"osa": d.cfg.id, "quantum_channels": list(d.cfg.quantum_channels),
               "quantum_alarm_dbm": d.cfg.quantum_alarm_dbm,
               "trace": {"wavelengths_nm": list(trace.wavelengths_nm), "powers_dbm": list(trace.powers_dbm)},
               "channels": [{"itu_channel": c.itu_channel, "centre_nm": c.centre_nm, "power_dbm": c.power_dbm,
                             "osnr_db": c.osnr_db} for c in channels]}
        try:
            self.spectrum_dir.mkdir(mode=0o700, exist_ok=True)
            tmp = self.spectrum_dir / f".{d.cfg.id}.json.tmp"
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.spectrum_dir / f"{d.cfg.id}.json")
        except OSError as exc:
            log.warning("osa %s: cannot save the sweep for `qkdnode spectrum`: %s", d.cfg.id, exc)


def load_saved_sweep(path: Path) -> dict:
    return json.loads(path.read_text())
