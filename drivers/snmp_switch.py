"""HUBER+SUHNER Polatis optical switch over SNMP (v2c or v3 USM), on the unit's cross-connect
table under enterprise 26592 (docs/protocols/snmp.md has the OIDs and the settings).

The same OpticalSwitch as the SCPI driver (`drivers/polatis.py`): both are built on
`drivers/switch_base.py`, which holds the calls, the checks, the plan of a change and the errors,
so a caller does not care which way the unit is reached; this module brings the SNMP transport:
- ingress ports are 1..N and egress ports N+1..N+M; the size comes from polatisOxcSize ("NxM");
- the map is read by walking polatisOxcPortPatch (one row per port, the partner or 0), and each
  row must agree with its partner's, or the answer is a DeviceProtocolError;
- a change SETs polatisOxcPortPatch.<ingress> = 0 for the paths that go, then
  polatisOxcPortPatch.<ingress> = <egress> for the paths that come, touching only ports whose
  connection changes; then the map is read back. The agent refusing a SET raises
  DeviceRejected naming the status and the OID, with the map as it now reads; a map that reads
  back otherwise raises SwitchMismatch;
- a change that would touch a port listed in `classical_ports` is refused (ClassicalPortRefused)
  before any SET: at once, with nothing sent at all, when the request names such a port, else
  after reading the map (reads only);
- port powers come from polatisOpmPower (Integer32; `power_scale` dBm per unit, 0.01 by default).

SNMP is connectionless: there is no session to reopen. A call that gets no answer fails with
DeviceUnavailable after `timeout` x (`retries` + 1) seconds, and the next call simply asks
again, so the driver recovers by itself when the unit answers again. `health`
(interfaces.DeviceHealth) follows every call: timeouts, garbage and refused credentials are
failures; a refused SET (the unit answered properly and said no) is not; a request the driver
refuses itself (classical port, no such port) leaves it alone.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

from pysnmp.proto import rfc1902

from drivers.snmp import (SNMP_DEFAULTS, SNMP_SETTINGS, Oid, SnmpRejected, SnmpSession, absent,
                          check_snmp_settings, is_integer, is_unsigned, oid_text, type_name)
from drivers.switch_base import (ClassicalPortRefused, CrossConnectSwitch, PortOutOfRange, SwitchMismatch, _show,
                                 check_switch_name, check_switch_ports)
from qkdnode.errors import DeviceProtocolError, DeviceRejected, DriverError
from qkdnode.interfaces import driver_settings

log = logging.getLogger("drivers.snmp_switch")

__all__ = ["PolatisSnmpSwitch", "ClassicalPortRefused", "PortOutOfRange", "SwitchMismatch"]

POLATIS = (1, 3, 6, 1, 4, 1, 26592)
SYS_DESCR: Oid = (1, 3, 6, 1, 2, 1, 1, 1, 0)
OXC_SIZE: Oid = POLATIS + (2, 2, 2, 1, 1, 0)                    # polatisOxcSize.0, "NxM"
PORT_PATCH: Oid = POLATIS + (2, 2, 2, 1, 2, 1, 2)               # polatisOxcPortPatch.<port>
PORT_CURRENT_STATE: Oid = POLATIS + (2, 2, 2, 1, 2, 1, 3)       # polatisOxcPortCurrentState.<port>
OPM_POWER: Oid = POLATIS + (2, 3, 2, 2, 2, 1, 1)                # polatisOpmPower.<port>
PORT_STATES = {1: "enabled", 2: "disabled", 3: "failed"}

DEFAULTS: dict[str, Any] = {**SNMP_DEFAULTS, "classical_ports": [], "power_scale": 0.01, "down_after": 3}
_SETTINGS = SNMP_SETTINGS | set(DEFAULTS) | {"name", "monitor_ports"}
MAX_PORTS = 10_000


class PolatisSnmpSwitch(CrossConnectSwitch):
    """An all-optical Polatis switch reached over SNMP."""

    log = log

    def __init__(self, *, session: SnmpSession, name: str, classical_ports: list[int] | tuple[int, ...] = (),
                 monitor_ports: list[int] | None = None, power_scale: float = 0.01, down_after: int = 3):
        super().__init__(name=name, classical_ports=classical_ports, monitor_ports=monitor_ports,
                         down_after=down_after)
        self.session = session
        self.power_scale = float(power_scale)

    def __repr__(self) -> str:
        return f"<PolatisSnmpSwitch {self.name} {self.session!r} health={self.health.state}>"

    # -- settings

    @classmethod
    def check_settings(cls, settings: dict[str, Any], *, file, key: str) -> dict[str, Any]:
        """Names and types of a switch's settings, merged over the defaults. Touches no device."""
        m, err = driver_settings(settings, file=file, key=key, known=_SETTINGS, defaults=DEFAULTS)
        check_snmp_settings(m, err, file=file, key=key, writes=True)
        check_switch_name(m, err)
        v = m["power_scale"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise err("power_scale", "a positive number (dBm per unit of polatisOpmPower, e.g. 0.01)", v)
        check_switch_ports(m, err)
        return m

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, file, key: str) -> "PolatisSnmpSwitch":
        m = cls.check_settings(settings, file=file, key=key)
        name = m.get("name") or f"{m['host']}:{m['port']}"
        return cls(session=SnmpSession.from_settings(name, m), name=name, classical_ports=m["classical_ports"],
                   monitor_ports=m.get("monitor_ports"), power_scale=m["power_scale"], down_after=m["down_after"])

    # -- lifecycle

    async def connect(self) -> None:
        """Ask the unit who and how big it is (calls do it themselves when needed)."""
        await self._call(self._identify)

    async def close(self) -> None:
        self.session.close()

    # -- plumbing

    async def _run(self, fn: Callable, *args):
        return await fn(*args)

    def _typed(self, exc: Exception) -> Exception:
        if isinstance(exc, DriverError):
            return exc
        # nothing untyped leaves the driver
        return DeviceProtocolError(f"{self.name}: {exc.__class__.__name__}: "
                                   f"{self.session.scrub(str(exc))[:200]}")

    def _garbled(self, oid: Oid, value: Any, expected: str) -> DeviceProtocolError:
        shown = absent(value) or f"{type_name(value)} {_shown(value)}"
        return DeviceProtocolError(f"{self.name}: {oid_text(oid)} answered {shown}, expected {expected}")

    def _take_size(self, value: Any) -> tuple[int, int]:
        text = _text(value) if value.tagSet == rfc1902.OctetString.tagSet else None
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
        if not m or not (0 < int(m[1]) <= MAX_PORTS and 0 < int(m[2]) <= MAX_PORTS):
            raise self._garbled(OXC_SIZE, value, 'polatisOxcSize as "NxM"')
        self._size = (int(m[1]), int(m[2]))
        return self._size

    async def _identify(self) -> None:
        (_, descr), (_, size) = await self.session.get([SYS_DESCR, OXC_SIZE])
        n, m = self._take_size(size)
        self.idn = _text(descr) if descr.tagSet == rfc1902.OctetString.tagSet else None
        self._warn_beyond(n, m)
        log.info("%s: %s, %dx%d, reached by %s", self.name, self.idn or "no sysDescr", n, m, self.session.where)

    async def _read_size(self) -> tuple[int, int]:
        ((_, value),) = await self.session.get([OXC_SIZE])
        return self._take_size(value)

    async def _known_size(self) -> tuple[int, int]:
        return self._size or await self._read_size()

    async def _read_rows(self) -> dict[int, int]:
        """polatisOxcPortPatch: port -> partner (0 if none), every port of the switch."""
        n, m = await self._known_size()
        rows: dict[int, int] = {}
        for oid, value in await self.session.walk(PORT_PATCH):
            port = oid[len(PORT_PATCH):]
            if len(port) != 1 or not 1 <= port[0] <= n + m:
                raise DeviceProtocolError(f"{self.name}: the walk of polatisOxcPortPatch answered "
                                          f"{oid_text(oid)}, not a port of this {n}x{m} switch")
            if not is_unsigned(value) or int(value) > n + m:
                raise self._garbled(oid, value, f"Unsigned32 partner port, 0..{n + m}")
            rows[port[0]] = int(value)
        lacking = sorted(set(range(1, n + m + 1)) - set(rows))
        if lacking:
            shown = ", ".join(map(str, lacking[:8])) + (f" (+{len(lacking) - 8} more)" if len(lacking) > 8 else "")
            raise DeviceProtocolError(f"{self.name}: polatisOxcPortPatch has no row for port{'s' if len(lacking) > 1 else ''} "
                                      f"{shown} of this {n}x{m} switch (OIDs gone: a firmware change?)")
        return rows

    async def _read_map(self) -> dict[int, int]:
        n, m = await self._known_size()
        rows = await self._read_rows()
        found: dict[int, int] = {}
        for p, q in sorted(rows.items()):
            if q == 0:
                continue
            if (p <= n) == (q <= n) or rows.get(q) != p:
                raise DeviceProtocolError(f"{self.name}: polatisOxcPortPatch rows disagree: port {p} -> {q}, but "
                                          f"port {q} -> {rows.get(q, 'no row')}")
            if p <= n:
                found[p] = q
        return found

    async def _read_partner(self, port: int) -> int | None:
        n, m = await self._known_size()
        self._check_port(port, n, m)
        ((oid, value),) = await self.session.get([PORT_PATCH + (port,)])
        if not is_unsigned(value) or int(value) > n + m:
            raise self._garbled(oid, value, f"Unsigned32 partner port, 0..{n + m}")
        return int(value) or None

    async def _read_port_states(self) -> dict[int, str]:
        n, m = await self._known_size()
        out: dict[int, str] = {}
        for oid, value in await self.session.walk(PORT_CURRENT_STATE):
            port = oid[len(PORT_CURRENT_STATE):]
            if len(port) != 1 or not 1 <= port[0] <= n + m or not is_integer(value) or int(value) not in PORT_STATES:
                raise self._garbled(oid, value, "polatisOxcPortCurrentState enabled(1), disabled(2) or failed(3) "
                                                f"for a port 1..{n + m}")
            out[port[0]] = PORT_STATES[int(value)]
        return out

    async def _read_powers(self) -> dict[int, float]:
        n, m = await self._known_size()
        if self.monitor_ports is not None:
            rows = await self.session.get([OPM_POWER + (p,) for p in self.monitor_ports])
        else:
            rows = await self.session.walk(OPM_POWER)
        out: dict[int, float] = {}
        for oid, value in rows:
            port = oid[len(OPM_POWER):]
            if len(port) != 1 or not 1 <= port[0] <= n + m or not is_integer(value):
                raise self._garbled(oid, value, f"polatisOpmPower (Integer32) for a port 1..{n + m}")
            dbm = int(value) * self.power_scale
            if not -100.0 <= dbm <= 50.0:
                raise self._garbled(oid, value, f"a power between -100 and 50 dBm at {self.power_scale:g} dBm per unit")
            out[port[0]] = round(dbm, 6)
        return out

    async def _change(self, pairs: dict[int, int | None], target_of: Callable, action: str) -> None:
        n, m = await self._known_size()
        self._check_range(pairs, n, m)
        target, gone, come = self._plan(await self._read_map(), target_of, action)
        if not gone and not come:
            return
        steps = []
        if gone:
            steps.append([(PORT_PATCH + (i,), rfc1902.Unsigned32(0)) for i in sorted(gone)])
        if come:
            steps.append([(PORT_PATCH + (i,), rfc1902.Unsigned32(e)) for i, e in sorted(come.items())])
        parts = [f"{verb} " + ", ".join(f"{i}->{e}" for i, e in sorted(paths.items()))
                 for verb, paths in (("remove", gone), ("patch", come)) if paths]
        change = "; ".join(parts)
        try:
            for step in steps:
                await self.session.set(step)
        except SnmpRejected as exc:
            found = await self._read_map()
            raise DeviceRejected(f"{self.name}: the unit rejected {action} ({change}): {exc.status}"
                                 f"{f' at {oid_text(exc.oid)}' if exc.oid else ''}; map now {_show(found)}") from None
        found = await self._read_map()
        if found != target:
            raise SwitchMismatch(self.name, target, found)
        log.info("%s: %s: %s", self.name, action, change)


def _text(value: Any) -> str | None:
    try:
        text = bytes(value).decode("ascii")
    except (UnicodeDecodeError, TypeError, ValueError):
        return None
    return text if text.isprintable() else None


def _shown(value: Any) -> str:
    try:
        raw = bytes(value) if value.tagSet == rfc1902.OctetString.tagSet else None
    except Exception:
        raw = None
    if raw is not None:
        return repr(raw[:40])
    try:
        return value.prettyPrint()[:40]
    except Exception:
        return "?"
