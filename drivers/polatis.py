"""HUBER+SUHNER Polatis optical switch over VISA: SCPI on the unit's raw socket
(`TCPIP::host::5025::SOCKET`) through pyvisa, with the pure-Python pyvisa-py backend by default.
The OpticalSwitch calls, the checks of a request, the plan of a change and the errors are
shared with the SNMP driver (`drivers/switch_base.py`); this module brings the SCPI transport.

Ingress ports are 1..N and egress ports N+1..N+M, as the unit numbers them. Every change is one
program message, `SUB` of the pairs that go then `ADD` of the pairs that come, ended by `*OPC?`;
then the error queue (`:SYST:ERR?`) is drained and the map is read back. A device error raises
DeviceRejected, a map that reads back otherwise raises SwitchMismatch; both name what happened.
Only ports whose connection changes are touched. A change that would touch a port the config
lists in `classical_ports` is refused before any change is sent: at once, with nothing sent at
all, when the request names such a port, else after reading the map (a query, no change).

pyvisa is blocking: each call runs in a worker thread behind a per-instrument asyncio.Lock (and a
thread lock, so a cancelled call's thread finishes before the next one starts). Timeouts and
terminations are set explicitly. After a timeout, a drop or a reply that follows no protocol the
session is closed, since a late answer could pair with the next question; the next call reopens
it. A failed reopen waits `backoff` seconds before the next attempt, doubling up to
`backoff_max`; calls in between fail at once. `health` (interfaces.DeviceHealth) follows every
call; a refused request (classical port, no such port) is the caller's error and leaves it alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import pyvisa
from pyvisa import constants as visa_constants
from pyvisa.errors import VisaIOError

from drivers.switch_base import (ClassicalPortRefused, CrossConnectSwitch, PortOutOfRange, SwitchMismatch, _show,
                                 check_switch_name, check_switch_ports)
from qkdnode.errors import DeviceProtocolError, DeviceRejected, DeviceUnavailable, DriverError
from qkdnode.interfaces import driver_settings

log = logging.getLogger("drivers.polatis")

__all__ = ["PolatisSwitch", "ClassicalPortRefused", "PortOutOfRange", "SwitchMismatch", "ScpiError"]

DEFAULTS: dict[str, Any] = {"timeout": 2.0, "switch_timeout": 5.0, "classical_ports": [], "backoff": 0.5,
                            "backoff_max": 30.0, "down_after": 3, "visa_library": "@py"}
_SETTINGS = set(DEFAULTS) | {"resource", "name", "monitor_ports"}
MAX_ERRORS_DRAINED = 64
MONITOR_CHUNK = 256                 # ports per power monitor query, as public drivers do

_ERROR = re.compile(r'\s*([+-]?\d+)\s*,\s*"((?:[^"]|"")*)"\s*')
_MAP = re.compile(r"\s*\(@([\d,:\s]*)\)\s*,\s*\(@([\d,:\s]*)\)\s*")
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"

_rm_lock = threading.Lock()         # pyvisa's ResourceManager is one per VISA library and process


@dataclass(frozen=True)
class ScpiError:
    """One entry of the unit's error queue, with the program message it followed (None if stale)."""

    code: int
    message: str
    after: str | None
    at: float

    def __str__(self) -> str:
        return f'{self.code},"{self.message}"'


class PolatisSwitch(CrossConnectSwitch):
    """An all-optical Polatis switch (or one that speaks its SCPI set) reached over VISA."""

    log = log

    def __init__(self, *, resource: str, name: str | None = None, timeout: float = 2.0,
                 switch_timeout: float = 5.0, classical_ports: list[int] | tuple[int, ...] = (),
                 monitor_ports: list[int] | None = None, backoff: float = 0.5, backoff_max: float = 30.0,
                 down_after: int = 3, visa_library: str = "@py"):
        super().__init__(name=name or resource, classical_ports=classical_ports, monitor_ports=monitor_ports,
                         down_after=down_after)
        self.resource = resource
        self.timeout, self.switch_timeout = float(timeout), float(switch_timeout)
        self.backoff, self.backoff_max = float(backoff), float(backoff_max)
        self.visa_library = visa_library
        self.device_errors: deque[ScpiError] = deque(maxlen=100)   # every error the unit reported, newest last
        self._inst = None
        self._io = threading.Lock()
        self._delay = self.backoff
        self._retry_at = 0.0
        self._open_error = ""

    # -- settings

    @classmethod
    def check_settings(cls, settings: dict[str, Any], *, file, key: str) -> dict[str, Any]:
        """Names and types of a switch's settings, merged over the defaults. Touches no device."""
        m, err = driver_settings(settings, file=file, key=key, known=_SETTINGS, defaults=DEFAULTS)
        res = m.get("resource")
        if not isinstance(res, str) or "::" not in res:
            raise err("resource", 'a VISA resource string such as "TCPIP::192.0.2.10::5025::SOCKET"', res,
                      missing="resource" not in m)
        check_switch_name(m, err)
        if not isinstance(m["visa_library"], str):
            raise err("visa_library", 'a string ("@py" for pyvisa-py, "" for the system VISA)', m["visa_library"])
        for name in ("timeout", "switch_timeout", "backoff", "backoff_max"):
            v = m[name]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or \
                    (name.endswith("timeout") and v == 0):
                raise err(name, "a positive number of seconds" if name.endswith("timeout")
                          else "a non-negative number of seconds", v)
        if m["backoff_max"] < m["backoff"]:
            raise err("backoff_max", f"at least backoff ({m['backoff']})", m["backoff_max"])
        check_switch_ports(m, err)
        return m

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, file, key: str) -> "PolatisSwitch":
        m = cls.check_settings(settings, file=file, key=key)
        return cls(resource=m["resource"], name=m.get("name"), timeout=m["timeout"],
                   switch_timeout=m["switch_timeout"], classical_ports=m["classical_ports"],
                   monitor_ports=m.get("monitor_ports"), backoff=m["backoff"], backoff_max=m["backoff_max"],
                   down_after=m["down_after"], visa_library=m["visa_library"])

    # -- lifecycle

    async def connect(self) -> None:
        """Open the session now (calls open it themselves when needed)."""
        await self._call(lambda: None)

    async def close(self) -> None:
        """Close the session; a later call opens a new one."""
        async with self._lock:
            await asyncio.to_thread(self._in_thread, self._close_session)

    # -- more of the unit

    async def error_queue(self) -> list[ScpiError]:
        """Drain the unit's error queue now; the entries are also kept in `device_errors`."""
        return await self._call(self._drain_errors, None)

    # -- plumbing on the event loop

    async def _run(self, fn: Callable, *args):
        return await asyncio.to_thread(self._in_thread, self._opened(fn), *args)

    # -- in the worker thread

    def _in_thread(self, fn: Callable, *args):
        with self._io:
            return fn(*args)

    def _opened(self, fn: Callable) -> Callable:
        def run(*args):
            self._ensure_open()
            return fn(*args)
        return run

    def _ensure_open(self) -> None:
        if self._inst is not None:
            if not self._peer_spoke():
                return
            log.info("%s: the unit closed the session or sent unasked data; reopening", self.name)
            self._close_session()
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise DeviceUnavailable(f"{self.name}: not reconnected; next attempt in {wait:.1f} s "
                                    f"(last error: {self._open_error})")
        try:
            self._open()
        except DriverError as exc:
            self._close_session()
            self._retry_at = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, self.backoff_max)
            self._open_error = str(exc)[:200]
            raise
        self._retry_at, self._delay = 0.0, self.backoff

    def _open(self) -> None:
        ms = int(self.timeout * 1000)
        try:
            with _rm_lock:
                rm = pyvisa.ResourceManager(self.visa_library)
                self._inst = rm.open_resource(self.resource, read_termination="\n", write_termination="\n",
                                              timeout=ms, open_timeout=ms)
        except Exception as exc:
            raise DeviceUnavailable(f"{self.name}: cannot open {self.resource}: {exc}") from None
        idn = self._ask("*IDN?")
        if len(idn.split(",")) < 4 or not idn.isprintable():
            raise self._garbled("*IDN?", idn, "maker,model,serial,firmware")
        self.idn = idn
        n, m = self._read_size()
        stale = self._drain_errors(None)
        if stale:
            log.warning("%s: errors queued before this session: %s", self.name, "; ".join(map(str, stale)))
        self._warn_beyond(n, m)
        log.info("%s: opened %s (%s)", self.name, self.resource, idn)

    def _close_session(self) -> None:
        inst, self._inst = self._inst, None
        if inst is not None:
            try:
                inst.close()
            except Exception as exc:                  # a session pyvisa-py already tore down
                log.debug("%s: closing the session: %s", self.name, exc)

    def _socket(self):
        """The session's TCP socket when the backend is pyvisa-py, else None (diagnosis only)."""
        try:
            sock = getattr(self._inst.visalib.sessions[self._inst.session], "interface", None)
        except Exception:
            return None
        return sock if isinstance(sock, socket.socket) else None

    def _peer_spoke(self) -> bool:
        """Whether the socket has something to read between calls: the unit closed it, or sent data
        nobody asked for. Either way the session cannot be trusted for the next question."""
        sock = self._socket()
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _peer_closed(self) -> bool:
        sock = self._socket()
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _ask(self, command: str, timeout: float | None = None) -> str:
        """Send one program message and read its response message."""
        inst = self._inst
        if inst is None:
            raise DeviceUnavailable(f"{self.name}: the session was closed")
        t = timeout or self.timeout
        try:
            if inst.timeout != t * 1000:
                inst.timeout = t * 1000
            inst.write(command)
            raw = inst.read_raw()
        except VisaIOError as exc:
            if exc.error_code == visa_constants.StatusCode.error_timeout:
                reason = "the unit closed the connection" if self._peer_closed() else f"no answer within {t:g} s"
            else:
                reason = f"VISA error {exc.abbreviation}"
            self._close_session()
            raise DeviceUnavailable(f"{self.name}: {command!r}: {reason}") from None
        except (OSError, AttributeError) as exc:       # pyvisa-py lets socket errors through
            self._close_session()
            raise DeviceUnavailable(f"{self.name}: {command!r}: connection lost ({exc.__class__.__name__}: "
                                    f"{exc})") from None
        try:
            return raw.decode("ascii").rstrip("\r\n")
        except UnicodeDecodeError:
            raise self._garbled(command, raw.decode("latin-1").rstrip("\r\n"), "ASCII") from None

    def _garbled(self, command: str, reply: str, expected: str) -> DeviceProtocolError:
        self._close_session()                          # what comes next on this session cannot be trusted
        return DeviceProtocolError(f"{self.name}: {command!r} answered {reply[:80]!r}, expected {expected}")

    def _drain_errors(self, after: str | None) -> list[ScpiError]:
        found: list[ScpiError] = []
        for _ in range(MAX_ERRORS_DRAINED):
            reply = self._ask(":SYST:ERR?")
            m = _ERROR.fullmatch(reply)
            if not m:
                raise self._garbled(":SYST:ERR?", reply, 'an error entry such as 0,"No error"')
            if int(m[1]) == 0:
                return found
            entry = ScpiError(int(m[1]), m[2].replace('""', '"'), after, time.time())
            found.append(entry)
            self.device_errors.append(entry)
            log.warning("%s: the unit reports %s%s", self.name, entry, f" after {after!r}" if after else "")
        raise DeviceProtocolError(f"{self.name}: the error queue did not empty after {MAX_ERRORS_DRAINED} reads")

    def _read_size(self) -> tuple[int, int]:
        reply = self._ask(":OXC:SWIT:SIZE?")
        m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", reply)
        if not m or not (0 < int(m[1]) <= 10_000 and 0 < int(m[2]) <= 10_000):
            raise self._garbled(":OXC:SWIT:SIZE?", reply, "N,M")
        self._size = (int(m[1]), int(m[2]))
        return self._size

    def _read_map(self) -> dict[int, int]:
        command = ":OXC:SWIT:CONN:STAT?"
        reply = self._ask(command)
        m = _MAP.fullmatch(reply)
        try:
            ins, outs = _channels(m[1]), _channels(m[2])
        except (TypeError, ValueError):
            raise self._garbled(command, reply, "(@ingress,...),(@egress,...)") from None
        found = dict(zip(ins, outs))
        if len(ins) != len(outs) or len(found) != len(ins) or len(set(outs)) != len(outs):
            raise self._garbled(command, reply, "two lists of the same length, each port once")
        return found

    def _read_partner(self, port: int) -> int | None:
        self._check_port(port, *self._size)
        command = f":OXC:SWIT:CONN:PORT? {port}"
        reply = self._ask(command)
        if not re.fullmatch(r"\s*\d*\s*", reply):
            raise self._garbled(command, reply, "a port number (0 or nothing if unconnected)")
        return int(reply) if reply.strip() and int(reply) else None

    def _read_port_states(self) -> dict[int, str]:
        n, m = self._size
        command = ":OXC:SWIT:PORT:STAT?"
        reply = self._ask(command)
        body = re.fullmatch(r"\s*\(?([A-Za-z,\s]*)\)?\s*", reply)
        states = [s.strip().upper() for s in body[1].split(",")] if body else []
        if len(states) != n + m or not all(re.fullmatch(r"[A-Z]", s) for s in states):
            raise self._garbled(command, reply, f"({n + m} letters such as E,D,...)")
        names = {"E": "enabled", "D": "disabled"}
        return {p: names.get(s, s.lower()) for p, s in enumerate(states, start=1)}

    def _read_powers(self) -> dict[int, float]:
        n, m = self._size
        ports = self.monitor_ports if self.monitor_ports is not None else list(range(1, n + m + 1))
        out: dict[int, float] = {}
        for k in range(0, len(ports), MONITOR_CHUNK):
            chunk = ports[k:k + MONITOR_CHUNK]
            command = f":PMON:POW? (@{','.join(map(str, chunk))})"
            reply = self._ask(command)
            body = re.fullmatch(r"\s*\(?([^()]*)\)?\s*", reply)
            values = [v.strip() for v in body[1].split(",")] if body else []
            if len(values) != len(chunk) or not all(re.fullmatch(_NUMBER, v) for v in values):
                raise self._garbled(command, reply, f"({len(chunk)} powers in dBm)")
            out.update(zip(chunk, map(float, values)))
        return out

    def _change(self, pairs: dict[int, int | None], target_of: Callable, action: str) -> None:
        self._check_range(pairs, *self._size)
        target, gone, come = self._plan(self._read_map(), target_of, action)
        if not gone and not come:
            return
        units = []
        if gone:
            units.append(f":OXC:SWIT:CONN:SUB {_lists(gone)}")
        if come:
            units.append(f":OXC:SWIT:CONN:ADD {_lists(come)}")
        change = ";".join(units)
        reply = self._ask(change + ";*OPC?", timeout=max(self.switch_timeout, self.timeout))
        if not re.fullmatch(r"\s*\+?1\s*", reply):
            raise self._garbled(change + ";*OPC?", reply, "1 (operation complete)")
        errors = self._drain_errors(change)
        found = self._read_map()
        if errors:
            raise DeviceRejected(f"{self.name}: the unit rejected {change!r}: {'; '.join(map(str, errors))}; "
                                 f"map now {_show(found)}")
        if found != target:
            raise SwitchMismatch(self.name, target, found)
        log.info("%s: %s: %s", self.name, action, change)


def _channels(body: str) -> list[int]:
    out: list[int] = []
    for item in filter(None, (s.strip() for s in body.split(","))):
        lo, _, hi = item.partition(":")
        first, last = int(lo), int(hi or lo)
        if not 0 < first <= last < first + 10_000:
            raise ValueError(item)
        out.extend(range(first, last + 1))
    return out


def _lists(pairs: dict[int, int]) -> str:
    items = sorted(pairs.items())
    return f"(@{','.join(str(i) for i, _ in items)}),(@{','.join(str(e) for _, e in items)})"
