"""SNMP manager plumbing shared by the SNMP drivers (`drivers/snmp_switch.py`,
`drivers/snmp_telemetry.py`): the settings of an SNMP agent and a small asyncio session on
pysnmp (>= 7.1, the lextudio line) that does GET, SET and GETBULK walks over UDP.

Security: SNMP v2c with a community (`community` for reads, `write_community` for SETs), or
SNMP v3 USM with a user, authentication (HMAC-SHA family) and privacy (AES), always authPriv.
Communities and v3 passwords are secrets: they never appear in a ConfigError (the value is
not shown), a log line, an exception message or a repr. pysnmp's own reprs hide them too.

Errors, as the drivers raise them (all from qkdnode.errors):
- DeviceUnavailable: no answer within `timeout` s after `retries` retries. With v2c this is
  also what a wrong community looks like: agents drop such requests without a word, so the
  message says so.
- DeviceUnauthorized: the agent refused our v3 identity (unknown user, wrong authentication
  or privacy password, security level) or, for a SET, refused write access.
- DeviceRejected (SnmpRejected): the agent answered a SET with an error status such as
  wrongValue or inconsistentValue; nothing was changed (SNMP SETs are all or nothing).
- DeviceProtocolError: an answer that does not follow SNMP as asked (error status on a read,
  OIDs that do not advance in a walk).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Iterable

from pysnmp.hlapi.v3arch.asyncio import (
    USM_AUTH_HMAC96_SHA, USM_AUTH_HMAC128_SHA224, USM_AUTH_HMAC192_SHA256, USM_AUTH_HMAC256_SHA384,
    USM_AUTH_HMAC384_SHA512, USM_PRIV_CFB128_AES, USM_PRIV_CFB192_AES, USM_PRIV_CFB256_AES, CommunityData,
    ContextData, ObjectIdentity, ObjectType, SnmpEngine, UdpTransportTarget, UsmUserData, bulk_cmd, get_cmd,
    set_cmd)
from pysnmp.proto import errind, rfc1902, rfc1905

from qkdnode.errors import (ConfigError, DeviceProtocolError, DeviceRejected, DeviceUnauthorized,
                            DeviceUnavailable)

log = logging.getLogger("drivers.snmp")

Oid = tuple[int, ...]

AUTH_PROTOCOLS = {"SHA": USM_AUTH_HMAC96_SHA, "SHA-224": USM_AUTH_HMAC128_SHA224,
                  "SHA-256": USM_AUTH_HMAC192_SHA256, "SHA-384": USM_AUTH_HMAC256_SHA384,
                  "SHA-512": USM_AUTH_HMAC384_SHA512}
PRIV_PROTOCOLS = {"AES": USM_PRIV_CFB128_AES, "AES-192": USM_PRIV_CFB192_AES, "AES-256": USM_PRIV_CFB256_AES}

SNMP_DEFAULTS: dict[str, Any] = {"port": 161, "version": "2c", "community": "public", "timeout": 2.0, "retries": 1,
                                 "auth_protocol": "SHA", "priv_protocol": "AES"}
SNMP_SETTINGS = set(SNMP_DEFAULTS) | {"host", "write_community", "user", "auth_password", "priv_password"}
_SECRETS = ("community", "write_community", "auth_password", "priv_password")
MIN_PASSWORD = 8                     # RFC 3414 11.2: USM pass phrases are at least 8 octets
SET_CHUNK = 32                       # varbinds per SET request, to stay well inside a UDP datagram
MAX_WALK_ROWS = 100_000

# SET error statuses that mean "the agent understood and said no" rather than a fault.
_REFUSALS = {"wrongValue", "wrongType", "wrongLength", "wrongEncoding", "inconsistentValue", "noCreation",
             "notWritable", "inconsistentName", "badValue", "readOnly", "noSuchName", "resourceUnavailable"}
_ACCESS = {"noAccess", "authorizationError"}


class SnmpRejected(DeviceRejected):
    """The agent answered a SET with an error status; nothing was changed."""

    def __init__(self, message: str, status: str, oid: Oid | None):
        self.status, self.oid = status, oid
        super().__init__(message)


def oid_text(oid: Iterable[int]) -> str:
    return ".".join(str(n) for n in oid)


def parse_oid(text: object) -> Oid | None:
    """'1.3.6.1.2.1.1.1.0' (a leading dot allowed) -> a tuple; None if it is not a numeric OID."""
    if not isinstance(text, str):
        return None
    parts = text.strip().lstrip(".").split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        return None
    oid = tuple(int(p) for p in parts)
    return oid if oid[0] in (0, 1, 2) and all(n < 2 ** 32 for n in oid) else None


def check_snmp_settings(m: dict[str, Any], err: Callable[..., ConfigError], *, file, key: str,
                        writes: bool = False) -> None:
    """Check the agent-address and security settings in merged settings `m` (from driver_settings).
    Secrets are never echoed. `writes`: the driver sends SETs (v2c then takes `write_community`)."""
    def hidden(name: str, expected: str) -> ConfigError:
        return ConfigError(file, f"{key}.{name}", expected, shown="a value that is not shown")

    host = m.get("host")
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise err("host", "the agent's host name or IP address", host, missing="host" not in m)
    port = m["port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise err("port", "a UDP port number, 1-65535 (161 is SNMP's)", port)
    for name in ("timeout",):
        v = m[name]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise err(name, "a positive number of seconds", v)
    r = m["retries"]
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= 10:
        raise err("retries", "an integer from 0 to 10 (retries after a timeout)", r)
    version = m["version"]
    if version not in ("2c", "3"):
        raise err("version", 'SNMP version "2c" (community) or "3" (USM user)', version)
    if version == "2c":
        for name in ("user", "auth_password", "priv_password"):
            if name in m:
                raise hidden(name, 'no v3 setting with version = "2c"')
        for name in ("community", "write_community"):
            v = m.get(name)
            if name in m and (not isinstance(v, str) or not v or not v.isprintable()):
                raise hidden(name, "a non-empty printable string")
        if writes and "write_community" not in m:
            raise err("write_community", "the community with write access (SETs change the switch)",
                      missing=True)
        if not writes and "write_community" in m:
            raise hidden("write_community", "nothing: this driver only reads")
        return
    for name in ("community", "write_community"):
        if name in m and (name == "write_community" or m[name] != SNMP_DEFAULTS["community"]):
            raise hidden(name, 'no community with version = "3" (the USM user authenticates)')
    user = m.get("user")
    if not isinstance(user, str) or not user or not user.isprintable() or len(user) > 32:
        raise err("user", "the v3 USM user name (1-32 printable characters)", user, missing="user" not in m)
    if m["auth_protocol"] not in AUTH_PROTOCOLS:
        raise err("auth_protocol", f"one of {', '.join(AUTH_PROTOCOLS)}", m["auth_protocol"])
    if m["priv_protocol"] not in PRIV_PROTOCOLS:
        raise err("priv_protocol", f"one of {', '.join(PRIV_PROTOCOLS)}", m["priv_protocol"])
    for name in ("auth_password", "priv_password"):
        if name not in m:
            raise err(name, f"the v3 {'authentication' if name[0] == 'a' else 'privacy'} pass phrase "
                            "(version 3 always uses authPriv)", missing=True)
        v = m[name]
        if not isinstance(v, str) or len(v) < MIN_PASSWORD or not v.isprintable():
            raise hidden(name, f"a printable pass phrase of at least {MIN_PASSWORD} characters")


class SnmpSession:
    """One agent, one manager engine. Requests may run concurrently: pysnmp matches each answer to
    its request ID, so a late answer to a timed-out request is dropped, never taken for another's."""

    def __init__(self, *, name: str, host: str, port: int = 161, version: str = "2c", community: str = "public",
                 write_community: str | None = None, user: str | None = None, auth_protocol: str = "SHA",
                 auth_password: str | None = None, priv_protocol: str = "AES", priv_password: str | None = None,
                 timeout: float = 2.0, retries: int = 1):
        self.name, self.host, self.port, self.version = name, host, int(port), version
        self.user = user
        self.timeout, self.retries = float(timeout), int(retries)
        self._secrets = [s for s in (community, write_community, auth_password, priv_password) if s]
        if version == "3":
            auth = UsmUserData(user, auth_password, priv_password, authProtocol=AUTH_PROTOCOLS[auth_protocol],
                               privProtocol=PRIV_PROTOCOLS[priv_protocol])
            self._read_auth = self._write_auth = auth
        else:
            self._read_auth = CommunityData(community, mpModel=1)
            self._write_auth = CommunityData(write_community, mpModel=1) if write_community else None
        self._engine: SnmpEngine | None = None
        self._target: UdpTransportTarget | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, name: str, m: dict[str, Any]) -> "SnmpSession":
        return cls(name=name, host=m["host"], port=m["port"], version=m["version"], community=m["community"],
                   write_community=m.get("write_community"), user=m.get("user"),
                   auth_protocol=m["auth_protocol"], auth_password=m.get("auth_password"),
                   priv_protocol=m["priv_protocol"], priv_password=m.get("priv_password"),
                   timeout=m["timeout"], retries=m["retries"])

    def __repr__(self) -> str:
        who = f"user={self.user!r}" if self.version == "3" else "community=<hidden>"
        return f"<SnmpSession {self.name} {self.host}:{self.port} v{self.version} {who}>"

    @property
    def where(self) -> str:
        return f"{self.name} ({self.host}:{self.port}, SNMP v{self.version})"

    def scrub(self, text: str) -> str:
        """`text` with every secret of this session blanked out."""
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def close(self) -> None:
        engine, self._engine, self._target = self._engine, None, None
        if engine is not None:
            engine.close_dispatcher()

    # -- operations

    async def get(self, oids: list[Oid]) -> list[tuple[Oid, Any]]:
        """The values of `oids`, in order; a missing one comes back as rfc1905 NoSuchObject,
        NoSuchInstance or EndOfMibView (see `absent`)."""
        vbs = await self._run(get_cmd, self._read_auth, [ObjectType(ObjectIdentity(o)) for o in oids],
                              "GET " + _names(oids))
        if len(vbs) != len(oids) or any(tuple(n) != o for (n, _), o in zip(vbs, oids)):
            raise DeviceProtocolError(f"{self.where}: GET {_names(oids)} answered other OIDs: "
                                      f"{_names([tuple(n) for n, _ in vbs])}")
        return [(o, v) for o, (_, v) in zip(oids, vbs)]

    async def get_each(self, oids: list[Oid]) -> list[tuple[Oid, Any] | DeviceUnavailable]:
        """Each OID in a GET of its own, all at once: the value, or the DeviceUnavailable of an OID
        that got no answer while others may have. Other errors raise."""
        async def one(oid: Oid):
            try:
                return (await self.get([oid]))[0]
            except DeviceUnavailable as exc:
                return exc
        return list(await asyncio.gather(*(one(o) for o in oids)))

    async def set(self, varbinds: list[tuple[Oid, Any]]) -> None:
        """SET, in requests of at most SET_CHUNK varbinds (each all or nothing)."""
        if self._write_auth is None:
            raise DeviceUnauthorized(f"{self.where}: no write_community configured, SETs cannot be sent")
        for k in range(0, len(varbinds), SET_CHUNK):
            chunk = varbinds[k:k + SET_CHUNK]
            what = "SET " + ", ".join(f"{oid_text(o)}={_show_value(v)}" for o, v in chunk)
            await self._run(set_cmd, self._write_auth, [ObjectType(ObjectIdentity(o), v) for o, v in chunk],
                            what, oids=[o for o, _ in chunk])

    async def walk(self, prefix: Oid, max_repetitions: int = 24) -> list[tuple[Oid, Any]]:
        """Every (oid, value) under `prefix`, by GETBULK, in OID order."""
        out: list[tuple[Oid, Any]] = []
        cur = prefix
        while True:
            vbs = await self._run(bulk_cmd, self._read_auth, [ObjectType(ObjectIdentity(cur))],
                                  f"GETBULK {oid_text(cur)}", bulk=(0, max_repetitions))
            if not vbs:
                raise DeviceProtocolError(f"{self.where}: GETBULK {oid_text(cur)} answered no variable")
            for name, value in vbs:
                oid = tuple(name)
                if oid[:len(prefix)] != prefix or isinstance(value, rfc1905.EndOfMibView):
                    return out
                if oid <= cur:
                    raise DeviceProtocolError(f"{self.where}: walk of {oid_text(prefix)}: {oid_text(oid)} does not "
                                              f"follow {oid_text(cur)}")
                out.append((oid, value))
                cur = oid
            if len(out) > MAX_WALK_ROWS:
                raise DeviceProtocolError(f"{self.where}: walk of {oid_text(prefix)}: more than {MAX_WALK_ROWS} rows")

    # -- plumbing

    async def _run(self, command, auth, varbinds, what: str, *, oids: list[Oid] | None = None,
                   bulk: tuple[int, int] | None = None) -> list:
        async with self._lock:
            if self._engine is None:
                self._engine = SnmpEngine()
            if self._target is None:
                try:
                    self._target = await UdpTransportTarget.create((self.host, self.port), timeout=self.timeout,
                                                                   retries=self.retries)
                except Exception as exc:       # a host name that does not resolve
                    raise DeviceUnavailable(f"{self.where}: cannot reach the agent: "
                                            f"{self.scrub(str(exc)) or exc.__class__.__name__}") from None
            snmp_engine, target = self._engine, self._target
        args = (*bulk, *varbinds) if bulk else tuple(varbinds)
        limit = self.timeout * (self.retries + 1) + 2.0   # pysnmp times out first; this is a backstop
        try:
            ei, es, ix, vbs = await asyncio.wait_for(
                command(snmp_engine, auth, target, ContextData(), *args, lookupMib=False), limit)
        except asyncio.TimeoutError:
            raise DeviceUnavailable(f"{self.where}: {what}: no answer within {limit:g} s") from None
        except Exception as exc:               # pysnmp refusing a value or an answer it cannot take
            raise DeviceProtocolError(f"{self.where}: {what}: {exc.__class__.__name__}: "
                                      f"{self.scrub(str(exc))[:200]}") from None
        if ei:
            raise self._indication(ei, what)
        if es:
            status = es.prettyPrint() if hasattr(es, "prettyPrint") else str(es)
            i = int(ix)
            oid = (oids or [])[i - 1] if oids and 0 < i <= len(oids) else None
            at = f" at {oid_text(oid)}" if oid else ""
            if status in _ACCESS:
                raise DeviceUnauthorized(f"{self.where}: {what}: the agent refused access ({status}{at}): check the "
                                         f"{'write community' if self.version == '2c' else 'v3 user access (VACM)'}")
            if oids is not None and status in _REFUSALS:
                raise SnmpRejected(f"{self.where}: {what}: the agent refused it: {status}{at}; nothing was changed",
                                   status, oid)
            raise DeviceProtocolError(f"{self.where}: {what}: error status {status}{at}")
        return list(vbs)

    def _indication(self, ei, what: str) -> Exception:
        tries = f"{self.retries + 1} tr{'y' if self.retries == 0 else 'ies'}"
        if isinstance(ei, errind.RequestTimedOut):
            hint = " (an agent also stays silent when the community is wrong)" if self.version == "2c" else ""
            return DeviceUnavailable(f"{self.where}: {what}: no answer within {self.timeout:g} s, {tries}{hint}")
        if isinstance(ei, errind.UnknownUserName):
            return DeviceUnauthorized(f"{self.where}: the agent does not know v3 user {self.user!r}")
        if isinstance(ei, errind.WrongDigest):
            return DeviceUnauthorized(f"{self.where}: v3 user {self.user!r}: authentication failed (wrong digest): "
                                      "check auth_password and auth_protocol")
        if isinstance(ei, errind.DecryptionError):
            return DeviceUnauthorized(f"{self.where}: v3 user {self.user!r}: the agent could not decrypt the request: "
                                      "check priv_password and priv_protocol")
        if isinstance(ei, (errind.UnsupportedSecurityLevel, errind.UnknownSecurityName, errind.AuthenticationError,
                           errind.AuthenticationFailure, errind.UnsupportedAuthProtocol,
                           errind.UnsupportedPrivProtocol)):
            return DeviceUnauthorized(f"{self.where}: v3 user {self.user!r}: {ei}")
        if isinstance(ei, errind.NotInTimeWindow):
            return DeviceUnavailable(f"{self.where}: {what}: the agent's clock moved (not in time window); retry")
        return DeviceUnavailable(f"{self.where}: {what}: {self.scrub(str(ei))[:200]}")


def absent(value: Any) -> str | None:
    """'noSuchObject', 'noSuchInstance' or 'endOfMibView' when an answer says the variable is not
    there; None for a value."""
    if isinstance(value, rfc1905.NoSuchObject):
        return "noSuchObject"
    if isinstance(value, rfc1905.NoSuchInstance):
        return "noSuchInstance"
    if isinstance(value, rfc1905.EndOfMibView):
        return "endOfMibView"
    return None


_TYPE_NAMES = [(rfc1902.Counter64, "Counter64"), (rfc1902.Counter32, "Counter32"), (rfc1902.Gauge32, "Gauge32"),
               (rfc1902.TimeTicks, "TimeTicks"), (rfc1902.IpAddress, "IpAddress"), (rfc1902.Opaque, "Opaque"),
               (rfc1902.Integer32, "Integer32"), (rfc1902.Integer, "Integer32"),
               (rfc1902.OctetString, "OctetString"), (rfc1902.ObjectName, "OBJECT IDENTIFIER")]


def type_name(value: Any) -> str:
    """The SMI type of a value as an agent sent it (by its ASN.1 tag), e.g. 'Gauge32'."""
    tag = getattr(value, "tagSet", None)
    for cls, name in _TYPE_NAMES:
        if tag == cls.tagSet:
            return name
    return absent(value) or type(value).__name__


def is_unsigned(value: Any) -> bool:
    """Gauge32 / Unsigned32 (one tag on the wire)."""
    return getattr(value, "tagSet", None) == rfc1902.Gauge32.tagSet


def is_integer(value: Any) -> bool:
    return getattr(value, "tagSet", None) == rfc1902.Integer32.tagSet


def _names(oids) -> str:
    return ", ".join(oid_text(o) for o in oids[:4]) + (f" (+{len(oids) - 4} more)" if len(oids) > 4 else "")


def _show_value(v: Any) -> str:
    try:
        return v.prettyPrint()
    except Exception:
        return repr(v)
