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
  from this device instead of from the link's key source;
- cvqkd: a spare CV-QKD module (docs/sdn.md): kept connected, idle, so its health is known
  before the SDN agent makes a switched link with it.
The set of cross-connects a switch keeps may change while the node runs: the SDN agent adds
those of a switched link (`add_cross_connects`) and takes them away again
(`remove_cross_connects`); each change is read back, and the loop keeps the new set.
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
        # What this node keeps on a switch: the configured cross-connects, and those the SDN
        # agent added at runtime (changed only under `lock`, with the loop's poll).
        self.kept: dict[int, int] = dict(cfg.cross_connects)
        self.lock = asyncio.Lock()

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
                    async with d.lock:
                        await self.poll_switch(d)
                elif d.cfg.kind == "osa":
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
        missing = {i: e for i, e in d.kept.items() if current.get(i) != e}
        if missing:
            log.info("switch %s: setting the configured cross-connect(s) %s", d.cfg.id,
                     ", ".join(f"{i}->{e}" for i, e in sorted(missing.items())))
            await d.driver.connect_ports(missing)
            current = await d.driver.cross_connects()
        d.last_map = dict(current)
        self.metrics.set_switch_map(d.cfg.id, current)

    # ------------------------------------------------------------ the kept set changes (SDN agent)

    def switch(self, switch_id: str) -> Device:
        d = self.devices.get(switch_id)
        if d is None or d.cfg.kind != "switch":
            raise KeyError(switch_id)
        return d

    async def read_map(self, switch_id: str) -> dict[int, int]:
        """The switch's cross-connects as it reports them now."""
        d = self.switch(switch_id)
        async with d.lock:
            return await self._read(d)

    async def _read(self, d: Device) -> dict[int, int]:
        current = await d.driver.cross_connects()
        d.connected = True
        d.last_map = dict(current)
        self.metrics.set_switch_map(d.cfg.id, current)
        return current

    async def add_cross_connects(self, switch_id: str, pairs: dict[int, int]) -> dict[int, int]:
        """Set `pairs` (ingress -> egress) and keep them from now on. Every port must be free now
        (read back first): a connection of someone else is never moved. The map is read back
        after the change; if the pairs did not all take, whatever of them took is removed again
        and DriverError is raised. Returns the map read back."""
        d = self.switch(switch_id)
        async with d.lock:
            before = await self._read(d)
            taken = {p for i, e in before.items() for p in (i, e)}
            busy = sorted(p for pair in pairs.items() for p in pair if p in taken)
            if busy:
                raise DriverError(f"switch {switch_id}: port(s) {', '.join(map(str, busy))} are in use; "
                                  "nothing was changed")
            try:
                await d.driver.connect_ports(pairs)
            except DriverError:
                await self._undo(d, pairs, before)
                raise
            after = await self._read(d)
            if any(after.get(i) != e for i, e in pairs.items()):
                await self._undo(d, pairs, before)
                raise DriverError(f"switch {switch_id}: the cross-connect(s) did not take; nothing was kept")
            d.kept.update(pairs)
            log.info("switch %s: keeping cross-connect(s) %s", switch_id,
                     ", ".join(f"{i}->{e}" for i, e in sorted(pairs.items())))
            return after

    async def remove_cross_connects(self, switch_id: str, pairs: dict[int, int]) -> dict[int, int]:
        """Stop keeping `pairs` and disconnect them (those still connected as given; a port
        connected otherwise by now is left alone). Returns the map read back."""
        d = self.switch(switch_id)
        async with d.lock:
            for i, e in pairs.items():
                if d.kept.get(i) == e and d.cfg.cross_connects.get(i) != e:
                    del d.kept[i]
            current = await self._read(d)
            ours = [i for i, e in pairs.items() if current.get(i) == e and d.cfg.cross_connects.get(i) != e]
            if ours:
                await d.driver.disconnect_ports(ours)
            after = await self._read(d)
            left = [i for i in ours if after.get(i) == pairs[i]]
            if left:
                raise DriverError(f"switch {switch_id}: cross-connect(s) from port(s) {left} are still there")
            log.info("switch %s: removed cross-connect(s) %s", switch_id,
                     ", ".join(f"{i}->{e}" for i, e in sorted(pairs.items())))
            return after

    async def _undo(self, d: Device, pairs: dict[int, int], before: dict[int, int]) -> None:
        """Take away what of `pairs` took, leaving every other connection as it was."""
        try:
            now = await self._read(d)
            extra = [i for i, e in pairs.items() if now.get(i) == e and before.get(i) != e]
            if extra:
                await d.driver.disconnect_ports(extra)
                await self._read(d)
        except DriverError as exc:
            log.error("switch %s: could not take back a cross-connect that did not fully take: %s", d.cfg.id, exc)

    def kept(self, switch_id: str) -> dict[int, int]:
        return dict(self.switch(switch_id).kept)

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
