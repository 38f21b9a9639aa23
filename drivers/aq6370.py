"""Yokogawa AQ6370-series optical spectrum analyser (AQ6370C/D/E, AQ6373, AQ6375) over VISA.

The instrument's LAN port is a raw socket (`TCPIP::host::10001::SOCKET`, `\\r\\n` both ways)
that wants a login before any SCPI: `OPEN "user"` -> `AUTHENTICATE CRAM-MD5.`, password ->
`ready`. The driver logs in, checks `*IDN?`, then per call:

- sweep: `:ABOR` (a sweep a cancelled call may have left running), `*CLS`, span, resolution
  and sample count, `:INIT:SMOD SING`, the error queue checked, `:INIT`, then `:STAT:OPER:EVEN?` polled until bit 0 (sweep complete) or the timeout, when the
  sweep is aborted with `:ABOR`. The event register latches completion and `*CLS` cleared it,
  so a sweep that ended between two polls is not missed and a previous one is not mistaken for
  this one (the condition register can still show the previous sweep just after `:INIT`).
  Trace A is read as ASCII: `:TRAC:SNUM? TRA`, `:TRAC:X? TRA` (m), `:TRAC:Y? TRA` (dBm).
- WDM analysis: `:CALC:CAT WDM`, `:CALC`, `*OPC?`, the error queue, then `:CALC:DATA:NCH?`,
  `CWAV?`, `CPOW?`, `CSNR?`; each channel is placed on the ITU 100 GHz grid.

pyvisa blocks, so every exchange runs in a worker thread, one at a time per instrument behind
an asyncio lock, each bounded by the VISA timeout. After a failure that may leave the byte
stream out of step (no answer, garbage, a drop) the session is closed; the next call opens a
new one and logs in again, with a growing pause between failed reconnects. `health` follows
every call. The password never appears in a log, an exception or a repr.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import select
import socket
import time
from typing import Any, Callable, Iterable

import pyvisa
from pyvisa import constants

from qkdnode.errors import (
    ConfigError,
    DeviceProtocolError,
    DeviceRejected,
    DeviceUnauthorized,
    DeviceUnavailable,
    DriverError,
)
from qkdnode.interfaces import (DeviceHealth, Trace, WdmChannel, driver_settings, itu_channel, itu_frequency_thz,
                                nm_to_thz, quantum_band_power)

log = logging.getLogger("drivers.aq6370")

TERMINATION = "\r\n"
WAVELENGTH_RANGE_NM = (600.0, 1700.0)      # widest of the series (AQ6370: 600-1700 nm)
POINTS_RANGE = (101, 50001)
LOGIN_CHALLENGE = "AUTHENTICATE CRAM-MD5."
ANONYMOUS = "anonymous"

_SETTINGS = {"resource", "user", "password", "timeout", "sweep_timeout", "poll_interval", "resolution_nm",
             "points", "name", "visa_library", "backoff", "backoff_max", "down_after"}
_DEFAULTS: dict[str, Any] = {"user": ANONYMOUS, "timeout": 5.0, "sweep_timeout": 120.0, "poll_interval": 0.25,
                             "name": "aq6370", "visa_library": "@py", "backoff": 1.0, "backoff_max": 30.0,
                             "down_after": 3}
_SOCKET_RESOURCE = re.compile(r"^TCPIP\d*::[^:\s]+::\d{1,5}::SOCKET$", re.IGNORECASE)


class SweepTimeout(DeviceUnavailable):
    """A sweep did not complete within its timeout; the driver aborted it. The instrument still
    answers, so the session is kept."""


class Aq6370:
    """A SpectrumAnalyser: one AQ6370-series OSA on its LAN socket."""

    def __init__(self, *, resource: str, user: str = ANONYMOUS, password: str | None = None,
                 timeout: float = 5.0, sweep_timeout: float = 120.0, poll_interval: float = 0.25,
                 resolution_nm: float | None = None, points: int | None = None, name: str = "aq6370",
                 visa_library: str = "@py", backoff: float = 1.0, backoff_max: float = 30.0, down_after: int = 3):
        self.name = name
        self.resource = resource
        self.user = user
        # The anonymous account takes any string; an empty line might be taken for no answer.
        self._password = password or ANONYMOUS if user == ANONYMOUS else password or ""
        self.timeout = timeout
        self.sweep_timeout = sweep_timeout
        self.poll_interval = poll_interval
        self.resolution_nm = resolution_nm
        self.points = points
        self.visa_library = visa_library
        self.backoff, self.backoff_max = backoff, backoff_max
        self.health = DeviceHealth(down_after=down_after, on_change=self._health_changed)
        self.identity: str | None = None            # *IDN? of the instrument, once logged in
        self._lock = asyncio.Lock()
        self._rm: pyvisa.ResourceManager | None = None
        self._inst = None
        self._stale = False                          # a cancelled call left the stream out of step
        self._inflight: asyncio.Future | None = None  # a worker thread that outlived its caller
        self._retry_at = 0.0
        self._next_backoff = backoff
        self._connect_error = ""

    def __repr__(self) -> str:
        return f"<Aq6370 {self.name} {self.resource} user={self.user!r} health={self.health.state}>"

    # ------------------------------------------------------------ settings

    @classmethod
    def check_settings(cls, settings: dict[str, Any], *, file, key: str) -> dict[str, Any]:
        """Names, types and ranges of an OSA's settings, merged over the defaults. Touches no
        device and no file."""
        m, err = driver_settings(settings, file=file, key=key, known=_SETTINGS, defaults=_DEFAULTS)
        resource = m.get("resource")
        if not isinstance(resource, str) or not _SOCKET_RESOURCE.match(resource):
            raise err("resource", "a VISA socket resource like TCPIP::192.0.2.7::10001::SOCKET", resource,
                      missing="resource" not in m)
        for name in ("user", "name", "visa_library"):
            if not isinstance(m[name], str) or (name != "visa_library" and not m[name]):
                raise err(name, "a non-empty string" if name != "visa_library" else "a string", m[name])
        if '"' in m["user"] or any(c in m["user"] for c in "\r\n"):
            raise err("user", "a user name without quotes or line breaks", m["user"])
        if "password" in m:
            pw = m["password"]
            if not isinstance(pw, str) or any(c in pw for c in "\r\n"):
                raise ConfigError(file, f"{key}.password", "a string without line breaks",
                                  shown="a value that is not shown")
        elif m["user"] != ANONYMOUS:
            raise err("password", f"a password for user {m['user']!r} (only {ANONYMOUS!r} needs none)",
                      missing=True)
        for name in ("timeout", "sweep_timeout", "poll_interval", "backoff_max"):
            if not _number(m[name]) or m[name] <= 0:
                raise err(name, "a positive number of seconds", m[name])
        if not _number(m["backoff"]) or m["backoff"] < 0 or m["backoff"] > m["backoff_max"]:
            raise err("backoff", "a non-negative number of seconds, at most backoff_max", m["backoff"])
        if not isinstance(m["down_after"], int) or isinstance(m["down_after"], bool) or m["down_after"] < 1:
            raise err("down_after", "a positive integer (failures in a row)", m["down_after"])
        res = m.get("resolution_nm")
        if res is not None and (not _number(res) or not 0.005 <= res <= 10):
            raise err("resolution_nm", "a resolution in nm between 0.005 and 10 (e.g. 0.02, 0.1)", res)
        pts = m.get("points")
        if pts is not None and (not isinstance(pts, int) or isinstance(pts, bool)
                                or not POINTS_RANGE[0] <= pts <= POINTS_RANGE[1]):
            raise err("points", f"an integer from {POINTS_RANGE[0]} to {POINTS_RANGE[1]} (omit for automatic)", pts)
        return m

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, file, key: str) -> "Aq6370":
        m = cls.check_settings(settings, file=file, key=key)
        return cls(resource=m["resource"], user=m["user"], password=m.get("password"),
                   timeout=float(m["timeout"]), sweep_timeout=float(m["sweep_timeout"]),
                   poll_interval=float(m["poll_interval"]),
                   resolution_nm=float(m["resolution_nm"]) if m.get("resolution_nm") is not None else None,
                   points=m.get("points"), name=m["name"], visa_library=m["visa_library"],
                   backoff=float(m["backoff"]), backoff_max=float(m["backoff_max"]), down_after=m["down_after"])

    # ------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Open the session and log in now (a later call would do it anyway)."""
        await self._call(lambda: _done())

    async def close(self) -> None:
        async with self._lock:
            await self._settle()
            inst, self._inst = self._inst, None
            rm, self._rm = self._rm, None
            await asyncio.to_thread(_close_quietly, inst, rm, True)

    # ------------------------------------------------------------ the SpectrumAnalyser calls

    async def sweep(self, start_nm: float, stop_nm: float, timeout: float | None = None) -> Trace:
        """A single sweep from `start_nm` to `stop_nm`, waiting up to `timeout` seconds (default:
        the `sweep_timeout` setting) for completion; trace A as read after it."""
        if not (_number(start_nm) and _number(stop_nm)
                and WAVELENGTH_RANGE_NM[0] <= start_nm < stop_nm <= WAVELENGTH_RANGE_NM[1]):
            raise DeviceRejected(f"{self.resource}: a sweep needs {WAVELENGTH_RANGE_NM[0]:.0f} <= start < stop <= "
                                 f"{WAVELENGTH_RANGE_NM[1]:.0f} nm, asked {start_nm!r}..{stop_nm!r}")
        limit = self.sweep_timeout if timeout is None else timeout
        if not _number(limit) or limit <= 0:
            raise DeviceRejected(f"{self.resource}: a sweep timeout must be a positive number of seconds, "
                                 f"found {limit!r}")
        setup = [":ABOR", "*CLS", f":SENS:WAV:STAR {start_nm:.3f}NM", f":SENS:WAV:STOP {stop_nm:.3f}NM"]
        if self.resolution_nm is not None:
            setup.append(f":SENS:BAND:RES {self.resolution_nm:g}NM")
        setup.append(f":SENS:SWE:POIN {self.points}" if self.points else ":SENS:SWE:POIN:AUTO ON")
        setup.append(":INIT:SMOD SING")

        async def run() -> Trace:
            await self._io(lambda: self._write_all(setup))
            await self._check_errors("the sweep settings")
            await self._io(lambda: self._write_all([":INIT"]))
            loop = asyncio.get_running_loop()
            started = loop.time()
            deadline = started + limit
            while True:
                if _int(await self._ask1(":STAT:OPER:EVEN?"), self.resource, ":STAT:OPER:EVEN?") & 1:
                    break
                now = loop.time()
                if now >= deadline:
                    try:
                        await self._io(lambda: self._write_all([":ABOR"]))
                    except DriverError:
                        self._stale = True        # the session broke as well: a new one next time
                    raise SweepTimeout(f"{self.resource}: the sweep {start_nm:.3f}-{stop_nm:.3f} nm did not complete "
                                       f"within {limit:g} s; aborted")
                await asyncio.sleep(min(self.poll_interval, deadline - now))
            log.debug("%s: sweep %.3f-%.3f nm took %.2f s", self.name, start_nm, stop_nm, loop.time() - started)
            return await self._read_trace((start_nm, stop_nm))

        return await self._call(run)

    async def trace(self) -> Trace:
        """Trace A as the instrument holds it now, without sweeping."""
        return await self._call(lambda: self._read_trace(None))

    async def channels(self) -> list[WdmChannel]:
        """WDM analysis of the last sweep: the channels the instrument finds, on the ITU grid."""
        async def run() -> list[WdmChannel]:
            await self._io(lambda: self._write_all([":CALC:CAT WDM", ":CALC"]))
            if (opc := await self._ask1("*OPC?")) != "1":
                raise DeviceProtocolError(f"{self.resource}: *OPC? after the WDM analysis answered {_shown(opc)}")
            await self._check_errors("the WDM analysis (has a sweep run?)")
            n = _int(await self._ask1(":CALC:DATA:NCH?"), self.resource, ":CALC:DATA:NCH?")
            if n < 0:
                raise DeviceProtocolError(f"{self.resource}: :CALC:DATA:NCH? answered {n}")
            if n == 0:
                return []
            queries = [":CALC:DATA:CWAV?", ":CALC:DATA:CPOW?", ":CALC:DATA:CSNR?"]
            replies = await self._io(lambda: [self._query(q) for q in queries])
            waves, powers, osnrs = (_floats(r, self.resource, q, allow_nonfinite=(q.endswith("CSNR?")))
                                    for r, q in zip(replies, queries))
            for q, values in zip(queries, (waves, powers, osnrs)):
                if len(values) != n:
                    raise DeviceProtocolError(f"{self.resource}: {q} gave {len(values)} values for {n} channels")
            out = []
            for w, p, s in zip(waves, powers, osnrs):
                centre = w * 1e9
                if not 100 <= centre <= 3500:
                    raise DeviceProtocolError(f"{self.resource}: a channel centre of {w!r} m is no optical wavelength")
                out.append(WdmChannel(itu_channel=itu_channel(nm_to_thz(centre)), centre_nm=round(centre, 4),
                                      power_dbm=p, osnr_db=s if math.isfinite(s) else None))
            return out

        return await self._call(run)

    # ------------------------------------------------------------ one call: lock, session, health

    async def _call(self, body: Callable[[], Any]):
        async with self._lock:
            await self._settle()
            try:
                await self._ensure_session()
                result = await body()
            except DeviceRejected:
                self.health.ok()          # the instrument answered and said no: it is well
                raise
            except DriverError as exc:
                self.health.failed(exc)
                log.warning("%s: %s", self.name, exc)
                if not isinstance(exc, SweepTimeout):
                    await self._drop()
                raise
            except asyncio.CancelledError:
                self._stale = True
                raise
            except Exception as exc:      # a reply this driver did not foresee: still the device's health
                self.health.failed(exc)
                log.exception("%s: unexpected failure", self.name)
                await self._drop()
                raise
            self.health.ok()
            return result

    async def _settle(self) -> None:
        """Wait for a worker thread that a cancelled call left behind, and drop its session:
        a query may be half answered."""
        if self._inflight is not None:
            left, self._inflight = self._inflight, None
            await asyncio.wait({left})
            if not left.cancelled() and left.exception() is None \
                    and isinstance(left.result(), pyvisa.resources.MessageBasedResource):
                # a session opened for a caller that is gone: nobody will use it
                await asyncio.to_thread(_close_quietly, left.result(), None, False)
        if self._stale:
            self._stale = False
            await self._drop()

    async def _ensure_session(self) -> None:
        if self._inst is not None and await asyncio.to_thread(_stream_broken, self._inst):
            log.info("%s: the connection was closed while idle; reconnecting", self.name)
            await self._drop()
        if self._inst is not None:
            return
        now = time.monotonic()
        if now < self._retry_at:
            raise DeviceUnavailable(f"{self.resource}: not reconnecting for another {self._retry_at - now:.1f} s "
                                    f"after: {self._connect_error}")
        try:
            self._inst = await self._io(self._open)
        except DriverError as exc:
            self._connect_error = str(exc)
            self._retry_at = time.monotonic() + self._next_backoff
            self._next_backoff = min(max(self._next_backoff * 2, self.backoff), self.backoff_max)
            raise
        self._retry_at, self._next_backoff = 0.0, self.backoff
        log.info("%s: logged in to %s (%s)", self.name, self.resource, self.identity)

    async def _drop(self) -> None:
        inst, self._inst = self._inst, None
        if inst is not None:
            await asyncio.to_thread(_close_quietly, inst, None, False)

    async def _io(self, fn: Callable[[], Any]):
        """Run a blocking exchange in a worker thread. If the caller is cancelled the thread runs
        on (it cannot be stopped), so the next call waits for it before touching the instrument."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._inflight = fut
            raise

    async def _ask1(self, command: str) -> str:
        return await self._io(lambda: self._query(command))

    async def _check_errors(self, what: str) -> None:
        """Read the error queue; DeviceRejected naming every error if it is not empty."""
        def drain() -> list[str]:
            errors = []
            for _ in range(16):
                reply = self._query(":SYST:ERR?")
                code = reply.split(",", 1)[0].strip()
                try:
                    if int(code) == 0:
                        return errors
                except ValueError:
                    raise DeviceProtocolError(f"{self.resource}: :SYST:ERR? answered {_shown(reply)}") from None
                errors.append(reply)
            return errors
        errors = await self._io(drain)
        if errors:
            raise DeviceRejected(f"{self.resource}: the instrument refused {what}: {'; '.join(errors)}")

    async def _read_trace(self, expect: tuple[float, float] | None) -> Trace:
        queries = [":TRAC:SNUM? TRA", ":TRAC:X? TRA", ":TRAC:Y? TRA"]
        snum, xs_text, ys_text = await self._io(lambda: [self._query(q) for q in queries])
        n = _int(snum, self.resource, queries[0])
        if n <= 0:
            raise DeviceRejected(f"{self.resource}: trace A is empty (no sweep yet)")
        xs = _floats(xs_text, self.resource, queries[1])
        ys = _floats(ys_text, self.resource, queries[2])
        if len(xs) != n or len(ys) != n:
            raise DeviceProtocolError(f"{self.resource}: trace A has {n} samples but X has {len(xs)} and Y "
                                      f"{len(ys)}")
        nm = tuple(round(x * 1e9, 4) for x in xs)
        if any(b <= a for a, b in zip(nm, nm[1:])):
            raise DeviceProtocolError(f"{self.resource}: trace A's wavelengths do not increase")
        if expect is not None:
            start, stop = expect
            slack = max(0.05, 0.01 * (stop - start))
            if abs(nm[0] - start) > slack or abs(nm[-1] - stop) > slack:
                raise DeviceProtocolError(f"{self.resource}: asked a sweep {start:.3f}-{stop:.3f} nm, trace A spans "
                                          f"{nm[0]:.3f}-{nm[-1]:.3f} nm")
        return Trace(wavelengths_nm=nm, powers_dbm=tuple(ys))

    # ------------------------------------------------------------ blocking side (worker threads only)

    def _open(self):
        if self._rm is None:
            try:
                self._rm = pyvisa.ResourceManager(self.visa_library)
            except Exception as exc:       # a missing backend raises whatever its loader raises
                raise DeviceUnavailable(f"{self.resource}: VISA library {self.visa_library!r}: {exc}") from None
        ms = int(self.timeout * 1000)
        try:
            inst = self._rm.open_resource(self.resource, read_termination=TERMINATION,
                                          write_termination=TERMINATION, timeout=ms, open_timeout=ms)
        except Exception as exc:           # pyvisa-py raises a bare Exception when connect() fails
            raise DeviceUnavailable(f"{self.resource}: cannot connect: {exc}") from None
        try:
            reply = self._query(f'OPEN "{self.user}"', inst=inst)
            if reply != LOGIN_CHALLENGE:
                raise DeviceProtocolError(f"{self.resource}: answered {_shown(reply)} to OPEN, expected "
                                          f"{LOGIN_CHALLENGE!r} (is this an AQ6370's LAN port?)")
            reply = self._query(self._password, inst=inst, label="the password")
            if reply != "ready":
                shown = _shown(reply).replace(self._password, "***") if self._password else _shown(reply)
                raise DeviceUnauthorized(f"{self.resource}: login as {self.user!r} refused (answered {shown})")
            idn = self._query("*IDN?", inst=inst)
            parts = [p.strip() for p in idn.split(",")]
            if len(parts) < 2 or parts[0].upper() != "YOKOGAWA" or not parts[1].upper().startswith("AQ63"):
                raise DeviceProtocolError(f"{self.resource}: *IDN? answered {_shown(idn)}, not a Yokogawa AQ63xx "
                                          "in SCPI mode")
            self._write_all([":FORM:DATA ASC"], inst=inst)
        except BaseException:
            _close_quietly(inst, None, False)
            raise
        self.identity = idn
        return inst

    def _query(self, command: str, *, inst=None, label: str | None = None) -> str:
        inst = inst or self._inst
        label = label or command
        try:
            return inst.query(command).strip()
        except UnicodeDecodeError:
            raise DeviceProtocolError(f"{self.resource}: the answer to {label} is not ASCII text") from None
        except Exception as exc:
            raise self._transport_error(inst, label, exc) from None

    def _write_all(self, commands: Iterable[str], *, inst=None) -> None:
        inst = inst or self._inst
        for command in commands:
            try:
                inst.write(command)
            except Exception as exc:
                raise self._transport_error(inst, command, exc) from None

    def _transport_error(self, inst, label: str, exc: Exception) -> DriverError:
        if isinstance(exc, pyvisa.errors.VisaIOError) and exc.error_code == constants.StatusCode.error_timeout:
            if _stream_broken(inst, closed_only=True):
                return DeviceUnavailable(f"{self.resource}: the instrument closed the connection (at {label})")
            return DeviceUnavailable(f"{self.resource}: no answer to {label} within {self.timeout:g} s")
        if isinstance(exc, (OSError, pyvisa.errors.Error)):
            return DeviceUnavailable(f"{self.resource}: connection lost at {label} ({exc.__class__.__name__}: {exc})")
        return DeviceProtocolError(f"{self.resource}: {label}: {exc.__class__.__name__}: {exc}")

    def _health_changed(self, old: str, new: str) -> None:
        level = logging.INFO if new == "up" else logging.WARNING
        log.log(level, "%s: health %s -> %s%s", self.name, old, new,
                f" ({self.health.last_error})" if new != "up" else "")


# ---------------------------------------------------------------- classical power in the quantum band
# quantum_band_power lives in qkdnode.interfaces (pure logic on a Trace, shared with the node).

# ---------------------------------------------------------------- helpers


async def _done() -> None:
    return None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(reply: str, limit: int = 60) -> str:
    """A device's reply as it may appear in a message: short and printable."""
    text = reply if len(reply) <= limit else reply[:limit] + "..."
    return repr(text)


def _int(reply: str, resource: str, query: str) -> int:
    try:
        return int(reply.strip())
    except ValueError:
        try:
            value = float(reply)
        except ValueError:
            value = math.nan
        if value.is_integer():
            return int(value)
        raise DeviceProtocolError(f"{resource}: {query} answered {_shown(reply)}, not an integer") from None


def _floats(reply: str, resource: str, query: str, allow_nonfinite: bool = False) -> list[float]:
    try:
        values = [float(v) for v in reply.split(",")]
    except ValueError:
        raise DeviceProtocolError(f"{resource}: {query} answered {_shown(reply)}, not a list of numbers") from None
    if not allow_nonfinite and not all(math.isfinite(v) for v in values):
        raise DeviceProtocolError(f"{resource}: {query} answered a value that is not finite")
    return values


def _socket_of(inst) -> socket.socket | None:
    """The TCP socket under a pyvisa-py SOCKET session, or None for other backends."""
    try:
        sock = inst.visalib.sessions[inst.session].interface
    except Exception:
        return None
    return sock if isinstance(sock, socket.socket) else None


def _stream_broken(inst, closed_only: bool = False) -> bool:
    """Whether the instrument closed the connection (pyvisa-py shows that only as a read that
    times out), or, unless `closed_only`, bytes nobody asked for wait on it (the stream is out
    of step). False where the backend hides its socket."""
    sock = _socket_of(inst)
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b"" or not closed_only
    except (OSError, ValueError):
        return True


def _close_quietly(inst, rm, say_goodbye: bool) -> None:
    if inst is not None:
        if say_goodbye:
            try:
                inst.write("CLOSE")
            except Exception:
                pass
        try:
            inst.close()
        except Exception:
            pass
    if rm is not None:
        try:
            rm.close()
        except Exception:
            pass
