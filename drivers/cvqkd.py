"""CV-QKD module over a serial line (or raw TCP), speaking qkdnode's CV-QKD line protocol
(docs/protocols/cv-qkd.md): control (start, stop, tune, modulation), telemetry (SNR, excess
noise, channel loss, trusted transmit loss, secret key rate, state) and reconciled key blocks
with their leakage estimate, for privacy amplification by the node.

pyserial does the I/O. A reader thread feeds whole lines to the event loop, and the doc's
section 10 says why we chose that over `loop.add_reader`. A supervisor task opens the port,
identifies the module, applies the wanted settings, and reopens with exponential backoff
when the port disappears. Every daemon-facing call finishes within `timeout` seconds.
Checksummed lines, tags and strict parsing mean a garbled or hostile line is dropped, never
acted on, and a block whose checksum fails is never delivered. Key bits leave this module
only inside KeyBlock objects: never in logs, exceptions or reprs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import random
import re
import threading
import zlib
from collections import OrderedDict
from typing import Any, Callable

import serial

from qkdnode.errors import (BlocksUnavailable, ConfigError, DeviceProtocolError, DeviceRejected, DeviceUnavailable,
                             DriverError)
from qkdnode.interfaces import DeviceHealth, KeyBlock, LinkTelemetry, SourceStatus, driver_settings

log = logging.getLogger("drivers.cvqkd")

PROTO = "1"
MAX_LINE = 16384                      # octets, CR LF included
MAX_BLOCK_BITS = 65536
LIST_PAGE = 64
ACK_CHUNK = 32
READ_POLL = 0.2                       # s: the reader thread's read timeout, so it notices a stop request
HANDED_MEMORY = 4096                  # ids handed over that are remembered to refuse a second delivery

_TAG = re.compile(r"[0-9A-Za-z]{1,8}\Z")
_CRC = re.compile(rb"[0-9A-Fa-f]{8}\Z")
_BLOCK_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_DIGITS = re.compile(r"[0-9]{1,7}\Z")
_WORD = re.compile(r"[a-z][a-z-]{0,15}\Z")
_ALARM = re.compile(r"[A-Z]{1,12}\Z")
# Protocol states -> the vocabulary of qkdnode.interfaces.LinkTelemetry.state.
_STATE_NAMES = {"idle": "stopped", "tuning": "calibrating"}
_ERR_REJECTED = {"404", "405", "409", "422"}
_ERR_UNAVAILABLE = {"500", "503"}

ROLES = ("transmitter", "receiver")
C_BAND = (17, 61)                     # ITU channels of the 100 GHz grid in the C band (191.7-196.1 THz)
_DEFAULTS: dict[str, Any] = dict(baudrate=115200, timeout=2.0, backoff=0.5, backoff_max=30.0, autostart=True,
                                 buffer_blocks=256, poll_interval=5.0)
_SETTINGS = {"port", "role", "itu_channel", "photons_per_symbol", "trusted_tx_loss_db", *_DEFAULTS}


# ---------------------------------------------------------------- framing


class _PollCut(Exception):
    """A repeated request (a poll for a block the module said it lacks) ran into the end of the
    call's time: the module already answered the same question, so this is no device fault."""


class LineRejected(ValueError):
    """A received line failed the framing checks. The reason never quotes the line (it may hold key)."""


def frame(payload: str) -> bytes:
    """A payload as a line on the wire: payload, space, CRC-32 in hex, CR LF."""
    data = payload.encode("ascii")
    return data + b" %08x\r\n" % zlib.crc32(data)


def unframe(raw: bytes) -> str:
    """The payload of a received line (without its line end), or LineRejected."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if len(raw) + 2 > MAX_LINE:
        raise LineRejected(f"longer than {MAX_LINE} octets")
    if any(b < 0x20 or b > 0x7E for b in raw):
        raise LineRejected("octets outside printable ASCII")
    payload, sep, crc = raw.rpartition(b" ")
    if not sep or len(crc) != 8:
        raise LineRejected("no checksum")
    if not _CRC.match(crc) or int(crc, 16) != zlib.crc32(payload):
        raise LineRejected("bad checksum")
    return payload.decode("ascii")


# ---------------------------------------------------------------- the serial line


class _SerialLine:
    """A pyserial port with one reader thread that hands whole lines to the event loop.

    Works with every pyserial backend (tty, pty, socket://, rfc2217://), unlike loop.add_reader,
    which needs a fileno(). The thread is joined before the port is closed, so a read never runs
    on a descriptor number the process has since reused."""

    def __init__(self, url: str, baudrate: int, write_timeout: float, loop: asyncio.AbstractEventLoop,
                 on_lines: Callable[["_SerialLine", list[bytes | None]], None],
                 on_lost: Callable[["_SerialLine", BaseException], None]):
        self.url, self.baudrate, self.write_timeout = url, baudrate, write_timeout
        self.loop, self.on_lines, self.on_lost = loop, on_lines, on_lost
        self.lost: BaseException | None = None
        self.serial: serial.SerialBase | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._write_lock = threading.Lock()

    def open(self) -> None:
        """Blocking: run in a worker thread."""
        ser = serial.serial_for_url(self.url, baudrate=self.baudrate, timeout=READ_POLL,
                                    write_timeout=self.write_timeout, exclusive=True, do_not_open=True)
        try:
            ser.open()
        except BaseException:
            _release(ser)        # socket:// leaves its socket open when open() fails half-way
            raise
        self.serial = ser
        self._thread = threading.Thread(target=self._read_loop, name=f"cvqkd reader {self.url}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Blocking: run in a worker thread."""
        self._stop = True
        ser = self.serial
        if ser is not None:
            with contextlib.suppress(Exception):
                ser.cancel_read()          # posix: wakes the thread's select at once
        if self._thread is not None:
            self._thread.join(READ_POLL * 5)
        if ser is not None:
            _release(ser)

    def write(self, data: bytes) -> None:
        """Blocking, bounded by write_timeout: run in a worker thread."""
        with self._write_lock:
            self.serial.write(data)

    def _post(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):        # the loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(fn, self, *args)

    def _read_loop(self) -> None:
        ser, buf, skipping = self.serial, bytearray(), False
        while not self._stop:
            try:
                data = ser.read(ser.in_waiting or 1)
            except Exception as exc:   # SerialException, OSError: the port went away (or was closed under us)
                if not self._stop:
                    self._post(self.on_lost, exc)
                return
            if not data:
                continue
            buf += data
            lines: list[bytes | None] = []
            while (i := buf.find(b"\n")) >= 0:
                lines.append(None if skipping else bytes(buf[:i]))   # None: an overlong line ended here
                skipping = False
                del buf[:i + 1]
            if len(buf) > MAX_LINE:
                buf.clear()
                skipping = True
            if lines:
                self._post(self.on_lines, lines)


def _release(ser: serial.SerialBase) -> None:
    """Close a port whatever state it is in. pyserial's socket:// close() skips closing the
    socket when shutdown() fails, which it does once the peer has gone, and its open() leaves
    the socket open when it fails after connecting; so the socket is closed here as well."""
    sock = getattr(ser, "_socket", None)
    with contextlib.suppress(Exception):
        ser.close()
    if sock is not None:
        with contextlib.suppress(Exception):
            sock.close()


# ---------------------------------------------------------------- the driver


class CvQkdSerial:
    """A CV-QKD transmitter or receiver on a serial line: a qkdnode CvQkdModule."""

    def __init__(self, *, port: str, role: str, baudrate: int = 115200, timeout: float = 2.0,
                 backoff: float = 0.5, backoff_max: float = 30.0, itu_channel: int | None = None,
                 photons_per_symbol: float | None = None, trusted_tx_loss_db: float | None = None,
                 autostart: bool = True, buffer_blocks: int = 256, poll_interval: float = 5.0):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        self.name = f"cvqkd-serial/{role}"
        self.port, self.role, self.baudrate = port, role, baudrate
        self.timeout, self.backoff, self.backoff_max = timeout, backoff, backoff_max
        self.buffer_blocks, self.poll_interval = buffer_blocks, poll_interval
        self.health = DeviceHealth()
        self.identity: dict[str, str] = {}
        self.device_state = "unknown"          # the module's own state name (protocol section 5)
        self.state_reason = ""
        self.alarms: set[str] = set()
        self.last_status: dict[str, Any] = {}  # parsed STATUS?: includes txloss (trusted TX loss, dB)
        self.rejected_lines = 0
        self.resets = 0                        # `* READY` seen after the first connect
        # What the node wants the module to be; applied at every (re)connect and after a reset.
        self._want: dict[str, Any] = dict(channel=itu_channel, photons=photons_per_symbol,
                                          txloss=trusted_tx_loss_db, running=autostart)
        self._line: _SerialLine | None = None
        self._fresh = False                    # the next line is the first since opening: may be a partial one
        self._supervisor: asyncio.Task | None = None
        self._ready = asyncio.Event()          # identified and configured: calls may go through
        self._settled = asyncio.Event()        # the current connection attempt has succeeded or failed
        self._trouble = asyncio.Event()        # the port was lost, or the module reset: the supervisor acts
        self._lock = asyncio.Lock()            # one request outstanding
        self._pending: tuple[str, asyncio.Future] | None = None
        self._tag = random.randrange(1 << 28)
        self._blocks: OrderedDict[str, KeyBlock] = OrderedDict()
        self._arrived = asyncio.Event()
        self._to_ack: list[str] = []
        self._handed: OrderedDict[str, None] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()   # ids the module delivered or listed (recent ones)
        self._resync = True
        self._max_block_bits = MAX_BLOCK_BITS
        self._attempt_error: DriverError | None = None   # why the last connection attempt failed
        self._closing = False

    def __repr__(self) -> str:
        return f"<CvQkdSerial {self.role} {self.port} {self.health.state}>"

    # ------------------------------------------------------------ settings

    @classmethod
    def check_settings(cls, settings: dict[str, Any], *, file, key: str) -> dict[str, Any]:
        """Names, types and ranges of the settings, merged over the defaults. Touches no device."""
        def number(name: str, lo: float, hi: float, what: str) -> None:
            v = merged[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise err(name, what, v)

        if not isinstance(settings, dict):
            raise ConfigError(file, key, "a table of settings", settings)
        merged, err = driver_settings(settings, file=file, key=key, known=_SETTINGS, defaults=_DEFAULTS)
        if not isinstance(merged.get("port"), str) or not merged["port"].strip():
            raise err("port", "a serial device path (/dev/ttyUSB0, /dev/serial/by-id/...) or a pyserial URL "
                      "(socket://host:port)", merged.get("port"), missing="port" not in merged)
        if merged.get("role") not in ROLES:
            raise err("role", 'one of "transmitter" or "receiver"', merged.get("role"), missing="role" not in merged)
        b = merged["baudrate"]
        if isinstance(b, bool) or not isinstance(b, int) or not 300 <= b <= 4_000_000:
            raise err("baudrate", "an integer from 300 to 4000000 (the protocol's default is 115200)", b)
        number("timeout", 0.05, 600, "seconds per call, from 0.05 to 600")
        number("backoff", 0.01, 3600, "seconds before the first reconnection attempt, from 0.01 to 3600")
        number("backoff_max", merged["backoff"] if isinstance(merged["backoff"], (int, float)) else 0.01, 3600,
               "the longest wait between reconnection attempts in seconds, at least backoff")
        number("poll_interval", 0, 3600, "seconds between status polls, 0 to 3600 (0: no polling)")
        if not isinstance(merged["autostart"], bool):
            raise err("autostart", "true or false", merged["autostart"])
        n = merged["buffer_blocks"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 65536:
            raise err("buffer_blocks", "an integer from 1 to 65536", n)
        ch = merged.get("itu_channel")
        if ch is not None and (isinstance(ch, bool) or not isinstance(ch, int) or not C_BAND[0] <= ch <= C_BAND[1]):
            raise err("itu_channel", f"a C-band channel of the ITU 100 GHz grid, {C_BAND[0]} to {C_BAND[1]} "
                      "(e.g. 34 = 193.4 THz)", ch)
        for name, lo, hi, what in (("photons_per_symbol", 0.001, 100, "photons per symbol, above 0 and at most 100"),
                                   ("trusted_tx_loss_db", 0, 30, "a trusted transmit loss in dB, 0 to 30")):
            if name in merged:
                if merged["role"] != "transmitter":
                    raise err(name, "no value: it is set at the transmitter end of the link", merged[name])
                number(name, lo, hi, what)
        return merged

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, file, key: str) -> "CvQkdSerial":
        m = cls.check_settings(settings, file=file, key=key)
        return cls(port=m["port"].strip(), role=m["role"], baudrate=m["baudrate"], timeout=float(m["timeout"]),
                   backoff=float(m["backoff"]), backoff_max=float(m["backoff_max"]), itu_channel=m.get("itu_channel"),
                   photons_per_symbol=m.get("photons_per_symbol"), trusted_tx_loss_db=m.get("trusted_tx_loss_db"),
                   autostart=m["autostart"], buffer_blocks=m["buffer_blocks"],
                   poll_interval=float(m["poll_interval"]))

    # ------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Start the supervisor if needed and wait (up to `timeout`) until the module is identified
        and configured; DeviceUnavailable or DeviceRejected (wrong role) if it is not."""
        if self._supervisor is None or self._supervisor.done():
            self._settled.clear()
            self._closing = False
            self._supervisor = asyncio.create_task(self._supervise(), name=f"{self.name} {self.port}")
        if not self._ready.is_set():
            await _wait(self._settled, self.timeout)
        if not self._ready.is_set():
            raise self._not_ready_error()

    async def close(self) -> None:
        if self._ready.is_set() and self._to_ack:
            with contextlib.suppress(DriverError):
                await self._flush_acks(self._deadline())
        if self._supervisor is not None:
            self._closing = True                 # ends the supervisor even if a cancellation got lost
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._ready.clear()
        await self._close_line()
        for block in self._blocks.values():
            block.wipe()
        self._blocks.clear()

    # ------------------------------------------------------------ CvQkdModule: control and telemetry

    async def start(self) -> None:
        await self._command("START", deadline=self._deadline())
        self._want["running"] = True

    async def stop(self) -> None:
        await self._command("STOP", deadline=self._deadline())
        self._want["running"] = False

    async def tune(self, itu_channel: int) -> None:
        if isinstance(itu_channel, bool) or not isinstance(itu_channel, int):
            raise DeviceRejected(f"{self._where}: an ITU channel is an integer, got {type(itu_channel).__name__}")
        await self._command("TUNE", str(itu_channel), deadline=self._deadline())
        self._want["channel"] = itu_channel

    async def set_modulation(self, photons_per_symbol: float) -> None:
        v = photons_per_symbol
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise DeviceRejected(f"{self._where}: photons per symbol must be a positive number")
        await self._command("MOD", f"{v:.6g}", deadline=self._deadline())
        self._want["photons"] = v

    async def set_trusted_tx_loss(self, db: float) -> None:
        """Trusted transmit loss in dB (transmitter only; the receiver answers 405)."""
        if isinstance(db, bool) or not isinstance(db, (int, float)) or not math.isfinite(db) or db < 0:
            raise DeviceRejected(f"{self._where}: trusted transmit loss must be a non-negative number of dB")
        await self._command("TXLOSS", f"{db:.6g}", deadline=self._deadline())
        self._want["txloss"] = db

    async def telemetry(self) -> LinkTelemetry:
        st = self._take_status(await self._command("STATUS?", deadline=self._deadline()))
        return LinkTelemetry(state=_STATE_NAMES.get(st["state"], st["state"]), excess_noise=st["xnoise"],
                             snr=st["snr"], channel_loss_db=st["loss"], secret_key_rate_bps=st["skr"])

    async def status(self) -> SourceStatus:
        st = self._take_status(await self._command("STATUS?", deadline=self._deadline()))
        ident = self.identity
        return SourceStatus(key_size=int(ident.get("block", 0)) or self._max_block_bits,
                            stored_key_count=st.get("stored") or 0, max_key_count=int(ident.get("store", 0)),
                            max_key_per_request=self.buffer_blocks, min_key_size=8,
                            max_key_size=self._max_block_bits)

    # ------------------------------------------------------------ KeySource: blocks

    async def fetch_new(self, max_bits: int) -> list[KeyBlock]:
        """Blocks the module delivered since the last call, oldest first, up to `max_bits`
        (at least one if there is any). Lost events are made up for with LIST?/GET."""
        deadline = self._deadline()
        self._check_ready()
        await self._flush_acks(deadline)
        if max_bits <= 0:
            return []
        if self._resync:
            await self._resync_store(deadline)
        out, total = [], 0
        while self._blocks:
            block = next(iter(self._blocks.values()))
            if out and total + len(block.bits) * 8 > max_bits:
                break
            self._blocks.popitem(last=False)
            out.append(block)
            total += len(block.bits) * 8
        self._handed_over(out)
        return out

    async def fetch_by_ids(self, block_ids: list[str]) -> list[KeyBlock]:
        """The blocks with these ids, in this order. Missing ones are asked for with GET and
        waited for until the deadline; DeviceRejected names those the module does not have."""
        deadline = self._deadline()
        self._check_ready()
        for bid in block_ids:
            if not isinstance(bid, str) or not _BLOCK_ID.match(bid):
                raise DeviceRejected(f"{self._where}: {str(bid)[:70]!r} is not a block id of this protocol")
        if len(set(block_ids)) != len(block_ids):
            raise DeviceRejected(f"{self._where}: a block id is asked for twice")
        if len(block_ids) > self.buffer_blocks:
            raise DeviceRejected(f"{self._where}: at most {self.buffer_blocks} blocks per call (buffer_blocks)")
        again = [b for b in block_ids if b in self._handed]
        if again:
            raise DeviceRejected(f"{self._where}: block(s) {_ids(again)} were already handed over")
        await self._flush_acks(deadline)
        loop = asyncio.get_running_loop()
        asked: set[str] = set()
        dropped: list[str] = []
        while missing := [b for b in block_ids if b not in self._blocks and b not in dropped]:
            for bid in missing:
                if loop.time() >= deadline:
                    break
                try:                                            # asked before: a poll the deadline may cut
                    reply = await self._command("GET", bid, deadline=deadline, poll=bid in asked)
                except DeviceRejected:                          # 404: not there (yet)
                    # Delivered here before and no longer held: the module dropped it (its store
                    # was full, or it was reset). Its event came once; nothing can bring it now.
                    if bid in self._seen:
                        dropped.append(bid)
                    else:
                        asked.add(bid)
                    continue
                except _PollCut:
                    break
                self._store_block(self._parse_block(reply, expect_id=bid, from_reply=True))
            missing = [b for b in block_ids if b not in self._blocks and b not in dropped]
            remaining = deadline - loop.time()
            if not missing:
                break
            if remaining <= 0:
                # Named: those the module said it lacks. Not those the time ran out before asking
                # for (a slow line): the caller asks for them again.
                lacking = [b for b in missing if b in asked] + dropped
                unasked = [b for b in missing if b not in asked]
                raise BlocksUnavailable(f"{self._where}: " + "; ".join(
                    ([f"the module has no block(s) {_ids(lacking)}"] if lacking else []) +
                    ([f"no time left to ask for block(s) {_ids(unasked)}"] if unasked else [])), lacking)
            await _wait(self._arrived, min(remaining, max(self.timeout / 5, 0.02)))   # a late BLOCK event, or GET again
        if dropped:     # said at once, not after the deadline; the call fails whole, naming them
            raise BlocksUnavailable(f"{self._where}: the module no longer holds block(s) {_ids(dropped)} (dropped "
                                    "from its full store, or lost in a reset)", dropped)
        out = [self._blocks.pop(b) for b in block_ids]
        self._handed_over(out)
        return out

    def _handed_over(self, blocks: list[KeyBlock]) -> None:
        for b in blocks:
            self._to_ack.append(b.block_id)
            self._handed[b.block_id] = None
        while len(self._handed) > HANDED_MEMORY:
            self._handed.popitem(last=False)

    async def _flush_acks(self, deadline: float) -> None:
        """Acknowledge what was handed over before (the node has stored it since)."""
        while self._to_ack:
            chunk = self._to_ack[:ACK_CHUNK]
            fields = await self._command("ACK", *chunk, deadline=deadline)
            if len(fields) != 1 or not _DIGITS.match(fields[0]):
                raise self._protocol_error("ACK", "a count")
            del self._to_ack[:len(chunk)]

    async def _resync_store(self, deadline: float) -> None:
        """Fetch blocks the module holds that never reached us (lost or rejected events).

        Uses at most half of the call's time, so the call can still hand over what it has; on a
        slow line (an 8192-bit GET takes ~1 s at 115200 baud) the next calls carry on."""
        loop = asyncio.get_running_loop()
        budget_end = loop.time() + (deadline - loop.time()) / 2
        offset, listed = 0, []
        while len(self._blocks) < self.buffer_blocks and loop.time() < budget_end:
            fields = await self._command("LIST?", str(offset), deadline=deadline)
            if not fields or not _DIGITS.match(fields[0]) or len(fields) - 1 > LIST_PAGE or \
                    not all(_BLOCK_ID.match(i) for i in fields[1:]):
                raise self._protocol_error("LIST?", "a count and block ids")
            total, ids = int(fields[0]), fields[1:]
            listed += ids
            self._saw(ids)
            for bid in ids:
                if bid in self._blocks or bid in self._handed:
                    continue
                if len(self._blocks) >= self.buffer_blocks or loop.time() >= budget_end:
                    break
                try:
                    got = await self._command("GET", bid, deadline=deadline)
                except DeviceRejected:          # dropped by the module meanwhile
                    continue
                self._store_block(self._parse_block(got, expect_id=bid, from_reply=True))
            else:
                offset += len(ids)
                if not ids or offset >= total:
                    self._resync = False          # the module holds nothing we lack
                    break
                continue
            break                                 # buffer full or out of time: the next call carries on
        # Oldest first, as the module holds them: blocks fetched again go before newer events.
        order = [bid for bid in listed if bid in self._blocks]
        first = set(order)
        order += [bid for bid in self._blocks if bid not in first]
        self._blocks = OrderedDict((bid, self._blocks[bid]) for bid in order)

    def _saw(self, block_ids) -> None:
        """Remember ids the module has delivered or listed: one it later says it lacks was dropped."""
        for bid in block_ids:
            self._seen[bid] = None
            self._seen.move_to_end(bid)
        while len(self._seen) > HANDED_MEMORY:
            self._seen.popitem(last=False)

    def _store_block(self, block: KeyBlock) -> None:
        self._saw((block.block_id,))
        if block.block_id in self._blocks or block.block_id in self._handed:
            block.wipe()
            return
        self._blocks[block.block_id] = block
        while len(self._blocks) > self.buffer_blocks:
            _, old = self._blocks.popitem(last=False)   # the module still holds it until ACK
            old.wipe()
        self._arrived.set()
        self._arrived = asyncio.Event()

    def _parse_block(self, fields: list[str], *, expect_id: str | None = None,
                     from_reply: bool = False) -> KeyBlock:
        """A KeyBlock from BLOCK fields, or DeviceProtocolError (which never quotes the data)."""
        def bad(why: str) -> DeviceProtocolError:
            return DeviceProtocolError(f"{self._where}: {'GET reply' if from_reply else 'BLOCK event'} "
                                       f"rejected: {why}")
        if len(fields) != 4:
            raise bad("not 4 fields (id, nbits, leaked, data)")
        bid, nbits_s, leaked_s, data = fields
        if not _BLOCK_ID.match(bid):
            raise bad("malformed block id")
        if expect_id is not None and bid != expect_id:
            raise bad(f"asked for block {expect_id}, got another")
        if not _DIGITS.match(nbits_s) or not _DIGITS.match(leaked_s):
            raise bad("nbits or leaked is not a decimal number")
        nbits, leaked = int(nbits_s), int(leaked_s)
        if nbits % 8 or not 8 <= nbits <= self._max_block_bits:
            raise bad(f"nbits {nbits} is not a multiple of 8 from 8 to {self._max_block_bits}")
        if leaked > nbits:
            raise bad(f"leaked {leaked} exceeds nbits {nbits}")
        if len(data) != 4 * -(-nbits // 24):
            raise bad(f"data length does not match nbits {nbits}")
        try:
            bits = bytearray(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise bad("data is not base64") from None
        if len(bits) * 8 != nbits:
            bits[:] = bytes(len(bits))
            raise bad(f"data does not hold exactly {nbits} bits")
        return KeyBlock(bid, bits, leaked)

    # ------------------------------------------------------------ requests

    @property
    def _where(self) -> str:
        return f"{self.name} {self.port}"

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.timeout

    def _check_ready(self) -> None:
        if not self._ready.is_set():
            raise self._not_ready_error()

    def _not_ready_error(self) -> DriverError:
        if self._supervisor is None:
            return DeviceUnavailable(f"{self._where}: not connected (call connect first)")
        exc = self._attempt_error
        # A module that answers but is the wrong one (role, protocol) keeps its error type.
        cls = type(exc) if isinstance(exc, (DeviceRejected, DeviceProtocolError)) else DeviceUnavailable
        why = str(exc) if exc is not None else self.health.last_error or "not connected"
        return cls(f"module not ready ({why}); reconnecting in the background")

    def _protocol_error(self, verb: str, expected: str) -> DeviceProtocolError:
        err = DeviceProtocolError(f"{self._where}: reply to {verb} is not {expected}")
        self.health.failed(err)
        return err

    def _next_tag(self) -> str:
        self._tag = (self._tag + 1) % (1 << 32)
        return f"{self._tag:x}"

    async def _command(self, verb: str, *args: str, deadline: float, handshake: bool = False,
                       poll: bool = False) -> list[str]:
        """Send one request and return the fields of its OK reply; the whole exchange, lock wait
        included, ends by `deadline`. Errors are DriverError subclasses, recorded in `health`.
        A `poll` (a request repeated while waiting) that the deadline cuts raises _PollCut."""
        if not handshake:
            self._check_ready()
        loop = asyncio.get_running_loop()
        garbled_before, sent = self.rejected_lines, False
        try:
            async with asyncio.timeout_at(deadline):
                async with self._lock:
                    line = self._line
                    if line is None or line.lost is not None:
                        raise DeviceUnavailable(f"{self._where}: port not open")
                    tag = self._next_tag()
                    fut: asyncio.Future = loop.create_future()
                    self._pending = (tag, fut)
                    try:
                        await asyncio.to_thread(line.write, frame(" ".join((tag, verb, *args))))
                        sent = True
                        status, fields = await fut
                    finally:
                        self._pending = None
        except TimeoutError:
            self._resync = True
            if poll:
                raise _PollCut() from None
            garbled = self.rejected_lines - garbled_before
            if garbled:
                err: DriverError = DeviceProtocolError(
                    f"{self._where}: no valid answer to {verb} within {self.timeout:g} s; {garbled} garbled "
                    "line(s) rejected meanwhile (bad checksum or form)")
            elif not sent:
                err = DeviceUnavailable(f"{self._where}: no answer to {verb} within {self.timeout:g} s: it could "
                                        "not be sent, an earlier request was still waiting for its answer")
            else:
                err = DeviceUnavailable(f"{self._where}: no answer to {verb} within {self.timeout:g} s")
            self.health.failed(err)
            raise err from None
        except (serial.SerialException, OSError) as exc:
            err = DeviceUnavailable(f"{self._where}: writing {verb} failed: {exc}")
            self.health.failed(err)
            raise err from None
        except DriverError as exc:
            self.health.failed(exc)
            raise
        if status == "OK":
            self.health.ok()
            return fields
        code, text = fields
        message = f"{self._where}: {verb} refused: ERR {code} {text}".rstrip()
        if code in _ERR_REJECTED:
            self.health.ok()                     # the module is fine; the request was not
            raise DeviceRejected(message)
        err = DeviceUnavailable(message) if code in _ERR_UNAVAILABLE else DeviceProtocolError(message)
        self.health.failed(err)
        raise err

    # ------------------------------------------------------------ incoming lines (on the event loop)

    def _on_lines(self, line: _SerialLine, lines: list[bytes | None]) -> None:
        if line is not self._line:
            return
        for raw in lines:
            fresh, self._fresh = self._fresh, False
            try:
                if raw is None:
                    raise LineRejected(f"longer than {MAX_LINE} octets")
                payload = unframe(raw)
            except LineRejected as exc:
                if fresh:       # the tail of a line sent before we opened the port
                    log.debug("%s: dropped a partial first line", self._where)
                else:
                    self._reject(f"{exc} ({0 if raw is None else len(raw)} octets)")
                continue
            head, _, rest = payload.partition(" ")
            try:
                if head == "*":
                    self._on_event(rest)
                elif head == "-" or _TAG.match(head):
                    self._on_reply(head, rest)
                else:
                    raise LineRejected("neither a reply nor an event")
            except LineRejected as exc:
                self._reject(str(exc))
            except DeviceProtocolError as exc:
                self._reject(str(exc).removeprefix(f"{self._where}: "))

    def _reject(self, why: str) -> None:
        self.rejected_lines += 1
        self._resync = True
        self.health.failed(f"{self._where}: line rejected: {why}")
        log.warning("%s: line rejected: %s", self._where, why)

    def _on_reply(self, tag: str, rest: str) -> None:
        status, _, body = rest.partition(" ")
        if status == "OK" and tag != "-":
            result = ("OK", body.split(" ") if body else [])
        elif status == "ERR":
            code, _, text = body.partition(" ")
            if len(code) != 3 or not code.isdigit():
                raise LineRejected("ERR without a 3-digit code")
            result = ("ERR", [code, text[:120]])
        else:
            raise LineRejected("reply is neither OK nor ERR (or OK without a tag)")
        pending = self._pending
        if pending is None or pending[1].done() or (tag != pending[0] and tag != "-"):
            log.debug("%s: dropped a reply with tag %s (late, or for nobody)", self._where, tag)
            return
        pending[1].set_result(result)

    def _on_event(self, rest: str) -> None:
        name, _, body = rest.partition(" ")
        fields = body.split(" ") if body else []
        if name == "BLOCK":
            self._store_block(self._parse_block(fields))
        elif name == "STATE":
            if not 1 <= len(fields) <= 2 or not all(_WORD.match(f) for f in fields):
                raise LineRejected("STATE event malformed")
            state, reason = fields[0], fields[1] if len(fields) == 2 else ""
            if (state, reason) != (self.device_state, self.state_reason):
                log.info("%s: module state %s%s", self._where, state, f" ({reason})" if reason else "")
            self.device_state, self.state_reason = state, reason
        elif name == "ALARM":
            if len(fields) < 2 or not _ALARM.match(fields[0]) or fields[1] not in ("raised", "cleared"):
                raise LineRejected("ALARM event malformed")
            alarm, text = fields[0], " ".join(fields[2:])[:200]
            if fields[1] == "raised":
                self.alarms.add(alarm)
                log.warning("%s: alarm %s raised: %s", self._where, alarm, text)
                if alarm == "STORE":
                    self._resync = True
            else:
                self.alarms.discard(alarm)
                log.info("%s: alarm %s cleared", self._where, alarm)
        elif name == "READY":
            log.warning("%s: the module was reset; applying the settings again", self._where)
            self.resets += 1
            self.device_state, self.state_reason = "idle", ""
            self.alarms.clear()
            self._resync = True
            self._trouble.set()
        else:
            log.debug("%s: ignored unknown event %s", self._where, name[:16])

    def _on_lost(self, line: _SerialLine, exc: BaseException) -> None:
        if line is not self._line or line.lost is not None:
            return
        line.lost = exc
        err = DeviceUnavailable(f"{self._where}: port lost: {exc}")
        if self._pending is not None and not self._pending[1].done():
            self._pending[1].set_exception(err)
        self._ready.clear()
        self.health.failed(err)
        log.warning("%s", err)
        self._trouble.set()

    # ------------------------------------------------------------ supervisor: open, identify, configure, poll

    async def _supervise(self) -> None:
        delay = self.backoff
        while not self._closing:
            self._settled.clear()
            try:
                if self._line is None or self._line.lost is not None:
                    await self._close_line()
                    await self._open()
                self._trouble.clear()
                await self._handshake()
            except DriverError as exc:
                self._ready.clear()
                self._attempt_error = exc
                self.health.failed(exc)
                log.warning("%s; next attempt in %.2g s", exc, delay)
                await self._close_line()
                self._settled.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            delay, self._attempt_error = self.backoff, None
            self._ready.set()
            self._settled.set()
            await self._serve()
            self._ready.clear()

    async def _serve(self) -> None:
        """Until the port is lost or the module resets: poll status and flush acks now and then."""
        while not self._trouble.is_set() and not self._closing:
            if not await _wait(self._trouble, self.poll_interval or None):
                try:
                    deadline = self._deadline()
                    await self._flush_acks(deadline)
                    self._take_status(await self._command("STATUS?", deadline=deadline))
                except DriverError:
                    pass                                      # recorded in health by _command
                except Exception:                             # a bug here must not end the supervision
                    log.exception("%s: status poll failed", self._where)

    async def _open(self) -> None:
        line = _SerialLine(self.port, self.baudrate, self.timeout, asyncio.get_running_loop(), self._on_lines,
                           self._on_lost)
        opening = asyncio.ensure_future(asyncio.to_thread(line.open))
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await opening
            await asyncio.to_thread(line.close)
            raise
        except (serial.SerialException, OSError, ValueError) as exc:
            await asyncio.to_thread(line.close)
            raise DeviceUnavailable(f"{self._where}: cannot open the port: {exc}") from None
        self._line, self._fresh, self._resync = line, True, True
        log.info("%s: port open", self._where)

    async def _close_line(self) -> None:
        line, self._line = self._line, None
        if line is not None:
            await asyncio.to_thread(line.close)

    async def _handshake(self) -> None:
        """Identify the module and apply the wanted settings; every step within `timeout`."""
        async def ask(verb: str, *args: str) -> list[str]:
            return await self._command(verb, *args, deadline=self._deadline(), handshake=True)

        ident = _key_values(await ask("IDN?"))
        if ident.get("proto") != PROTO:
            raise DeviceProtocolError(f"{self._where}: the module speaks protocol version "
                                      f"{ident.get('proto', '(none)')[:8]!r}, this driver speaks {PROTO}")
        if ident.get("role") != self.role:
            raise DeviceRejected(f"{self._where}: the module says it is a {ident.get('role', '(no role)')[:16]}, "
                                 f"the config says {self.role}")
        for k in ("block", "maxblock", "store"):
            if k in ident and not _DIGITS.match(ident[k]):
                raise DeviceProtocolError(f"{self._where}: IDN? field {k} is not a number")
        self._max_block_bits = min(int(ident.get("maxblock", MAX_BLOCK_BITS)), MAX_BLOCK_BITS)
        self.identity = ident
        want = self._want
        if want["channel"] is not None:
            await ask("TUNE", str(want["channel"]))
        if want["photons"] is not None:
            await ask("MOD", f"{want['photons']:.6g}")
        if want["txloss"] is not None:
            await ask("TXLOSS", f"{want['txloss']:.6g}")
        if want["running"]:
            await ask("START")
        self._take_status(await ask("STATUS?"))
        self._resync = True
        log.info("%s: %s %s serial %s ready", self._where, ident.get("vendor", "?")[:32],
                 ident.get("model", "?")[:32], ident.get("serial", "?")[:32])

    def _take_status(self, fields: list[str]) -> dict[str, Any]:
        kv = _key_values(fields)
        state = kv.get("state", "")
        if not _WORD.match(state):
            raise self._protocol_error("STATUS?", "a status with a state")
        st: dict[str, Any] = {"state": state, "reason": "" if kv.get("reason", "-") == "-" else kv["reason"]}
        for k in ("snr", "xnoise", "loss", "txloss", "skr", "mod"):
            st[k] = _number(kv.get(k, "nan"))
            if st[k] is _BAD:
                raise self._protocol_error("STATUS?", f"a status with a number for {k}")
        stored = kv.get("stored", "0")
        st["stored"] = int(stored) if _DIGITS.match(stored) else None
        st["channel"] = int(kv["channel"]) if _DIGITS.match(kv.get("channel", "")) else None
        self.device_state, self.state_reason = st["state"], st["reason"]
        self.last_status = st
        return st


_BAD = object()


async def _wait(event: asyncio.Event, timeout: float | None) -> bool:
    """Whether `event` was set within `timeout` seconds. Not asyncio.wait_for: on Python 3.11 it
    can swallow a cancellation that arrives as the event is set (gh-86296), and a supervisor that
    ignores its cancellation never ends."""
    if timeout is None:
        await event.wait()
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


def _number(s: str) -> Any:
    """A finite float, None for "nan", or _BAD."""
    if s == "nan":
        return None
    try:
        x = float(s)
    except ValueError:
        return _BAD
    return x if math.isfinite(x) and len(s) <= 24 else _BAD


def _key_values(fields: list[str]) -> dict[str, str]:
    out = {}
    for f in fields:
        k, sep, v = f.partition("=")
        if sep:
            out[k] = v
    return out


def _ids(ids: list[str]) -> str:
    return ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
