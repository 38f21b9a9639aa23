"""What every cross-connect switch driver shares, whatever its transport: the OpticalSwitch
calls, the checks a request passes before the unit is asked anything, the plan of a change
(which paths go, which come, touching only ports whose connection changes), the refusal of
ports that carry classical traffic, the driver's errors and its health bookkeeping.

A driver (`drivers/polatis.py` over SCPI, `drivers/snmp_switch.py` over SNMP) subclasses
`CrossConnectSwitch` and brings only its transport: `_run` (how one operation is run: in a
worker thread for blocking pyvisa, awaited for pysnmp), the reads (`_read_size`, `_read_map`,
`_read_partner`, `_read_port_states`, `_read_powers`) and `_change`, which reads the map, asks
`_plan` what to do and sends it in the unit's own words. Each of these is a plain function or a
coroutine function, as the driver's `_run` expects.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from qkdnode.errors import DeviceRejected, DriverError
from qkdnode.interfaces import DeviceHealth

__all__ = ["CrossConnectSwitch", "ClassicalPortRefused", "PortOutOfRange", "SwitchMismatch",
           "check_switch_name", "check_switch_ports"]


class ClassicalPortRefused(DriverError):
    """The change would touch ports the config marks as carrying classical traffic; nothing was changed."""

    def __init__(self, switch: str, ports: set[int], action: str):
        self.ports = tuple(sorted(ports))
        listed = ", ".join(str(p) for p in self.ports)
        super().__init__(f"{switch}: refused to {action}: port{'s' if len(self.ports) > 1 else ''} {listed} "
                         "carr{} classical traffic (classical_ports in the config); no change was sent"
                         .format("y" if len(self.ports) > 1 else "ies"))


class PortOutOfRange(DeviceRejected):
    """The request names a port the switch does not have, or an egress port twice; nothing was sent."""


class SwitchMismatch(DriverError):
    """The switch accepted the change but its map reads back otherwise (a path did not take)."""

    def __init__(self, switch: str, expected: dict[int, int], found: dict[int, int]):
        self.expected, self.found = dict(expected), dict(found)
        diffs = [f"ingress {i}: expected {expected.get(i, 'none')}, reads {found.get(i, 'none')}"
                 for i in sorted(set(expected) | set(found)) if expected.get(i) != found.get(i)]
        super().__init__(f"{switch}: the map read back after the change differs: {'; '.join(diffs)}")


# -- settings shared by every switch driver


def check_switch_name(m: dict[str, Any], err: Callable) -> None:
    if "name" in m and (not isinstance(m["name"], str) or not m["name"]):
        raise err("name", "a non-empty string", m["name"])


def check_switch_ports(m: dict[str, Any], err: Callable) -> None:
    """`down_after`, `classical_ports` and `monitor_ports`, as every switch driver takes them."""
    if not isinstance(m["down_after"], int) or isinstance(m["down_after"], bool) or m["down_after"] < 1:
        raise err("down_after", "a positive integer (failures in a row)", m["down_after"])
    for name in ("classical_ports", "monitor_ports"):
        if name not in m:
            continue
        v = m[name]
        if not isinstance(v, list) or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0
                                              for p in v):
            raise err(name, "a list of port numbers (positive integers)", v)
        if len(set(v)) != len(v):
            raise err(name, "a list of port numbers without repeats", v)


class CrossConnectSwitch:
    """An all-optical switch with ingress ports 1..N and egress ports N+1..N+M (interfaces.OpticalSwitch)."""

    log = logging.getLogger("drivers.switch")          # each driver names its own

    def __init__(self, *, name: str, classical_ports: list[int] | tuple[int, ...] = (),
                 monitor_ports: list[int] | None = None, down_after: int = 3):
        self.name = name
        self.classical_ports = frozenset(classical_ports)
        self.monitor_ports = None if monitor_ports is None else sorted(set(monitor_ports))
        self.health = DeviceHealth(down_after, on_change=self._health_changed)
        self.idn: str | None = None
        self._size: tuple[int, int] | None = None
        self._lock = asyncio.Lock()                    # one operation (read, change, read-back) at a time

    # -- OpticalSwitch

    async def size(self) -> tuple[int, int]:
        return await self._call(self._read_size)

    async def cross_connects(self) -> dict[int, int]:
        return await self._call(self._read_map)

    async def connect_ports(self, pairs: dict[int, int]) -> None:
        pairs = _int_pairs(self.name, pairs)
        self._refuse_named(set(pairs) | set(pairs.values()), "connect")

        def target(current: dict[int, int]) -> dict[int, int]:
            out = {i: e for i, e in current.items() if i not in pairs and e not in pairs.values()}
            out.update(pairs)
            return out
        await self._call(self._change, pairs, target, "connect")

    async def disconnect_ports(self, ingress: list[int]) -> None:
        ports = _int_ports(self.name, ingress)
        self._refuse_named(set(ports), "disconnect")
        await self._call(self._change, {i: None for i in ports},
                         lambda current: {i: e for i, e in current.items() if i not in ports}, "disconnect")

    async def replace_map(self, pairs: dict[int, int]) -> None:
        pairs = _int_pairs(self.name, pairs)
        await self._call(self._change, pairs, lambda current: dict(pairs), "replace the map")

    async def port_powers(self) -> dict[int, float]:
        return await self._call(self._read_powers)

    # -- more of the unit

    async def port_states(self) -> dict[int, str]:
        """Each port's state: "enabled", "disabled", or the unit's own word for another state."""
        return await self._call(self._read_port_states)

    async def partner(self, port: int) -> int | None:
        """The port `port` is connected to, or None."""
        (port,) = _int_ports(self.name, [port])
        return await self._call(self._read_partner, port)

    # -- what a driver brings

    async def _run(self, fn: Callable, *args):
        """Run one operation on the transport (in a thread, or awaited)."""
        raise NotImplementedError

    def _typed(self, exc: Exception) -> Exception:
        """The error a failure leaves the driver as (a driver may wrap untyped ones)."""
        return exc

    # -- shared plumbing

    async def _call(self, fn: Callable, *args):
        async with self._lock:
            try:
                result = await self._run(fn, *args)
            except (ClassicalPortRefused, PortOutOfRange):
                raise                                 # the caller's mistake; the unit was not asked to change
            except DeviceRejected:
                self.health.ok()                      # the unit answered properly and said no
                raise
            except Exception as exc:
                error = self._typed(exc)
                self.health.failed(error)
                if error is exc:
                    raise
                raise error from None
            self.health.ok()
            return result

    def _health_changed(self, old: str, new: str) -> None:
        level = logging.INFO if new == "up" else logging.WARNING
        self.log.log(level, "%s: health %s -> %s%s", self.name, old, new,
                     f" ({self.health.last_error})" if new != "up" else "")

    def _refuse_named(self, ports: set[int], action: str) -> None:
        hit = ports & self.classical_ports
        if hit:
            raise ClassicalPortRefused(self.name, hit, action)

    def _warn_beyond(self, n: int, m: int) -> None:
        beyond = sorted(p for p in self.classical_ports if p > n + m)
        if beyond:
            self.log.warning("%s: classical_ports %s are beyond this %dx%d switch: check the config", self.name,
                             beyond, n, m)

    def _check_port(self, port: int, n: int, m: int) -> None:
        if not 1 <= port <= n + m:
            raise PortOutOfRange(f"{self.name}: no port {port} on this {n}x{m} switch; nothing was sent")

    def _check_range(self, pairs: dict[int, int | None], n: int, m: int) -> None:
        bad = [f"ingress {i}" for i in pairs if not 1 <= i <= n]
        bad += [f"egress {e}" for e in pairs.values() if e is not None and not n < e <= n + m]
        if bad:
            raise PortOutOfRange(f"{self.name}: no such port on this {n}x{m} switch (ingress 1..{n}, egress "
                                 f"{n + 1}..{n + m}): {', '.join(bad)}; nothing was sent")

    def _plan(self, current: dict[int, int], target_of: Callable, action: str
              ) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
        """(target map, paths that go, paths that come) of a change from the map `current`; refuses
        (ClassicalPortRefused) a change that would touch a classical port. Nothing to do: both empty."""
        target = target_of(current)
        gone = {i: e for i, e in current.items() if target.get(i) != e}
        come = {i: e for i, e in target.items() if current.get(i) != e}
        touched = set(gone) | set(gone.values()) | set(come) | set(come.values())
        if touched & self.classical_ports:
            raise ClassicalPortRefused(self.name, touched & self.classical_ports, action)
        return target, gone, come


def _show(pairs: dict[int, int]) -> str:
    return "{" + ", ".join(f"{i}->{e}" for i, e in sorted(pairs.items())) + "}"


def _int_ports(switch: str, ports) -> list[int]:
    ports = list(ports)
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in ports):
        raise PortOutOfRange(f"{switch}: port numbers must be integers, got {ports!r}; nothing was sent")
    return ports


def _int_pairs(switch: str, pairs: dict[int, int]) -> dict[int, int]:
    pairs = dict(pairs)
    _int_ports(switch, list(pairs) + list(pairs.values()))
    if len(set(pairs.values())) != len(pairs):
        raise PortOutOfRange(f"{switch}: an egress port appears twice in {_show(pairs)}; nothing was sent")
    return pairs
