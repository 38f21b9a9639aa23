"""Emulated HUBER+SUHNER Polatis-style optical switch: SCPI over a raw TCP socket, as the real
unit serves it on port 5025 (reached by drivers as `TCPIP::host::port::SOCKET`).

`PolatisModel` is the instrument without a transport: `handle(line)` takes one program message
(commands separated by `;`) and returns the response message, or None when there is nothing to
send. It keeps an N x M cross-connect map (ingress ports 1..N, egress ports N+1..N+M), port
enable states, power monitors and an SCPI error queue. Headers match in long or short form,
case-insensitively; a header without a leading colon after `;` is relative to the previous one.
A command the model does not know queues `-113,"Undefined header"`; a query that fails queues
its error and answers nothing, as real instruments do (the client times out).

The light model: `light[p]` is the power (dBm) that enters the switch at port p from its fibre.
A monitor at p reads that light plus whatever reaches p through the switch from its partner,
less `insertion_loss_db`, over a noise floor of `noise_floor_dbm` (~-60 dBm on a dark port).

`PolatisEmulator` serves a model on an asyncio TCP server (port 0 picks a free port) and takes
faults on command through `faults` (see `SwitchFaults`) and `drop_connections()`. It records every
program message received in `received` and counts the connections it accepted.

Emulator choices where the public material is silent (not checked against a real unit): ADD on
a port connected elsewhere, a disabled port, or an egress twice queues `-221,"Settings conflict"`
and changes nothing; SUB of a pair that is not connected is ignored; a monitor query naming a
port without a monitor queues `-222,"Data out of range"`.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import deque
from dataclasses import dataclass

ERROR_QUEUE_LENGTH = 32
GARBAGE = b"\xff\xfe#&GaRb\x00ge\x8c?!;;(@\n"


@dataclass
class SwitchFaults:
    """Faults on command. `hang`: read commands, never answer, change nothing. `delay`: seconds
    before each answer. `garbage`: every answer is replaced by bytes that follow no protocol.
    `drop`: close the connection as soon as a command arrives (new connections too).
    `stuck`: switching commands are accepted (no error, `*OPC?` says 1) but the map does not change."""

    hang: bool = False
    delay: float = 0.0
    garbage: bool = False
    drop: bool = False
    stuck: bool = False

    def clear(self) -> None:
        self.hang = self.garbage = self.drop = self.stuck = False
        self.delay = 0.0


class ScpiError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f'{code},"{message}"')
        self.code, self.message = code, message


# Command tree: keywords in SCPI notation (upper case = short form). `[..]` marks an optional node.
_TREE = {
    "*IDN?": "idn", "*OPC?": "opc_q", "*OPC": "opc", "*CLS": "cls",
    ":OXC:SWITch:SIZE?": "size",
    ":OXC:SWITch:CONNect:ADD": "add",
    ":OXC:SWITch:CONNect:SUB": "sub",
    ":OXC:SWITch:CONNect:ONLY": "only",
    ":OXC:SWITch:CONNect:STATe?": "conn_state",
    ":OXC:SWITch:CONNect:PORT?": "conn_port",
    ":OXC:SWITch:DISConnect:ALL": "disconnect_all",
    ":OXC:SWITch:PORT:STATe?": "port_state",
    ":PMONitor:POWer?": "power",
    ":SYSTem:ERRor[:NEXT]?": "error_next",
    ":SYSTem:ERRor:ALL?": "error_all",
}


def _expand(header: str) -> list[tuple[str, ...]]:
    """':SYSTem:ERRor[:NEXT]?' -> [('SYSTem', 'ERRor?'), ('SYSTem', 'ERRor', 'NEXT?')]."""
    query = header.endswith("?")
    m = re.fullmatch(r"(.*?)\[:(\w+)\](\??)", header)
    forms = [m[1] + m[3], f"{m[1]}:{m[2]}{m[3]}"] if m else [header]
    out = []
    for form in forms:
        nodes = tuple(form.lstrip(":").rstrip("?").split(":"))
        out.append(nodes[:-1] + (nodes[-1] + ("?" if query else ""),))
    return out


_COMMANDS: list[tuple[tuple[str, ...], str]] = []
for _header, _name in _TREE.items():
    if _header.startswith("*"):
        continue
    _COMMANDS.extend((nodes, _name) for nodes in _expand(_header))


def _keyword_matches(token: str, keyword: str) -> bool:
    query = keyword.endswith("?")
    if query != token.endswith("?"):
        return False
    keyword, token = keyword.rstrip("?"), token.rstrip("?").upper()
    short = "".join(c for c in keyword if c.isupper() or c.isdigit())
    return token in (short, keyword.upper())


def _split_units(message: str) -> list[str]:
    """A program message's units, split at `;` outside quoted strings."""
    units, cur, quote = [], [], None
    for c in message:
        if quote:
            cur.append(c)
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
            cur.append(c)
        elif c == ";":
            units.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    units.append("".join(cur))
    return [u.strip() for u in units if u.strip()]


def _channel_list(text: str) -> list[int]:
    """SCPI channel list body: '1,2,5:7' -> [1, 2, 5, 6, 7]; '' -> []."""
    out: list[int] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)(?::(\d+))?", item)
        if not m:
            raise ScpiError(-104, "Data type error")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi - lo > 10_000:
            raise ScpiError(-222, "Data out of range")
        out.extend(range(lo, hi + 1))
    return out


def _two_lists(params: str) -> tuple[list[int], list[int]]:
    if not params.strip():
        raise ScpiError(-109, "Missing parameter")
    m = re.fullmatch(r"\s*\(@([^)]*)\)\s*,\s*\(@([^)]*)\)\s*", params)
    if not m:
        raise ScpiError(-104, "Data type error")
    a, b = _channel_list(m[1]), _channel_list(m[2])
    if len(a) != len(b):
        raise ScpiError(-224, "Illegal parameter value; lists differ in length")
    return a, b


class PolatisModel:
    """The instrument: an N x M cross-connect with port states, power monitors and an error queue."""

    def __init__(self, ingress: int = 16, egress: int = 16, *, serial: str = "EMU0001",
                 firmware: str = "6.5.2.18", insertion_loss_db: float = 1.0, noise_floor_dbm: float = -60.0,
                 monitors: set[int] | None = None, faults: SwitchFaults | None = None):
        self.n, self.m = ingress, egress
        self.product = f"N-OST-{ingress}x{egress}-LU1-DMHNS"
        self.serial, self.firmware = serial, firmware
        self.insertion_loss_db, self.noise_floor_dbm = insertion_loss_db, noise_floor_dbm
        self.map: dict[int, int] = {}                  # ingress -> egress
        self.disabled: set[int] = set()
        self.light: dict[int, float] = {}              # dBm entering the switch at a port
        self.monitors = set(range(1, ingress + egress + 1)) if monitors is None else set(monitors)
        self.errors: deque[tuple[int, str]] = deque()
        self.faults = faults or SwitchFaults()

    # -- state questions the tests (and the power model) ask

    @property
    def ports(self) -> range:
        return range(1, self.n + self.m + 1)

    def partner(self, port: int) -> int | None:
        if port in self.map:
            return self.map[port]
        for i, e in self.map.items():
            if e == port:
                return i
        return None

    def power_dbm(self, port: int) -> float:
        mw = 10 ** (self.noise_floor_dbm / 10)
        if port in self.light:
            mw += 10 ** (self.light[port] / 10)
        other = self.partner(port)
        if other is not None and other in self.light:
            mw += 10 ** ((self.light[other] - self.insertion_loss_db) / 10)
        return 10 * math.log10(mw)

    def queue_error(self, code: int, message: str) -> None:
        if len(self.errors) >= ERROR_QUEUE_LENGTH - 1:
            if len(self.errors) == ERROR_QUEUE_LENGTH - 1:
                self.errors.append((-350, "Queue overflow"))
            return
        self.errors.append((code, message))

    # -- the protocol

    def handle(self, message: str) -> str | None:
        """One program message -> the response message (query answers joined by `;`) or None."""
        answers: list[str] = []
        prefix: tuple[str, ...] = ()
        for unit in _split_units(message):
            header, _, params = unit.partition(" ")
            try:
                name, prefix = self._resolve(header.strip(), prefix)
                answer = getattr(self, f"_do_{name}")(params.strip())
            except ScpiError as exc:
                self.queue_error(exc.code, exc.message)
                continue
            if answer is not None:
                answers.append(answer)
        return ";".join(answers) if answers else None

    def _resolve(self, header: str, prefix: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
        if header.startswith("*"):
            for common, name in _TREE.items():
                if common.startswith("*") and common == header.upper():
                    return name, prefix
            raise ScpiError(-113, "Undefined header")
        if not re.fullmatch(r":?[A-Za-z][A-Za-z0-9]*(:[A-Za-z][A-Za-z0-9]*)*\??", header):
            raise ScpiError(-113, "Undefined header")
        tokens = header.lstrip(":").split(":")
        candidates = [tuple(tokens)] if header.startswith(":") else [prefix + tuple(tokens), tuple(tokens)]
        for path in candidates:
            for nodes, name in _COMMANDS:
                if len(nodes) == len(path) and all(map(_keyword_matches, path, nodes)):
                    return name, nodes[:-1]
        raise ScpiError(-113, "Undefined header")

    def _no_params(self, params: str) -> None:
        if params:
            raise ScpiError(-108, "Parameter not allowed")

    def _do_idn(self, params: str) -> str:
        self._no_params(params)
        return f"Polatis,{self.product},{self.serial},{self.firmware}"

    def _do_opc_q(self, params: str) -> str:
        self._no_params(params)
        return "1"                                     # every operation completes before the next unit runs

    def _do_opc(self, params: str) -> None:
        self._no_params(params)

    def _do_cls(self, params: str) -> None:
        self._no_params(params)
        self.errors.clear()

    def _do_size(self, params: str) -> str:
        self._no_params(params)
        return f"{self.n},{self.m}"

    def _pairs(self, params: str) -> dict[int, int]:
        """Validated ingress -> egress pairs of an ADD/SUB/ONLY (each pair in either order)."""
        a, b = _two_lists(params)
        pairs: dict[int, int] = {}
        for x, y in zip(a, b):
            i, e = min(x, y), max(x, y)
            if not (1 <= i <= self.n and self.n < e <= self.n + self.m):
                raise ScpiError(-222, f"Data out of range; ports {x},{y}")
            if i in pairs or e in pairs.values():
                raise ScpiError(-221, f"Settings conflict; port {i if i in pairs else e} given twice")
            pairs[i] = e
        return pairs

    def _check_enabled(self, pairs: dict[int, int]) -> None:
        for i, e in pairs.items():
            for p in (i, e):
                if p in self.disabled:
                    raise ScpiError(-221, f"Settings conflict; port {p} disabled")

    def _do_add(self, params: str) -> None:
        pairs = self._pairs(params)
        self._check_enabled(pairs)
        for i, e in pairs.items():
            if self.map.get(i, e) != e:
                raise ScpiError(-221, f"Settings conflict; port {i} in use")
            j = self.partner(e)
            if j is not None and j != i:
                raise ScpiError(-221, f"Settings conflict; port {e} in use")
        if not self.faults.stuck:
            self.map.update(pairs)

    def _do_sub(self, params: str) -> None:
        pairs = self._pairs(params)
        if not self.faults.stuck:
            for i, e in pairs.items():
                if self.map.get(i) == e:
                    del self.map[i]

    def _do_only(self, params: str) -> None:
        pairs = self._pairs(params)
        self._check_enabled({i: e for i, e in pairs.items() if self.map.get(i) != e})
        if not self.faults.stuck:
            self.map = dict(pairs)

    def _do_disconnect_all(self, params: str) -> None:
        self._no_params(params)
        if not self.faults.stuck:
            self.map.clear()

    def _do_conn_state(self, params: str) -> str:
        self._no_params(params)
        pairs = sorted(self.map.items())
        return f"(@{','.join(str(i) for i, _ in pairs)}),(@{','.join(str(e) for _, e in pairs)})"

    def _do_conn_port(self, params: str) -> str:
        if not params:
            raise ScpiError(-109, "Missing parameter")
        if not re.fullmatch(r"\d+", params) or int(params) not in self.ports:
            raise ScpiError(-222, "Data out of range")
        return str(self.partner(int(params)) or 0)

    def _do_port_state(self, params: str) -> str:
        self._no_params(params)
        return "(" + ",".join("D" if p in self.disabled else "E" for p in self.ports) + ")"

    def _do_power(self, params: str) -> str:
        m = re.fullmatch(r"\(@([^)]*)\)", params)
        if not params:
            raise ScpiError(-109, "Missing parameter")
        if not m:
            raise ScpiError(-104, "Data type error")
        ports = _channel_list(m[1])
        if not ports or any(p not in self.monitors for p in ports):
            raise ScpiError(-222, "Data out of range; no power monitor at that port")
        return "(" + ",".join(f"{self.power_dbm(p):.2f}" for p in ports) + ")"

    def _do_error_next(self, params: str) -> str:
        self._no_params(params)
        code, message = self.errors.popleft() if self.errors else (0, "No error")
        return f'{code},"{message}"'

    def _do_error_all(self, params: str) -> str:
        self._no_params(params)
        items = list(self.errors) or [(0, "No error")]
        self.errors.clear()
        return ",".join(f'{code},"{message}"' for code, message in items)


class PolatisEmulator:
    """A `PolatisModel` behind an asyncio TCP server, with faults on command."""

    def __init__(self, model: PolatisModel | None = None, **model_kw):
        self.model = model or PolatisModel(**model_kw)
        self.received: list[str] = []                  # every program message, all connections, in order
        self.connections = 0                           # connections accepted so far
        self.host, self.port = "127.0.0.1", 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def faults(self) -> SwitchFaults:
        return self.model.faults

    @property
    def resource(self) -> str:
        """The VISA resource string a driver opens to reach this emulator."""
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]

    async def drop_connections(self) -> None:
        """Close every open connection now, as a unit does on reboot or an idle timeout."""
        for writer in list(self._writers):
            writer.close()
        await asyncio.sleep(0)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()                 # from Python 3.12 this waits for the connections too

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    break                              # the client closed (possibly mid-line)
                message = line.decode("latin-1").rstrip("\r\n")
                self.received.append(message)
                f = self.faults
                if f.drop:
                    break
                if f.hang:
                    continue
                reply = self.model.handle(message)
                if reply is None:
                    continue
                if f.delay:
                    await asyncio.sleep(f.delay)
                writer.write(GARBAGE if f.garbage else reply.encode("ascii") + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass                                       # reset by the client, or a line beyond the buffer
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
