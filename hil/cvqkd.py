"""Emulated CV-QKD module pair: a transmitter and a receiver sharing one link, each speaking
qkdnode's CV-QKD line protocol (docs/protocols/cv-qkd.md) on its own pseudo-terminal.

Each module serves the master side of an `os.openpty()` pair with asyncio. It publishes the
slave tty under a stable symlink, as udev's /dev/serial/by-id/ does. The driver opens that
path exactly as it would open /dev/ttyUSB0. When the emulator drops the line, the pty goes
away and the symlink with it. When the line comes back, it is a new pty behind the same
symlink.

The link model: key rates interpolated (log-linear) between the HWDU figures of the OpenQKD
UC33 table (shared/reference/field-trials.md 1.2): 1.7e4 b/s at 1.6 dB, 7e3 at 10 dB, 4.3e3
at 13.3 dB, 1e2 at 19 dB, 70 at 21 dB, 36 at 22.8 dB, none above 23 dB of channel loss or
28 dB of channel plus trusted transmit loss. The rate is scaled by the modulation (best at
2.5 photons per symbol) and by excess noise (none at 0.05 SNU). SNR follows from the loss,
the modulation and the noise. Blocks are paced so that the bits left after removing the
leakage, per emulated second, equal the rate the modules report. `time_scale` makes
emulated time run faster than real time (rates multiply, tuning shortens), so tests take
seconds.

Faults on command: per module `faults.hang` (stops answering), `faults.delay` (slow replies),
`faults.garbage` (garbled replies and events), `drop_line()` / `open_line()` (the pty goes
away and comes back), `corrupt_next_block()` (one BLOCK line with a bad checksum),
`power_cycle()` (reset, `* READY`), `send_raw()` (any bytes); per link `set_excess_noise()`
(key stops: no-key, NOISE alarm), `set_channel_loss()` and `time_scale`. `SerialServer`
puts a module behind TCP, as ser2net does, for drivers configured with `socket://`.

Like hil/kme.py, this module has its own framing code on purpose: a parser shared with the
driver would hide a bug the two share.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import random
import secrets
import termios
import time
import tty
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROTO = 1
MAX_LINE = 16384
CHANNELS = (17, 61)                  # C band on the 100 GHz grid: 191.7-196.1 THz
MOD_RANGE = (0.1, 20.0)              # photons per symbol
TXLOSS_RANGE = (0.0, 15.0)           # dB
MAX_CHANNEL_LOSS_DB = 23.0           # "The HWDU QKD devices support link losses between 0 and 23dB"
MAX_TOTAL_LOSS_DB = 28.0             # "a total link loss of up to 28dB" with trusted TX loss
BEST_PHOTONS = 2.5
XI_MAX = 0.05                        # SNU: no key at or above this excess noise
ETA, V_EL = 0.6, 0.05                # receiver efficiency and electronic noise (SNU)

# (channel loss dB, secret key rate b/s): UC33, HWDU CV-QKD, measured by the devices.
RATE_ANCHORS = ((0.0, 1.75e4), (1.6, 1.7e4), (10.0, 7.0e3), (13.3, 4.3e3), (19.0, 1.0e2), (21.0, 70.0),
                (22.8, 36.0), (23.0, 33.0))


def anchor_rate(loss_db: float) -> float:
    """Secret key rate in b/s at this channel loss (log-linear between the UC33 anchors)."""
    if loss_db > MAX_CHANNEL_LOSS_DB:
        return 0.0
    loss_db = max(loss_db, 0.0)
    for (l0, r0), (l1, r1) in zip(RATE_ANCHORS, RATE_ANCHORS[1:]):
        if loss_db <= l1:
            f = (loss_db - l0) / (l1 - l0)
            return 10 ** (math.log10(r0) + f * (math.log10(r1) - math.log10(r0)))
    return RATE_ANCHORS[-1][1]


def modulation_factor(photons: float) -> float:
    return math.exp(-(math.log(photons / BEST_PHOTONS) ** 2) / (2 * 0.7 ** 2))


def _crc(payload: bytes) -> str:
    return f"{zlib.crc32(payload):08x}"


def _fmt(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.6g}"


@dataclass
class Faults:
    """Faults of one module's controller, set by tests and the testbed.

    `hang`: the controller stops answering (requests are ignored, events are not sent; blocks
    still go to the store). `delay`: seconds before each reply. `garbage`: every reply is
    replaced by a garbled line, and junk lines appear between events."""

    hang: bool = False
    delay: float = 0.0
    garbage: bool = False


class CvModule:
    """One end of the link: a controller with a serial line, a state machine and a block store."""

    def __init__(self, link: "CvLink", role: str, port: Path):
        self.link, self.role, self.port = link, role, port
        self.serial = f"{'TX' if role == 'transmitter' else 'RX'}-{secrets.token_hex(2)}"
        self.faults = Faults()
        self.state, self.reason = "idle", ""
        self.channel: int | None = None
        self.tuned_at = 0.0                      # monotonic time at which tuning completes
        self.store: OrderedDict[str, tuple[int, int, bytes]] = OrderedDict()  # id -> nbits, leaked, bits
        self.alarms: dict[str, str] = {}
        self.tty: str | None = None              # the current slave path (changes when the line comes back)
        self.requests: list[str] = []            # verbs received, for tests
        self.corrupted: list[str] = []           # ids of BLOCK lines sent corrupted on purpose
        self._corrupt_next = False
        self._master: int | None = None
        self._slave: int | None = None
        self._inbuf = bytearray()
        self._outq: list[bytes] = []
        self._out_bytes = 0
        self._writing = False

    # ------------------------------------------------------------ the line (pty)

    @property
    def line_up(self) -> bool:
        return self._master is not None

    def open_line(self) -> None:
        """Create a pty and point the stable path at it (a USB adapter plugged in)."""
        if self._master is not None:
            return
        master, slave = os.openpty()
        tty.setraw(slave)          # no echo, no CR/LF translation until the driver configures it
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.tty = os.ttyname(slave)
        tmp = self.port.with_name(self.port.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self.tty, tmp)
        os.replace(tmp, self.port)
        self._inbuf.clear()
        asyncio.get_running_loop().add_reader(master, self._readable)

    def drop_line(self) -> None:
        """Close the pty and remove the path (a USB adapter pulled out). The module keeps working."""
        if self._master is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._master)
        loop.remove_writer(self._master)
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._master = self._slave = None
        self._outq.clear()
        self._out_bytes = 0
        self._writing = False
        with contextlib.suppress(FileNotFoundError):
            self.port.unlink()

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except BlockingIOError:
            return
        except OSError:
            return
        self._inbuf += data
        while (i := self._inbuf.find(b"\n")) >= 0:
            raw = bytes(self._inbuf[:i])
            del self._inbuf[:i + 1]
            self._on_line(raw)
        if len(self._inbuf) > MAX_LINE:
            self._inbuf.clear()
            self._reply("-", "ERR 413 line too long")

    def _send(self, payload: str | bytes, *, framed: bool = True) -> None:
        """Queue one line. If nobody reads the pty, the queue stays bounded by dropping whole
        lines, as a UART talking into an unplugged cable loses them."""
        if self._master is None:
            return
        if framed:
            p = payload.encode() if isinstance(payload, str) else payload
            data = p + b" " + _crc(p).encode() + b"\r\n"
        else:
            data = payload if isinstance(payload, bytes) else payload.encode()
        if self._out_bytes + len(data) > 512 * 1024:
            return
        self._outq.append(data)
        self._out_bytes += len(data)
        self._flush()

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._outq and self._master is not None:
            try:
                n = os.write(self._master, self._outq[0])
            except BlockingIOError:
                n = 0
            except OSError:              # the pty is going away; what was queued is lost with it
                self._outq.clear()
                self._out_bytes = 0
                break
            self._out_bytes -= n
            if n < len(self._outq[0]):
                self._outq[0] = self._outq[0][n:]
                if not self._writing:
                    loop.add_writer(self._master, self._flush)
                    self._writing = True
                return
            self._outq.pop(0)
        if self._writing and self._master is not None:
            loop.remove_writer(self._master)
        self._writing = False

    def send_raw(self, data: bytes) -> None:
        """Put bytes on the line as they are (tests of hostile input)."""
        self._send(data, framed=False)

    # ------------------------------------------------------------ faults on command

    def corrupt_next_block(self) -> None:
        """Flip one character of the next BLOCK line's data, leaving its checksum as it was."""
        self._corrupt_next = True

    def power_cycle(self) -> None:
        """Reset the controller: settings, store and alarms lost; announces `* READY`."""
        self.state, self.reason, self.channel = "idle", "", None
        if self.role == "transmitter":
            self.link.photons = BEST_PHOTONS
        self.store.clear()
        self.alarms.clear()
        self._event(f"READY {PROTO}")

    # ------------------------------------------------------------ events and replies

    def _event(self, text: str) -> None:
        if self.faults.hang:
            return
        if self.faults.garbage and random.random() < 0.3:     # this event is lost to the host
            return self._send(_garble(f"* {text}"), framed=False)
        self._send(f"* {text}")

    def _reply(self, tag: str, text: str) -> None:
        if self.faults.hang:
            return
        line = f"{tag} {text}"
        if self.faults.garbage:
            out = _garble(line)
            send = lambda: self._send(out, framed=False)  # noqa: E731
        else:
            send = lambda: self._send(line)  # noqa: E731
        if self.faults.delay > 0:
            asyncio.get_running_loop().call_later(self.faults.delay, send)
        else:
            send()

    def set_state(self, state: str, reason: str = "") -> None:
        if (state, reason) == (self.state, self.reason):
            return
        self.state, self.reason = state, reason
        self._event(f"STATE {state} {reason}".rstrip())
        for name in ("LOSS", "NOISE", "SIGNAL"):
            if reason == name.lower() and name not in self.alarms:
                self._alarm(name, True, self.link.alarm_text(name))
            elif reason != name.lower() and name in self.alarms:
                self._alarm(name, False)

    def _alarm(self, name: str, raised: bool, text: str = "") -> None:
        if raised:
            self.alarms[name] = text
            self._event(f"ALARM {name} raised {text}".rstrip())
        else:
            self.alarms.pop(name, None)
            self._event(f"ALARM {name} cleared")

    def take_block(self, block_id: str, nbits: int, leaked: int, bits: bytes) -> None:
        while len(self.store) >= self.link.store_blocks:
            self.store.popitem(last=False)
            if "STORE" not in self.alarms:
                self._alarm("STORE", True, "block store full, oldest blocks dropped")
        self.store[block_id] = (nbits, leaked, bits)
        fields = f"{block_id} {nbits} {leaked} {base64.b64encode(bits).decode()}"
        if self._corrupt_next and not self.faults.hang and self._master is not None:
            self._corrupt_next = False
            self.corrupted.append(block_id)
            payload = f"* BLOCK {fields}"
            good_crc = _crc(payload.encode())
            i = len(payload) - 3                         # inside the base64, before any padding
            flipped = payload[:i] + ("A" if payload[i] != "A" else "B") + payload[i + 1:]
            self._send(f"{flipped} {good_crc}\r\n", framed=False)
            return
        self._event(f"BLOCK {fields}")

    # ------------------------------------------------------------ requests

    def _on_line(self, raw: bytes) -> None:
        raw = raw.rstrip(b"\r")
        if not raw:
            return
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return self._reply("-", "ERR 400 line is not ASCII")
        if not text.isprintable():
            return self._reply("-", "ERR 400 line has control characters")
        payload, _, crc = text.rpartition(" ")
        if len(crc) != 8 or crc.lower() != _crc(payload.encode()):
            return self._reply("-", "ERR 401 checksum failed")
        parts = payload.split(" ")
        tag = parts[0]
        if not (1 <= len(tag) <= 8 and tag.isalnum() and tag.isascii()) or len(parts) < 2:
            return self._reply("-", "ERR 400 no tag or no verb")
        verb, args = parts[1], parts[2:]
        self.requests.append(verb)
        handler = _HANDLERS.get(verb)
        if handler is None:
            return self._reply(tag, f"ERR 405 unknown request {verb[:16]}")
        try:
            answer = handler(self, args)
        except _Err as exc:
            return self._reply(tag, f"ERR {exc.code} {exc.text}")
        self._reply(tag, f"OK {answer}".rstrip())

    def _measure(self) -> dict[str, float]:
        if self.state not in ("running", "no-key") or self.reason == "signal":
            return dict(snr=math.nan, xnoise=math.nan, loss=math.nan, skr=0.0)
        m = self.link.measure()
        if self.state != "running":
            m["skr"] = 0.0
        return m

    def _status(self) -> str:
        m = self._measure()
        return (f"state={self.state} reason={self.reason or '-'} channel={self.channel or 'none'} "
                f"mod={_fmt(self.link.photons)} snr={_fmt(m['snr'])} xnoise={_fmt(m['xnoise'])} "
                f"loss={_fmt(m['loss'])} txloss={_fmt(self.link.trusted_tx_loss_db)} skr={_fmt(m['skr'])} "
                f"stored={len(self.store)}")

    def _ack(self, ids: list[str]) -> str:
        if not 1 <= len(ids) <= 32:
            raise _Err(400, "ACK takes 1 to 32 block ids")
        n = sum(self.store.pop(i, None) is not None for i in ids)
        if "STORE" in self.alarms and len(self.store) < self.link.store_blocks:
            self._alarm("STORE", False)
        return str(n)


class _Err(Exception):
    def __init__(self, code: int, text: str):
        self.code, self.text = code, text


def _no_args(args: list[str]) -> None:
    if args:
        raise _Err(400, "this request takes no argument")


def _one_number(args: list[str], lo: float, hi: float, what: str, integer: bool = False) -> float:
    if len(args) != 1:
        raise _Err(400, f"expected one {what}")
    try:
        x = int(args[0]) if integer else float(args[0])
    except ValueError:
        raise _Err(400, f"{what} is not a number") from None
    if not (lo <= x <= hi):
        raise _Err(422, f"{what} {args[0][:12]} is outside {lo:g}-{hi:g}")
    return x


def _start(m: CvModule, args):
    _no_args(args)
    if m.channel is None:
        raise _Err(409, "no channel set; TUNE first")
    if m.state in ("idle", "fault"):
        m.link.begin_tuning(m)
    return ""


def _stop(m: CvModule, args):
    _no_args(args)
    m.set_state("idle")
    return ""


def _tune(m: CvModule, args):
    ch = int(_one_number(args, *CHANNELS, "channel", integer=True))
    if ch != m.channel:
        m.channel = ch
        if m.state != "idle":
            m.link.begin_tuning(m)
    return ""


def _mod(m: CvModule, args):
    if m.role != "transmitter":
        raise _Err(405, "modulation is set at the transmitter")
    m.link.photons = _one_number(args, *MOD_RANGE, "photons per symbol")
    return ""


def _txloss(m: CvModule, args):
    if m.role != "transmitter":
        raise _Err(405, "trusted transmit loss is set at the transmitter")
    m.link.trusted_tx_loss_db = _one_number(args, *TXLOSS_RANGE, "trusted transmit loss")
    return ""


def _query(key: str):
    def handler(m: CvModule, args):
        _no_args(args)
        return _fmt(m._measure()[key])
    return handler


def _state(m: CvModule, args):
    _no_args(args)
    return f"{m.state} {m.reason}".rstrip()


def _idn(m: CvModule, args):
    _no_args(args)
    return (f"vendor=qkdnode model=CVQKD-EMU serial={m.serial} fw=1.0 proto={PROTO} role={m.role} "
            f"channels={CHANNELS[0]}-{CHANNELS[1]} block={m.link.block_bits} maxblock=65536 "
            f"store={m.link.store_blocks}")


def _list(m: CvModule, args):
    offset = int(_one_number(args, 0, 1 << 30, "offset", integer=True)) if args else 0
    ids = list(m.store)[offset:offset + 64]
    return " ".join([str(len(m.store)), *ids])


def _get(m: CvModule, args):
    if len(args) != 1:
        raise _Err(400, "GET takes one block id")
    if args[0] not in m.store:
        raise _Err(404, "no such block")
    nbits, leaked, bits = m.store[args[0]]
    return f"{args[0]} {nbits} {leaked} {base64.b64encode(bits).decode()}"


_HANDLERS = {
    "IDN?": _idn,
    "START": _start,
    "STOP": _stop,
    "TUNE": _tune,
    "TUNE?": lambda m, a: (_no_args(a), str(m.channel or "none"))[1],
    "MOD": _mod,
    "MOD?": lambda m, a: (_no_args(a), _fmt(m.link.photons))[1],
    "TXLOSS": _txloss,
    "TXLOSS?": lambda m, a: (_no_args(a), _fmt(m.link.trusted_tx_loss_db))[1],
    "SNR?": _query("snr"),
    "XNOISE?": _query("xnoise"),
    "LOSS?": _query("loss"),
    "SKR?": _query("skr"),
    "STATE?": _state,
    "STATUS?": lambda m, a: (_no_args(a), m._status())[1],
    "ALARMS?": lambda m, a: (_no_args(a), " ".join(sorted(m.alarms)))[1],
    "LIST?": _list,
    "GET": _get,
    "ACK": lambda m, a: m._ack(a),
}


def _garble(line: str) -> bytes:
    """A line as a bad cable or a wrong baud rate delivers it: one of several kinds of wrong."""
    kind = random.randrange(4)
    if kind == 0:                                   # right shape, wrong checksum
        return f"{line} {random.getrandbits(32):08x}\r\n".encode()
    if kind == 1:                                   # a character flipped after framing
        framed = f"{line} {_crc(line.encode())}"
        i = random.randrange(len(framed) - 9)
        return (framed[:i] + chr(((ord(framed[i]) - 32 + 7) % 94) + 33) + framed[i + 1:] + "\r\n").encode()
    if kind == 2:                                   # wrong baud rate: bytes of no character set
        return bytes(random.randrange(128, 256) for _ in range(random.randrange(4, 40))) + b"\r\n"
    return b"OK OK ERR * BLOCK " + secrets.token_hex(8).encode() + b"\r\n"   # no checksum at all


class CvLink:
    """The fibre between the two modules and the reconciliation they run together."""

    def __init__(self, directory: Path, *, channel_loss_db: float = 10.0, trusted_tx_loss_db: float = 3.0,
                 excess_noise: float = 0.01, photons: float = BEST_PHOTONS, block_bits: int = 8192,
                 time_scale: float = 1.0, tune_seconds: float = 20.0, store_blocks: int = 256, name: str = "cvqkd",
                 fibre: Callable[[], bool] | None = None):
        if block_bits % 8 or not 8 <= block_bits <= 65536:
            raise ValueError("block_bits must be a multiple of 8 from 8 to 65536")
        self.directory = Path(directory)
        self.channel_loss_db, self.trusted_tx_loss_db = channel_loss_db, trusted_tx_loss_db
        self.excess_noise, self.photons = excess_noise, photons
        self.block_bits, self.time_scale, self.tune_seconds = block_bits, time_scale, tune_seconds
        self.store_blocks = store_blocks
        # The fibre between the modules, e.g. through optical switches: no light, no key.
        self.fibre = fibre or (lambda: True)
        self.session = secrets.token_hex(4)
        self.blocks_made = 0
        self.tx = CvModule(self, "transmitter", self.directory / f"{name}-tx")
        self.rx = CvModule(self, "receiver", self.directory / f"{name}-rx")
        self._credit = 0.0
        self._task: asyncio.Task | None = None

    @property
    def modules(self) -> tuple[CvModule, CvModule]:
        return self.tx, self.rx

    async def start(self) -> "CvLink":
        self.directory.mkdir(parents=True, exist_ok=True)
        for m in self.modules:
            m.open_line()
        self._task = asyncio.create_task(self._run(), name="cvqkd link")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for m in self.modules:
            m.drop_line()

    async def __aenter__(self) -> "CvLink":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ------------------------------------------------------------ conditions on command

    def set_channel_loss(self, db: float) -> None:
        self.channel_loss_db = db

    def set_excess_noise(self, snu: float) -> None:
        self.excess_noise = snu

    # ------------------------------------------------------------ the model

    def ready(self, m: CvModule, now: float | None = None) -> bool:
        """Tuned and calibrated: running, no-key, or at the end of its tuning."""
        now = time.monotonic() if now is None else now
        return m.state in ("running", "no-key") or (m.state == "tuning" and now >= m.tuned_at)

    def conditions(self, now: float | None = None) -> str:
        """'' if key can be made, else the no-key reason."""
        if not all(self.ready(m, now) for m in self.modules) or self.tx.channel != self.rx.channel or \
                not self.fibre():
            return "signal"
        if self.channel_loss_db > MAX_CHANNEL_LOSS_DB or \
                self.channel_loss_db + self.trusted_tx_loss_db > MAX_TOTAL_LOSS_DB:
            return "loss"
        if self.excess_noise >= XI_MAX:
            return "noise"
        return ""

    def secret_key_rate(self) -> float:
        """b/s of emulated time, as the modules estimate it."""
        if self.conditions():
            return 0.0
        noise = max(0.0, (XI_MAX - self.excess_noise) / (XI_MAX - 0.01)) if self.excess_noise > 0.01 else 1.0
        return anchor_rate(self.channel_loss_db) * modulation_factor(self.photons) * min(noise, 1.0)

    def measure(self) -> dict[str, float]:
        t = 10 ** (-(self.channel_loss_db + self.trusted_tx_loss_db) / 10)
        va = 2 * self.photons
        snr = t * ETA * va / (1 + V_EL + t * ETA * self.excess_noise)
        jitter = lambda x, rel: x * (1 + random.gauss(0, rel))  # noqa: E731
        return dict(snr=jitter(snr, 0.02), xnoise=max(0.0, self.excess_noise + random.gauss(0, 0.0005)),
                    loss=self.channel_loss_db + random.gauss(0, 0.03), skr=jitter(self.secret_key_rate(), 0.02))

    def leak_fraction(self) -> float:
        """Reconciliation discloses more of the block as the SNR falls: 10 % to 18 %."""
        return 0.10 + 0.08 * min(max(self.channel_loss_db, 0.0), MAX_CHANNEL_LOSS_DB) / MAX_CHANNEL_LOSS_DB

    def alarm_text(self, name: str) -> str:
        if name == "LOSS":
            return (f"channel loss {self.channel_loss_db:.1f} dB (limit {MAX_CHANNEL_LOSS_DB:g}), "
                    f"total {self.channel_loss_db + self.trusted_tx_loss_db:.1f} dB (limit {MAX_TOTAL_LOSS_DB:g})")
        if name == "NOISE":
            return f"excess noise {self.excess_noise:.3g} SNU (limit {XI_MAX:g})"
        return "no signal from the peer module"

    def begin_tuning(self, m: CvModule) -> None:
        m.tuned_at = time.monotonic() + self.tune_seconds / self.time_scale
        m.set_state("tuning")

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            dt, last = now - last, now
            reason = self.conditions(now)
            for m in self.modules:
                if self.ready(m, now):
                    m.set_state("no-key", reason) if reason else m.set_state("running")
            if reason:
                self._credit = 0.0
                continue
            self._credit += self.secret_key_rate() * dt * self.time_scale
            leaked = round(self.block_bits * self.leak_fraction())
            while self._credit >= self.block_bits - leaked:
                self._credit -= self.block_bits - leaked
                self.blocks_made += 1
                block_id = f"{self.session}-{self.blocks_made:08d}"
                bits = secrets.token_bytes(self.block_bits // 8)
                for m in self.modules:
                    m.take_block(block_id, self.block_bits, leaked, bits)


class SerialServer:
    """A serial device server in front of one module, as ser2net puts a TCP port in front of
    /dev/ttyUSB0: raw bytes both ways, one client at a time. The driver reaches it with
    `socket://host:port`. `drop_clients()` is the fault: the TCP connection drops."""

    def __init__(self, tty_path: Path | str):
        self.path = str(tty_path)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "SerialServer":
        self._server = await asyncio.start_server(self._client, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def drop_clients(self) -> None:
        for w in list(self._clients):
            w.close()

    async def stop(self) -> None:
        self.drop_clients()          # before server.close(), or 3.11 logs the handlers' CancelledError
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            writer.close()
            return
        tty.setraw(fd)
        termios.tcflush(fd, termios.TCIFLUSH)
        self._clients.add(writer)

        def readable() -> None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:          # the module's line was dropped
                data = b""
            if data:
                writer.write(data)
            else:
                loop.remove_reader(fd)
                writer.close()

        loop.add_reader(fd, readable)
        try:
            while data := await reader.read(65536):
                os.write(fd, data)
        except OSError:
            pass
        finally:
            loop.remove_reader(fd)
            os.close(fd)
            self._clients.discard(writer)
            writer.close()
