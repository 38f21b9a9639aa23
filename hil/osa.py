"""Emulated Yokogawa AQ6370-series optical spectrum analyser on a real TCP socket.

It speaks what the instrument speaks on its LAN port (10001 on hardware): `\\r\\n`-terminated
lines, a login first (`OPEN "user"` -> `AUTHENTICATE CRAM-MD5.`, password -> `ready`), then
SCPI with `;`-separated commands, short or long forms, an error queue read by `:SYST:ERR?`, and
an unknown or malformed query answered with silence (the error is queued), as real SCPI
instruments do. A single sweep takes `sweep_time` seconds; until it has elapsed the operation
status registers say "not complete" and trace A holds the previous sweep.

The light at the input is a C-band line of a CV-QKD trusted node as in the Madrid network:
classical DWDM carriers on the ITU 100 GHz grid over an amplifier's ASE floor, and a notch
filter over channels 34-38 that removes all classical light where the quantum channels sit at
a few photons per symbol. The WDM analysis works on the trace itself (peak search above a
threshold, noise interpolated beside each carrier), so its channels always agree with trace A.

Faults are set on command (`fault(...)`, `clear_faults()`): stop answering, answer slowly,
answer garbage, drop every connection, and leak classical light (a carrier or ASE) into the
notch.

This module is deliberately independent of qkdnode (its own ITU grid arithmetic, its own
parsing): it plays the instrument, and a shared helper would hide a shared bug.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from dataclasses import dataclass, field, fields

C_NM_THZ = 299_792.458          # c in nm * THz
TERM = b"\r\n"
WAVELENGTH_RANGE_NM = (600.0, 1700.0)
RESOLUTIONS_NM = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
POINTS_RANGE = (101, 50001)
IDN = "YOKOGAWA,AQ6370D,EMU0001,02.08"


def itu_thz(channel: int) -> float:
    """ITU-T G.694.1 100 GHz grid: C34 = 193.4 THz."""
    return 190.0 + channel / 10


def itu_nm(channel: int) -> float:
    return C_NM_THZ / itu_thz(channel)


def _logistic(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x > -700 else 0.0


def _db(mw: float) -> float:
    return 10 * math.log10(mw) if mw > 0 else -210.0


def _mw(dbm: float) -> float:
    return 10 ** (dbm / 10)


# ---------------------------------------------------------------- the light at the input


@dataclass
class Leak:
    """Classical light inside the notch: a carrier on an ITU channel (power at the peak), or,
    with `ase`, amplifier noise filling the whole notch (power per 0.1 nm)."""

    channel: int = 36
    power_dbm: float = -20.0
    ase: bool = False


@dataclass
class CBandSpectrum:
    """What the fibre carries, as an OSA would see it (levels at 0.1 nm resolution)."""

    classical: dict[int, float] = field(default_factory=lambda: {40: 1.0, 44: 0.0, 48: 2.5, 52: 3.0, 56: 1.5})
    quantum: dict[int, float] = field(default_factory=lambda: {34: -72.0, 37: -70.0, 38: -70.0})
    ase_dbm: float = -62.0            # the amplifiers' noise floor, per 0.1 nm
    notch: tuple[int, int] = (34, 38)  # ITU channels whose whole 100 GHz slots are cut
    notch_depth_db: float = 25.0
    instrument_floor_dbm: float = -85.0
    linewidth_nm: float = 0.02        # the carriers' own width; the OSA's resolution widens it
    seed: int = 6370

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    def notch_band_thz(self) -> tuple[float, float]:
        lo, hi = self.notch
        return itu_thz(lo) - 0.05, itu_thz(hi) + 0.05

    def _notch_loss(self, f_thz: float) -> float:
        """Transmission (linear) of the band-stop filter: flat outside, `notch_depth_db` inside,
        with edges some 10 GHz wide."""
        lo, hi = self.notch_band_thz()
        w = 0.004
        inside = _logistic((f_thz - lo) / w) * _logistic((hi - f_thz) / w)
        return 10 ** (-self.notch_depth_db * inside / 10)

    def sample(self, start_nm: float, stop_nm: float, points: int, rbw_nm: float,
               leak: Leak | None = None) -> tuple[list[float], list[float]]:
        """One sweep: wavelengths (nm) and levels (dBm in `rbw_nm`), with a little detector noise."""
        rng = self._rng
        width = math.hypot(self.linewidth_nm, rbw_nm)    # a line seen through the resolution filter
        noise_scale = rbw_nm / 0.1                        # noise levels are given per 0.1 nm
        lines = [(itu_nm(ch), _mw(p), True) for ch, p in self.classical.items()]
        lines += [(itu_nm(ch), _mw(p), False) for ch, p in self.quantum.items()]
        leak_ase = 0.0
        if leak is not None and leak.ase:
            leak_ase = _mw(leak.power_dbm) * noise_scale
        elif leak is not None:
            lines.append((itu_nm(leak.channel), _mw(leak.power_dbm), False))
        lo_thz, hi_thz = self.notch_band_thz()
        step = (stop_nm - start_nm) / (points - 1) if points > 1 else 0.0
        xs, ys = [], []
        ase = _mw(self.ase_dbm) * noise_scale
        floor = _mw(self.instrument_floor_dbm) * noise_scale
        for i in range(points):
            nm = start_nm + i * step
            f = C_NM_THZ / nm
            through = self._notch_loss(f)
            classical = ase
            added = 0.0
            for centre, p, is_classical in lines:
                x = (nm - centre) / width
                if abs(x) > 40:
                    continue
                # Gaussian core of the resolution filter plus the filter's weak far skirt.
                shape = math.exp(-4 * math.log(2) * x * x) + 1e-6 / (1 + 4 * x * x)
                if is_classical:
                    classical += p * shape
                else:
                    added += p * shape    # quantum channels and leaks enter after the notch
            if leak_ase and lo_thz <= f <= hi_thz:
                added += leak_ase
            noise = (classical * through) * 10 ** (rng.gauss(0, 0.15) / 10)
            level = noise + added + floor * rng.uniform(0.5, 1.5)
            xs.append(nm)
            ys.append(_db(level))
        return xs, ys


# ---------------------------------------------------------------- the instrument


class _Silent(Exception):
    """A query that gets no answer; the error is in the queue."""


@dataclass
class WdmResult:
    centres_nm: list[float]
    powers_dbm: list[float]
    osnr_db: list[float]


class Aq6370Model:
    """The instrument's state and its command set: `handle(line)` -> reply lines. Needs no socket."""

    def __init__(self, spectrum: CBandSpectrum | None = None, *, sweep_time: float = 1.0,
                 wdm_threshold_db: float = 20.0, noise_offset_nm: float = 0.4):
        self.spectrum = spectrum or CBandSpectrum()
        self.sweep_time = sweep_time
        self.wdm_threshold_db = wdm_threshold_db
        self.noise_offset_nm = noise_offset_nm
        self.leak: Leak | None = None
        self.sweeps = 0                                 # completed sweeps, for tests and the demo
        self.reset()

    def reset(self) -> None:
        self.start_nm, self.stop_nm = 1520.0, 1570.0
        self.rbw_nm = 0.1
        self.points: int | None = None                  # None: automatic
        self.sweep_mode = 1                             # 1 SINGLE 2 REPEAT 3 AUTO 4 SEGMENT
        self.category = "SWTH"
        self.errors: list[str] = []
        self.oper_event = 0
        self.trace: tuple[list[float], list[float]] = ([], [])
        self.trace_rbw = self.rbw_nm
        self.wdm: WdmResult | None = None
        self._sweep_ends: float | None = None
        self._sweep_args: tuple | None = None
        self._complete = False

    # -- sweep timing

    def _settle(self) -> None:
        if self._sweep_ends is not None and time.monotonic() >= self._sweep_ends:
            start, stop, points, rbw = self._sweep_args
            self.trace = self.spectrum.sample(start, stop, points, rbw, self.leak)
            self.trace_rbw = rbw
            self._sweep_ends = self._sweep_args = None
            self._complete = True
            self.oper_event |= 1
            self.sweeps += 1

    @property
    def sweeping(self) -> bool:
        self._settle()
        return self._sweep_ends is not None

    def seconds_to_sweep_end(self) -> float:
        self._settle()
        return 0.0 if self._sweep_ends is None else max(0.0, self._sweep_ends - time.monotonic())

    def sample_count(self) -> int:
        if self.points is not None:
            return self.points
        span = self.stop_nm - self.start_nm
        return max(POINTS_RANGE[0], min(POINTS_RANGE[1], int(round(span / (self.rbw_nm / 5))) + 1))

    # -- commands

    def handle(self, line: str) -> list[str]:
        """Run one line (commands separated by `;`); the replies of its queries, in order."""
        self._settle()
        out: list[str] = []
        for part in line.split(";"):
            part = part.strip()
            if not part:
                continue
            try:
                reply = self._one(part)
            except _Silent:
                continue
            if reply is not None:
                out.append(reply)
        return out

    def _error(self, code: int, text: str) -> None:
        if len(self.errors) < 30:
            self.errors.append(f'{code},"{text}"')

    def _one(self, command: str) -> str | None:
        header, _, arg = command.partition(" ")
        arg = arg.strip()
        key = _normalise(header)
        query = key.endswith("?")
        handler = _COMMANDS.get(key)
        if handler is None:
            self._error(-113, "Undefined header")
            if query:
                raise _Silent
            return None
        try:
            return handler(self, arg)
        except _Bad as exc:
            self._error(exc.code, exc.text)
            if query:
                raise _Silent from None
            return None

    # common commands
    def _idn(self, arg):
        return IDN

    def _cls(self, arg):
        self.errors.clear()
        self.oper_event = 0

    def _rst(self, arg):
        self.reset()

    def _opc_q(self, arg):
        return "1"

    def _syst_err(self, arg):
        return self.errors.pop(0) if self.errors else '0,"No error"'

    def _form(self, arg):
        if arg.upper() not in ("ASC", "ASCII"):
            raise _Bad(-221, "Settings conflict; this emulator answers in ASCII only")

    def _form_q(self, arg):
        return "ASCII"

    # sweep settings
    def _set_wavelength(self, arg: str) -> float:
        nm = _wavelength_nm(arg)
        if not WAVELENGTH_RANGE_NM[0] <= nm <= WAVELENGTH_RANGE_NM[1]:
            raise _Bad(-222, "Data out of range")
        return nm

    def _start(self, arg):
        self.start_nm = self._set_wavelength(arg)

    def _stop(self, arg):
        self.stop_nm = self._set_wavelength(arg)

    def _centre(self, arg):
        nm = self._set_wavelength(arg)
        half = (self.stop_nm - self.start_nm) / 2
        self.start_nm, self.stop_nm = nm - half, nm + half

    def _start_q(self, arg):
        return f"{self.start_nm * 1e-9:+.9E}"

    def _stop_q(self, arg):
        return f"{self.stop_nm * 1e-9:+.9E}"

    def _centre_q(self, arg):
        return f"{(self.start_nm + self.stop_nm) / 2 * 1e-9:+.9E}"

    def _span_q(self, arg):
        return f"{(self.stop_nm - self.start_nm) * 1e-9:+.9E}"

    def _span(self, arg):
        nm = _wavelength_nm(arg, absolute=False)
        if not 0 < nm <= WAVELENGTH_RANGE_NM[1] - WAVELENGTH_RANGE_NM[0]:
            raise _Bad(-222, "Data out of range")
        centre = (self.start_nm + self.stop_nm) / 2
        self.start_nm, self.stop_nm = centre - nm / 2, centre + nm / 2

    def _res(self, arg):
        nm = _wavelength_nm(arg, absolute=False)
        best = min(RESOLUTIONS_NM, key=lambda r: abs(r - nm))
        if abs(best - nm) > 1e-6:
            raise _Bad(-222, "Data out of range")
        self.rbw_nm = best

    def _res_q(self, arg):
        return f"{self.rbw_nm * 1e-9:+.9E}"

    def _points(self, arg):
        try:
            n = int(float(arg))
        except ValueError:
            raise _Bad(-104, "Data type error") from None
        if not POINTS_RANGE[0] <= n <= POINTS_RANGE[1]:
            raise _Bad(-222, "Data out of range")
        self.points = n

    def _points_q(self, arg):
        return str(self.sample_count())

    def _points_auto(self, arg):
        value = arg.upper()
        if value in ("ON", "1"):
            self.points = None
        elif value in ("OFF", "0"):
            self.points = self.sample_count()
        else:
            raise _Bad(-224, "Illegal parameter value")

    def _points_auto_q(self, arg):
        return "1" if self.points is None else "0"

    def _smod(self, arg):
        modes = {"SING": 1, "SINGLE": 1, "1": 1, "REP": 2, "REPEAT": 2, "2": 2, "AUTO": 3, "3": 3,
                 "SEGM": 4, "SEGMENT": 4, "4": 4}
        if arg.upper() not in modes:
            raise _Bad(-224, "Illegal parameter value")
        self.sweep_mode = modes[arg.upper()]

    def _smod_q(self, arg):
        return str(self.sweep_mode)

    def _init(self, arg):
        if self.sweep_mode != 1:
            raise _Bad(-221, "Settings conflict; this emulator sweeps in SINGLE mode only")
        if self.start_nm >= self.stop_nm:
            raise _Bad(-221, "Settings conflict")
        self._sweep_args = (self.start_nm, self.stop_nm, self.sample_count(), self.rbw_nm)
        self._sweep_ends = time.monotonic() + self.sweep_time
        self._complete = False
        self._settle()

    def _abort(self, arg):
        self._sweep_ends = self._sweep_args = None

    def _cond_q(self, arg):
        return "1" if self._complete and self._sweep_ends is None else "0"

    def _event_q(self, arg):
        value, self.oper_event = self.oper_event, 0
        return str(value)

    # traces (sweeps write trace A; the others stay empty here)
    def _trace_arg(self, arg) -> tuple[str, slice]:
        """`TRA[,start,stop]` with 1-based sample numbers -> (trace name, the samples' slice)."""
        name, *bounds = [a.strip().upper() for a in arg.split(",")]
        if name not in ("TRA", "TRB", "TRC", "TRD", "TRE", "TRF", "TRG") or len(bounds) not in (0, 2):
            raise _Bad(-224, "Illegal parameter value")
        if not bounds:
            return name, slice(None)
        try:
            first, last = int(bounds[0]), int(bounds[1])
        except ValueError:
            raise _Bad(-104, "Data type error") from None
        if not 1 <= first <= last:
            raise _Bad(-222, "Data out of range")
        return name, slice(first - 1, last)

    def _samples(self, arg, axis: int) -> list[float]:
        name, part = self._trace_arg(arg)
        return self.trace[axis][part] if name == "TRA" else []

    def _snum_q(self, arg):
        return str(len(self._samples(arg, 0)))

    def _x_q(self, arg):
        return ",".join(f"{x * 1e-9:+.9E}" for x in self._samples(arg, 0))

    def _y_q(self, arg):
        return ",".join(f"{y:+.3f}" for y in self._samples(arg, 1))

    # WDM analysis
    def _cat(self, arg):
        cats = {"SWTH", "SWENV", "SWRMS", "SWPKRMS", "NOTCH", "DFBLD", "FPLD", "LED", "SMSR",
                "POW", "PMD", "WDM", "NF", "FILPK", "FILBTM", "WFPK", "WFBTM"}
        if arg.upper() not in cats:
            raise _Bad(-224, "Illegal parameter value")
        self.category = arg.upper()

    def _cat_q(self, arg):
        return self.category

    def _calc(self, arg):
        if self.category != "WDM":
            raise _Bad(-221, "Settings conflict; this emulator analyses WDM only")
        self.wdm = self._analyse_wdm()

    def _need_wdm(self) -> WdmResult:
        if self.wdm is None:
            raise _Bad(-230, "Data corrupt or stale; no analysis")
        return self.wdm

    def _nch_q(self, arg):
        return str(len(self._need_wdm().centres_nm))

    def _cwav_q(self, arg):
        return ",".join(f"{c * 1e-9:+.9E}" for c in self._need_wdm().centres_nm) or "0"

    def _cpow_q(self, arg):
        return ",".join(f"{p:+.3f}" for p in self._need_wdm().powers_dbm) or "0"

    def _csnr_q(self, arg):
        return ",".join(f"{s:+.3f}" for s in self._need_wdm().osnr_db) or "0"

    def _analyse_wdm(self) -> WdmResult:
        """Peak search as the instrument's WDM function does: a channel is each run of samples
        within `wdm_threshold_db` of the highest peak; its centre is the power-weighted mean
        wavelength of the run, its power the peak level, its noise the level interpolated at
        +-`noise_offset_nm` and scaled to 0.1 nm, its OSNR power minus noise."""
        xs, ys = self.trace
        result = WdmResult([], [], [])
        if not xs:
            return result
        top = max(ys)
        level = top - self.wdm_threshold_db
        runs, run = [], []
        for i, y in enumerate(ys):
            if y >= level:
                run.append(i)
            elif run:
                runs.append(run)
                run = []
        if run:
            runs.append(run)
        for run in runs:
            weights = [_mw(ys[i]) for i in run]
            centre = sum(xs[i] * w for i, w in zip(run, weights)) / sum(weights)
            peak = max(ys[i] for i in run)
            left = _level_at(xs, ys, centre - self.noise_offset_nm)
            right = _level_at(xs, ys, centre + self.noise_offset_nm)
            noise = _db((_mw(left) + _mw(right)) / 2) + 10 * math.log10(0.1 / self.trace_rbw)
            result.centres_nm.append(centre)
            result.powers_dbm.append(peak)
            result.osnr_db.append(peak - noise)
        return result


def _level_at(xs: list[float], ys: list[float], nm: float) -> float:
    """The trace's level at `nm` (clamped to the trace), linearly interpolated in dB."""
    if nm <= xs[0]:
        return ys[0]
    if nm >= xs[-1]:
        return ys[-1]
    step = (xs[-1] - xs[0]) / (len(xs) - 1)
    i = min(int((nm - xs[0]) / step), len(xs) - 2)
    t = (nm - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


class _Bad(Exception):
    def __init__(self, code: int, text: str):
        self.code, self.text = code, text


_NUMBER_UNIT = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*$")


def _wavelength_nm(arg: str, absolute: bool = True) -> float:
    """A wavelength argument as the instrument takes it: a number in m, or with NM/UM/M, or (for
    an absolute wavelength) a frequency with THZ."""
    m = _NUMBER_UNIT.match(arg)
    if not m:
        raise _Bad(-104, "Data type error")
    value, unit = float(m.group(1)), m.group(2).upper()
    if unit == "NM":
        nm = value
    elif unit == "UM":
        nm = value * 1e3
    elif unit in ("", "M"):
        nm = value * 1e9
    elif unit == "THZ" and absolute and value > 0:
        nm = C_NM_THZ / value
    else:
        raise _Bad(-131, "Invalid suffix")
    if not math.isfinite(nm):
        raise _Bad(-222, "Data out of range")
    return nm


def _short(node: str) -> str:
    """SCPI short form of one header node: the first four letters, three if the fourth is a vowel."""
    query = node.endswith("?")
    node = node.rstrip("?").upper()
    if len(node) > 4:
        node = node[:3] if node[3] in "AEIOU" else node[:4]
    return node + ("?" if query else "")


_OPTIONAL = {"INIT:IMM": "INIT", "TRAC:DATA:X?": "TRAC:X?", "TRAC:DATA:Y?": "TRAC:Y?", "FORM:DATA": "FORM",
             "FORM:DATA?": "FORM?", "SENS:BWID:RES": "SENS:BAND:RES", "SENS:BWID:RES?": "SENS:BAND:RES?",
             "CALC:IMM": "CALC", "INIT:IMM?": "INIT?"}


def _normalise(header: str) -> str:
    if header.startswith("*"):
        return header.upper()
    nodes = [_short(n) for n in header.strip(":").split(":") if n]
    key = ":".join(nodes)
    return _OPTIONAL.get(key, key)


M = Aq6370Model
_COMMANDS = {
    "*IDN?": M._idn, "*CLS": M._cls, "*RST": M._rst, "*OPC?": M._opc_q, "SYST:ERR?": M._syst_err,
    "FORM": M._form, "FORM?": M._form_q,
    "SENS:WAV:STAR": M._start, "SENS:WAV:STAR?": M._start_q, "SENS:WAV:STOP": M._stop,
    "SENS:WAV:STOP?": M._stop_q, "SENS:WAV:CENT": M._centre, "SENS:WAV:CENT?": M._centre_q,
    "SENS:WAV:SPAN": M._span, "SENS:WAV:SPAN?": M._span_q,
    "SENS:BAND:RES": M._res, "SENS:BAND:RES?": M._res_q,
    "SENS:SWE:POIN": M._points, "SENS:SWE:POIN?": M._points_q,
    "SENS:SWE:POIN:AUTO": M._points_auto, "SENS:SWE:POIN:AUTO?": M._points_auto_q,
    "INIT:SMOD": M._smod, "INIT:SMOD?": M._smod_q, "INIT": M._init, "ABOR": M._abort,
    "STAT:OPER:COND?": M._cond_q, "STAT:OPER:EVEN?": M._event_q,
    "TRAC:SNUM?": M._snum_q, "TRAC:X?": M._x_q, "TRAC:Y?": M._y_q,
    "CALC:CAT": M._cat, "CALC:CAT?": M._cat_q, "CALC": M._calc,
    "CALC:DATA:NCH?": M._nch_q, "CALC:DATA:CWAV?": M._cwav_q, "CALC:DATA:CPOW?": M._cpow_q,
    "CALC:DATA:CSNR?": M._csnr_q,
}
del M


# ---------------------------------------------------------------- the LAN port


@dataclass
class OsaFaults:
    """Faults set on command. `hang`: reads everything, answers nothing, executes nothing.
    `delay`: seconds before each answer. `garbage`: every query after login is answered with
    bytes that are no SCPI reply. `drop`: every open connection is closed at once, and each new
    one as soon as it is accepted. `leak`: classical light inside the notch (see `Leak`)."""

    hang: bool = False
    delay: float = 0.0
    garbage: bool = False
    drop: bool = False
    leak: Leak | None = None


class Aq6370Emulator:
    """The model behind an asyncio TCP server, with the instrument's login and the faults."""

    def __init__(self, spectrum: CBandSpectrum | None = None, *, sweep_time: float = 1.0,
                 users: dict[str, str | None] | None = None, **model_options):
        self.model = Aq6370Model(spectrum, sweep_time=sweep_time, **model_options)
        # user -> password; None accepts any password (the instrument's "anonymous" account).
        self.users = {"anonymous": None} if users is None else dict(users)
        self.faults = OsaFaults()
        self.host = "127.0.0.1"
        self.port = 0
        self.logins = 0                      # successful logins, so tests can see reconnects
        self.refused_logins = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._garbage_rng = random.Random(17)

    @property
    def resource(self) -> str:
        """The VISA resource name a driver uses to reach this instrument."""
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    @property
    def spectrum(self) -> CBandSpectrum:
        return self.model.spectrum

    @property
    def sweep_time(self) -> float:
        return self.model.sweep_time

    @sweep_time.setter
    def sweep_time(self, seconds: float) -> None:
        self.model.sweep_time = seconds

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- faults

    def fault(self, **changes) -> None:
        """Set faults by name, e.g. `fault(hang=True)`, `fault(leak=Leak(36, -20.0))`."""
        known = {f.name for f in fields(OsaFaults)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"no fault named {name!r}; faults are {', '.join(sorted(known))}")
            setattr(self.faults, name, value)
        self.model.leak = self.faults.leak
        if self.faults.drop:
            self._close_all()

    def clear_faults(self) -> None:
        self.faults = OsaFaults()
        self.model.leak = None

    def _close_all(self) -> None:
        for writer in list(self._conns):
            writer.close()

    # -- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._conns.add(writer)
        try:
            if self.faults.drop:
                return
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass          # stop() ends the sessions; the connection is closed below
        finally:
            self._conns.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        user: str | None = None
        logged_in = False
        while True:
            raw = await reader.readline()
            if not raw:
                return
            if self.faults.drop:
                return
            if self.faults.hang:
                continue
            line = raw.decode("ascii", "replace").strip()
            if not line and (logged_in or user is None):
                continue
            if not logged_in:
                if user is None:
                    m = re.fullmatch(r'OPEN\s+"([^"]*)"', line, re.IGNORECASE)
                    if not m:
                        continue         # nothing but the login is heard before it
                    user = m.group(1)
                    await self._send(writer, "AUTHENTICATE CRAM-MD5.")
                    continue
                if user in self.users and self.users[user] in (None, line):
                    logged_in = True
                    self.logins += 1
                    await self._send(writer, "ready")
                    continue
                self.refused_logins += 1
                await self._send(writer, "error")
                return
            if line.upper() == "CLOSE":
                return
            for command in line.split(";"):
                if command.strip().upper() == "*OPC?":
                    # answered once pending operations (a running sweep) are complete
                    await asyncio.sleep(self.model.seconds_to_sweep_end())
                for reply in self.model.handle(command):
                    if self.faults.garbage:
                        await self._send_raw(writer, self._garbage())
                    else:
                        await self._send(writer, reply)

    def _garbage(self) -> bytes:
        rng = self._garbage_rng
        if rng.random() < 0.5:
            return bytes(rng.choice(range(128, 256)) for _ in range(rng.randint(3, 40))) + TERM
        return rng.choice([b"#@!%NaN,,--", b"?\x1b[2J", b"+1.2.3E,zz", b"OVER"]) + TERM

    async def _send(self, writer: asyncio.StreamWriter, text: str) -> None:
        await self._send_raw(writer, text.encode("ascii") + TERM)

    async def _send_raw(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if self.faults.delay:
            await asyncio.sleep(self.faults.delay)
        if self.faults.hang or writer.is_closing():
            return
        writer.write(data)
        await writer.drain()
