"""Emulated SNMP agents: an in-process pysnmp agent on a real UDP socket (loopback, port 0 picks a
free port) serving a MIB view that is computed from live state on every request, with faults on
command. Two views ship:

- `PolatisSnmpEmulator`: a Polatis optical switch's cross-connect table (enterprise 26592,
  POLATIS-OXC-MIB as far as public material shows it). The switch itself is the SCPI
  emulator's `hil.switch.PolatisModel` (map, disabled ports, light and power monitors), so
  both emulators share one model of the unit.
- `IdqSnmpEmulator`: QKD link telemetry for the IDQ profile, under the experimental arc
  1.3.6.1.3.9999.1 (vendors' MIBs are not public; see docs/protocols/snmp.md), with a QBER that
  drifts like a real link's and a key rate that follows it.

Security as a unit is set up: v2c communities (read-only "public", read-write "private" by
default) and v3 USM users (authPriv: HMAC-SHA family and AES). A request with a wrong community
is dropped without an answer; a wrong v3 password gets the USM report (wrongDigest), as
RFC 3414 agents do.

Faults (`SnmpFaults`, on `emulator.faults`): stop answering; answer late; garbage (values of
the wrong SMI type, values of the right type but nonsense content, or datagrams that are not
SNMP at all); OIDs gone (noSuchObject, and gone from walks, as after a vendor software update);
OIDs that never answer (the agent drops any request naming them); and for the switch, SETs
that are accepted but do not take. `clear_faults()` ends them all.

Emulator choices where the public material is silent (not checked against a real unit): a SET
of polatisOxcPortPatch.p = q is refused with inconsistentValue when p or q is patched to another
port or disabled (set 0 first); q on the same side as p, or beyond the switch, is wrongValue; a
row beyond the switch is noCreation. polatisOpmPower is in hundredths of a dBm (Integer32).
A SET request is all or nothing.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdrsp
from pysnmp.entity.rfc3413 import context as snmp_context
from pysnmp.error import PySnmpError
from pysnmp.proto import rfc1902, rfc1905
from pysnmp.smi import error as smi_error
from pysnmp.smi import instrum

from hil.switch import PolatisModel

Oid = tuple[int, ...]

GARBAGE = b"\x30\x82\xff\xffGaRbAgE\x00\x8c?!"          # a BER header that lies about its length

AUTH = {"SHA": config.USM_AUTH_HMAC96_SHA, "SHA-224": config.USM_AUTH_HMAC128_SHA224,
        "SHA-256": config.USM_AUTH_HMAC192_SHA256, "SHA-384": config.USM_AUTH_HMAC256_SHA384,
        "SHA-512": config.USM_AUTH_HMAC384_SHA512}
PRIV = {"AES": config.USM_PRIV_CFB128_AES, "AES-192": config.USM_PRIV_CFB192_AES,
        "AES-256": config.USM_PRIV_CFB256_AES}

SYS_DESCR: Oid = (1, 3, 6, 1, 2, 1, 1, 1, 0)


def under(oid: Oid, prefixes: Iterable[Oid]) -> bool:
    return any(oid[:len(p)] == p for p in prefixes)


@dataclass
class SnmpFaults:
    """Faults on command.
    `hang`: read every request, answer none. `delay`: seconds before each answer.
    `garbage`: None, "type" (every value an OctetString of junk), "value" (right type, nonsense
    content: 4294967295, -2147483648, unprintable strings) or "bytes" (answers that are not SNMP).
    `gone`: OID prefixes that are not there any more (GET: noSuchObject; walks skip them).
    `silent`: OID prefixes whose requests are dropped unanswered (the rest of the agent answers).
    `stuck`: SETs are accepted (no error) but change nothing."""

    hang: bool = False
    delay: float = 0.0
    garbage: str | None = None
    gone: set[Oid] = field(default_factory=set)
    silent: set[Oid] = field(default_factory=set)
    stuck: bool = False

    def clear(self) -> None:
        self.hang = self.stuck = False
        self.delay, self.garbage = 0.0, None
        self.gone.clear()
        self.silent.clear()


@dataclass(frozen=True)
class V3User:
    name: str
    auth_password: str
    priv_password: str
    auth_protocol: str = "SHA"
    priv_protocol: str = "AES"
    write: bool = True


class MibView:
    """What an agent serves: sorted OIDs and their current values; `write` takes a SET."""

    def oids(self) -> list[Oid]:
        raise NotImplementedError

    def value(self, oid: Oid) -> Any | None:
        raise NotImplementedError

    def write(self, varbinds: list[tuple[Oid, Any]], faults: SnmpFaults) -> None:
        """Apply a SET (all or nothing) or raise a pysnmp smi error naming the varbind (`idx`)."""
        raise smi_error.NotWritableError(name=varbinds[0][0], idx=0)


class _Drop(PySnmpError):
    """Raised inside the agent to send no answer at all (pysnmp's responder then stays silent)."""


class _Instrumentation(instrum.AbstractMibInstrumController):
    def __init__(self, agent: "SnmpAgent"):
        self.agent = agent

    # -- helpers

    def _allowed(self, view: str, name, val, idx: int, ctx) -> bool:
        """VACM: False when the OID is not in the requester's view; raises when no access at all."""
        return not ctx["acFun"](view, (name, val), idx=idx, snmpEngine=ctx["snmpEngine"])

    def _garbled(self, value: Any) -> Any:
        mode = self.agent.faults.garbage
        if mode == "type":
            return rfc1902.OctetString(b"\xffjunk\x00")
        if mode == "value":
            if value.tagSet in (rfc1902.Gauge32.tagSet, rfc1902.Counter32.tagSet):
                return value.clone(4294967295)
            if value.tagSet == rfc1902.Integer32.tagSet:
                return value.clone(-2147483648)
            if value.tagSet == rfc1902.OctetString.tagSet:
                return value.clone(b"\x00\xff??x??")
        return value

    def _lookup(self, oid: Oid) -> Any | None:
        if under(oid, self.agent.faults.gone):
            return None
        return self.agent.mib.value(oid)

    # -- the three operations the command responders call

    def read_variables(self, *varBinds, **ctx):
        out = []
        for i, (name, val) in enumerate(varBinds):
            oid = tuple(name)
            if under(oid, self.agent.faults.silent):
                raise _Drop("silent OID")
            value = self._lookup(oid) if self._allowed("read", name, val, i, ctx) else None
            out.append((name, rfc1905.noSuchObject if value is None else self._garbled(value)))
        return out

    def read_next_variables(self, *varBinds, **ctx):
        out = []
        oids = self.agent.mib.oids()
        for i, (name, val) in enumerate(varBinds):
            oid = tuple(name)
            if under(oid, self.agent.faults.silent):
                raise _Drop("silent OID")
            k = bisect.bisect_right(oids, oid)
            found = None
            while k < len(oids):
                nxt = oids[k]
                value = self._lookup(nxt)
                if value is not None and self._allowed("read", rfc1902.ObjectName(nxt), value, i, ctx):
                    if under(nxt, self.agent.faults.silent):
                        raise _Drop("silent OID")
                    found = (rfc1902.ObjectName(nxt), self._garbled(value))
                    break
                k += 1
            out.append(found or (name, rfc1905.endOfMibView))
        return out

    def write_variables(self, *varBinds, **ctx):
        self.agent.sets.append([(tuple(n), v) for n, v in varBinds])
        for i, (name, val) in enumerate(varBinds):
            if under(tuple(name), self.agent.faults.silent):
                raise _Drop("silent OID")
            if not self._allowed("write", name, val, i, ctx):
                raise smi_error.NoAccessError(name=name, idx=i)
            if under(tuple(name), self.agent.faults.gone):
                raise smi_error.NotWritableError(name=name, idx=i)
        try:
            self.agent.mib.write([(tuple(n), v) for n, v in varBinds], self.agent.faults)
        except smi_error.SmiError:
            raise
        except Exception as exc:                       # a bug in a view must not silence the agent
            raise smi_error.GenError(name=varBinds[0][0], idx=0) from exc
        return list(varBinds)


class _Context(snmp_context.SnmpContext):
    def __init__(self, snmp_engine, instrumentation):
        super().__init__(snmp_engine)
        self._instrumentation = instrumentation

    def get_mib_instrum(self, contextName=b""):
        return self._instrumentation


class _FaultyUdp(udp.UdpAsyncioTransport):
    """The agent's UDP endpoint: counts requests and applies hang, delay and garbage bytes."""

    def __init__(self, agent: "SnmpAgent"):
        super().__init__()
        self._agent = agent

    def datagram_received(self, datagram, transportAddress):
        self._agent.requests += 1
        if self._agent.faults.hang:
            return
        super().datagram_received(datagram, transportAddress)

    def send_message(self, outgoingMessage, transportAddress):
        f = self._agent.faults
        if f.garbage == "bytes":
            outgoingMessage = GARBAGE
        if f.delay > 0:
            handle = self.loop.call_later(f.delay, self._late, outgoingMessage, transportAddress)
            self._agent._pending.add(handle)
        else:
            super().send_message(outgoingMessage, transportAddress)

    def _late(self, message, address):
        if self.transport is not None and not self.transport.is_closing():
            super().send_message(message, address)


class SnmpAgent:
    """A pysnmp agent serving `mib` on UDP, with v2c communities and v3 users, faults on command.
    `requests` counts datagrams received; `sets` records every SET request's varbinds."""

    def __init__(self, mib: MibView, *, communities: dict[str, bool] | None = None,
                 users: list[V3User] | None = None, faults: SnmpFaults | None = None):
        self.mib = mib
        self.communities = {"public": False, "private": True} if communities is None else dict(communities)
        self.users = [V3User("qkdnode", "auth-pass-phrase", "priv-pass-phrase")] if users is None else list(users)
        self.faults = faults or SnmpFaults()
        self.host, self.port = "127.0.0.1", 0
        self.requests = 0
        self.sets: list[list[tuple[Oid, Any]]] = []
        self._engine = None
        self._pending: set[asyncio.TimerHandle] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        self.host, self.port = host, sock.getsockname()[1]
        e = engine.SnmpEngine()
        config.add_transport(e, udp.DOMAIN_NAME, _FaultyUdp(self).open_server_mode(sock=sock))
        # A read-only principal gets a write view that holds nothing (zeroDotZero): pysnmp 7.1 lets a
        # SET through when the write view does not exist at all.
        everything, nothing = (1, 3, 6), (0, 0)
        for i, (community, writable) in enumerate(self.communities.items()):
            config.add_v1_system(e, f"c{i}", community)
            config.add_vacm_user(e, 2, f"c{i}", "noAuthNoPriv", everything, everything if writable else nothing)
        for u in self.users:
            config.add_v3_user(e, u.name, AUTH[u.auth_protocol], u.auth_password, PRIV[u.priv_protocol],
                               u.priv_password)
            config.add_vacm_user(e, 3, u.name, "authPriv", everything, everything if u.write else nothing)
        ctx = _Context(e, _Instrumentation(self))
        for responder in (cmdrsp.GetCommandResponder, cmdrsp.NextCommandResponder, cmdrsp.BulkCommandResponder,
                          cmdrsp.SetCommandResponder):
            responder(e, ctx)
        self._engine = e
        await asyncio.sleep(0)                        # let the endpoint attach to the loop

    async def stop(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        e, self._engine = self._engine, None
        if e is not None:
            e.close_dispatcher()
        await asyncio.sleep(0)

    def clear_faults(self) -> None:
        self.faults.clear()


# ---------------------------------------------------------------- the Polatis switch over SNMP

POLATIS = (1, 3, 6, 1, 4, 1, 26592)
OXC_SIZE: Oid = POLATIS + (2, 2, 2, 1, 1, 0)
PORT_PATCH: Oid = POLATIS + (2, 2, 2, 1, 2, 1, 2)
PORT_CURRENT_STATE: Oid = POLATIS + (2, 2, 2, 1, 2, 1, 3)
PORT_DESIRED_STATE: Oid = POLATIS + (2, 2, 2, 1, 2, 1, 4)
OPM_POWER: Oid = POLATIS + (2, 3, 2, 2, 2, 1, 1)
ENABLED, DISABLED = 1, 2


class PolatisMib(MibView):
    """polatisOxcSize, the port table (patch, current and desired state) and the power monitors of
    a `PolatisModel`, plus sysDescr."""

    def __init__(self, model: PolatisModel):
        self.model = model
        self._shape: tuple | None = None
        self._oids: list[Oid] = []

    def oids(self) -> list[Oid]:
        m = self.model
        shape = (m.n, m.m, frozenset(m.monitors))
        if shape != self._shape:
            ports = list(m.ports)
            found = [SYS_DESCR, OXC_SIZE]
            for column in (PORT_PATCH, PORT_CURRENT_STATE, PORT_DESIRED_STATE):
                found += [column + (p,) for p in ports]
            found += [OPM_POWER + (p,) for p in sorted(m.monitors)]
            self._oids, self._shape = sorted(found), shape
        return self._oids

    def value(self, oid: Oid) -> Any | None:
        m = self.model
        if oid == SYS_DESCR:
            return rfc1902.OctetString(f"Polatis {m.product} {m.serial} {m.firmware} (emulated)")
        if oid == OXC_SIZE:
            return rfc1902.OctetString(f"{m.n}x{m.m}")
        if len(oid) == len(PORT_PATCH) + 1 and oid[-1] in m.ports:
            column, p = oid[:-1], oid[-1]
            if column == PORT_PATCH:
                return rfc1902.Unsigned32(m.partner(p) or 0)
            if column in (PORT_CURRENT_STATE, PORT_DESIRED_STATE):
                return rfc1902.Integer32(DISABLED if p in m.disabled else ENABLED)
        if len(oid) == len(OPM_POWER) + 1 and oid[:-1] == OPM_POWER and oid[-1] in m.monitors:
            return rfc1902.Integer32(round(m.power_dbm(oid[-1]) * 100))
        return None

    def write(self, varbinds: list[tuple[Oid, Any]], faults: SnmpFaults) -> None:
        m = self.model
        new_map = dict(m.map)
        disabled = set(m.disabled)

        def partner(port: int) -> int | None:
            if port in new_map:
                return new_map[port]
            return next((i for i, e in new_map.items() if e == port), None)

        for idx, (oid, value) in enumerate(varbinds):
            column, p = oid[:-1], oid[-1]
            if column not in (PORT_PATCH, PORT_DESIRED_STATE) or len(oid) != len(PORT_PATCH) + 1:
                raise smi_error.NotWritableError(name=oid, idx=idx)
            if p not in m.ports:
                raise smi_error.NoCreationError(name=oid, idx=idx)
            if column == PORT_DESIRED_STATE:
                if value.tagSet != rfc1902.Integer32.tagSet:
                    raise smi_error.WrongTypeError(name=oid, idx=idx)
                if int(value) not in (ENABLED, DISABLED):
                    raise smi_error.WrongValueError(name=oid, idx=idx)
                (disabled.discard if int(value) == ENABLED else disabled.add)(p)
                continue
            if value.tagSet != rfc1902.Unsigned32.tagSet:
                raise smi_error.WrongTypeError(name=oid, idx=idx)
            q = int(value)
            if q == 0:
                other = partner(p)
                if other is not None:
                    new_map.pop(min(p, other), None)
                continue
            ingress = p <= m.n
            if not (m.n < q <= m.n + m.m if ingress else 1 <= q <= m.n):
                raise smi_error.WrongValueError(name=oid, idx=idx)
            i, e = (p, q) if ingress else (q, p)
            if partner(i) == e:
                continue
            if partner(i) is not None or partner(e) is not None or i in disabled or e in disabled:
                raise smi_error.InconsistentValueError(name=oid, idx=idx)
            new_map[i] = e
        if not faults.stuck:
            m.map, m.disabled = new_map, disabled


class PolatisSnmpEmulator(SnmpAgent):
    """A Polatis switch answering SNMP; `model` is the same `PolatisModel` the SCPI emulator uses."""

    def __init__(self, model: PolatisModel | None = None, *, communities: dict[str, bool] | None = None,
                 users: list[V3User] | None = None, **model_kw):
        self.model = model or PolatisModel(**model_kw)
        super().__init__(PolatisMib(self.model), communities=communities, users=users)


# ---------------------------------------------------------------- QKD link telemetry (the IDQ profile's test MIB)

TEST_ARC: Oid = (1, 3, 6, 1, 3, 9999)                  # experimental (RFC 1155 1.3.6.1.3), not a vendor's
QKD_BASE: Oid = TEST_ARC + (1,)
QKD_QBER: Oid = QKD_BASE + (1, 0)                       # Gauge32, units of 0.01 % (1e-4)
QKD_SKR: Oid = QKD_BASE + (2, 0)                        # Gauge32, bit/s
QKD_STATE: Oid = QKD_BASE + (3, 0)                      # Integer32: running(1) stopped(2) calibrating(3) noKey(4)
QKD_MODEL: Oid = QKD_BASE + (4, 0)                      # OctetString
QKD_VISIBILITY: Oid = QKD_BASE + (5, 0)                 # Gauge32, units of 0.1 % (1e-3)
STATE_CODES = {"running": 1, "stopped": 2, "calibrating": 3, "no-key": 4}


def _h2(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


class QkdLinkModel:
    """A DV-QKD link as its module reports it. The QBER follows an Ornstein-Uhlenbeck drift around
    `qber` (mean reversion `reversion` per second, stationary spread `sigma`), as temperature and
    polarisation drift move a real link's error rate. The secret key rate follows the asymptotic
    BB84 bound, `skr_bps * (1 - 2 h(Q)) / (1 - 2 h(qber))`, and is 0 above `abort_qber`, where the
    module says no-key. `forced_qber` (a fault) pins the QBER, e.g. above the abort threshold."""

    def __init__(self, *, qber: float = 0.015, skr_bps: float = 1200.0, sigma: float = 0.002,
                 reversion: float = 0.5, abort_qber: float = 0.11, seed: int | None = None,
                 model: str = "EMU-Cerberis-XG"):
        self.mean, self.skr_at_mean, self.sigma, self.reversion = qber, skr_bps, sigma, reversion
        self.abort_qber, self.model = abort_qber, model
        self.running = True
        self.forced_qber: float | None = None
        self._rng = random.Random(seed)
        self._q, self._t = qber, time.monotonic()

    def qber(self) -> float:
        """The QBER now. Reads within a millisecond (one request) see the same value."""
        now = time.monotonic()
        dt = now - self._t
        if dt >= 0.001:
            self._t = now
            decay = math.exp(-self.reversion * dt)
            spread = self.sigma * math.sqrt(1 - decay * decay)
            self._q = self.mean + (self._q - self.mean) * decay + spread * self._rng.gauss(0, 1)
            self._q = min(max(self._q, 0.0005), 0.5)
        if self.forced_qber is not None:
            return self.forced_qber
        return self._q

    def state(self, q: float) -> str:
        if not self.running:
            return "stopped"
        return "no-key" if q > self.abort_qber else "running"

    def skr_bps(self, q: float) -> float:
        if not self.running or q > self.abort_qber:
            return 0.0
        return max(0.0, self.skr_at_mean * (1 - 2 * _h2(q)) / (1 - 2 * _h2(self.mean)))


class QkdTelemetryMib(MibView):
    def __init__(self, model: QkdLinkModel):
        self.model = model
        self._oids = sorted([SYS_DESCR, QKD_QBER, QKD_SKR, QKD_STATE, QKD_MODEL, QKD_VISIBILITY])

    def oids(self) -> list[Oid]:
        return self._oids

    def value(self, oid: Oid) -> Any | None:
        m = self.model
        if oid == SYS_DESCR:
            return rfc1902.OctetString(f"{m.model} QKD module (emulated)")
        if oid == QKD_MODEL:
            return rfc1902.OctetString(m.model)
        if oid not in (QKD_QBER, QKD_SKR, QKD_STATE, QKD_VISIBILITY):
            return None
        q = m.qber()
        if oid == QKD_QBER:
            return rfc1902.Gauge32(round(q * 10_000))
        if oid == QKD_SKR:
            return rfc1902.Gauge32(round(m.skr_bps(q)))
        if oid == QKD_STATE:
            return rfc1902.Integer32(STATE_CODES[m.state(q)])
        return rfc1902.Gauge32(round((1 - 2 * q) * 1000))


class IdqSnmpEmulator(SnmpAgent):
    """A QKD module's SNMP agent serving the test telemetry subtree from a drifting `QkdLinkModel`."""

    def __init__(self, model: QkdLinkModel | None = None, *, communities: dict[str, bool] | None = None,
                 users: list[V3User] | None = None, **model_kw):
        self.model = model or QkdLinkModel(**model_kw)
        super().__init__(QkdTelemetryMib(self.model), communities=communities, users=users)

    def clear_faults(self) -> None:
        super().clear_faults()
        self.model.forced_qber = None
