"""QKD link telemetry over SNMP (v2c or v3 USM), table-driven: a metric table maps each metric
name to an OID, an SMI type and a scale, so a vendor's MIB is configuration, not code
(docs/protocols/snmp.md). Entry point `idq-snmp`: ID Quantique documents SNMP monitoring of QBER
and key rate but has not published its MIB, so the shipped profile (`drivers/snmp_profiles.toml`,
"idq-test-mib") points at qkdnode's test subtree under the experimental arc 1.3.6.1.3.9999, which
the emulator serves; the unit's own OIDs go into the link's settings at deployment.

Metric names that are fields of qkdnode.interfaces.LinkTelemetry (state, qber, excess_noise,
snr, channel_loss_db, secret_key_rate_bps) fill those fields; any other name lands in `extra`.

Polling: `connect()` starts a poller that GETs every metric in one request each `poll_interval`
seconds; `telemetry()` returns the latest poll (or raises the typed error of the latest poll if
the agent did not answer at all). Without `connect()`, `telemetry()` polls on the spot. When the
one GET times out, each OID is asked alone (all at once), so one OID that hangs does not blind
the others.

Alarms (`alarms`, and the result's `alarms`): a metric that answered before and now does not
(noSuchObject, noSuchInstance, endOfMibView, or no answer for that OID alone while the agent
answers the rest: a vendor software update moved it, say); a metric answering a value of the
wrong type or out of range (garbage); the QBER above `qber_alarm`. The result then carries the
metric as None (or absent from `extra`) and the reason in `missing`; `health` is "degraded"
with the alarms as its `last_error`, and turns "up" again by itself when they clear. A metric
that has never answered since start is reported in `missing` (check the OID) but raises no alarm.
An agent that answers nothing, or refuses our credentials, is a failure: DeviceUnavailable or
DeviceUnauthorized from `telemetry()`, `health` degraded then down after `down_after` polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import re
import time
import tomllib
from dataclasses import dataclass, field, fields
from importlib.resources import files
from typing import Any

from pysnmp.proto import rfc1902

from drivers.snmp import (SNMP_DEFAULTS, SNMP_SETTINGS, Oid, SnmpSession, absent, check_snmp_settings, is_integer,
                          is_unsigned, oid_text, parse_oid, type_name)
from qkdnode.errors import ConfigError, DeviceProtocolError, DeviceUnavailable, DriverError
from qkdnode.interfaces import DeviceHealth, LinkTelemetry, driver_settings

log = logging.getLogger("drivers.snmp_telemetry")

PROFILES: dict[str, dict[str, Any]] = tomllib.loads(files("drivers").joinpath("snmp_profiles.toml").read_text())

DEFAULTS: dict[str, Any] = {**SNMP_DEFAULTS, "profile": "idq-test-mib", "poll_interval": 10.0, "qber_alarm": 0.08,
                            "down_after": 3}
_SETTINGS = (SNMP_SETTINGS - {"write_community"}) | set(DEFAULTS) | {"name", "metrics"}

TYPES = {"gauge": "Gauge32/Unsigned32", "integer": "Integer32", "counter": "Counter32 or Counter64",
         "number": "Integer32, Gauge32, Counter32 or Counter64", "string": "a printable OctetString",
         "enum": "Integer32 with a named value"}
_METRIC_KEYS = {"oid", "type", "scale", "min", "max", "states"}
_FIELDS = ("state", "qber", "excess_noise", "snr", "channel_loss_db", "secret_key_rate_bps")
# Bounds a value of a LinkTelemetry field must respect whatever the config says (after scaling).
_FIELD_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "qber": (0.0, 0.5), "excess_noise": (0.0, None), "snr": (0.0, None), "channel_loss_db": (0.0, 100.0),
    "secret_key_rate_bps": (0.0, None)}


@dataclass(frozen=True)
class Metric:
    name: str
    oid: Oid
    type: str
    scale: float = 1.0
    min: float | None = None
    max: float | None = None
    states: dict[int, str] | None = None

    def take(self, raw: Any) -> float | str:
        """The value an agent answered, checked and scaled; ValueError saying what was wrong."""
        tag = getattr(raw, "tagSet", None)
        shown = _shown(raw)
        ok = {"gauge": is_unsigned(raw), "integer": is_integer(raw),
              "counter": tag in (rfc1902.Counter32.tagSet, rfc1902.Counter64.tagSet),
              "number": is_unsigned(raw) or is_integer(raw) or tag in (rfc1902.Counter32.tagSet,
                                                                       rfc1902.Counter64.tagSet),
              "string": tag == rfc1902.OctetString.tagSet, "enum": is_integer(raw)}[self.type]
        if not ok:
            raise ValueError(f"{type_name(raw)} {shown}, expected {TYPES[self.type]}")
        if self.type == "string":
            try:
                text = bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is None or not text.isprintable():
                raise ValueError(f"OctetString {shown}, expected printable text")
            return text
        if self.type == "enum":
            if int(raw) not in self.states:
                raise ValueError(f"Integer32 {int(raw)}, expected one of "
                                 + ", ".join(f"{k} ({v})" for k, v in sorted(self.states.items())))
            return self.states[int(raw)]
        value = int(raw) * self.scale
        lo, hi = self.bounds()
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f"{'' if lo is None else f'{lo:g}'}..{'' if hi is None else f'{hi:g}'}"
            raise ValueError(f"{type_name(raw)} {int(raw)} = {value:g}, outside {span}")
        return value

    def bounds(self) -> tuple[float | None, float | None]:
        lo, hi = _FIELD_BOUNDS.get(self.name, (None, None))
        if self.min is not None:
            lo = self.min if lo is None else max(lo, self.min)
        if self.max is not None:
            hi = self.max if hi is None else min(hi, self.max)
        return lo, hi


@dataclass(frozen=True)
class PolledTelemetry(LinkTelemetry):
    """LinkTelemetry as one SNMP poll found it. `missing`: metric -> why it has no value this time;
    `extra`: metrics that are not LinkTelemetry fields; `alarms`: alarm -> message."""

    extra: dict[str, float | str] = field(default_factory=dict, hash=False)
    missing: dict[str, str] = field(default_factory=dict, hash=False)
    alarms: dict[str, str] = field(default_factory=dict, hash=False)
    polled_at: float = 0.0


class SnmpTelemetrySource:
    """A QKD module's telemetry read over SNMP from a metric table (a TelemetrySource)."""

    def __init__(self, *, session: SnmpSession, name: str, metrics: list[Metric], poll_interval: float = 10.0,
                 qber_alarm: float = 0.08, down_after: int = 3):
        self.name, self.session, self.metrics = name, session, list(metrics)
        self.poll_interval, self.qber_alarm = float(poll_interval), float(qber_alarm)
        self.health = DeviceHealth(down_after, on_change=self._health_changed)
        self.alarms: dict[str, str] = {}
        self.last: PolledTelemetry | None = None
        self._outcome: PolledTelemetry | DriverError | None = None
        self._answered: set[str] = set()
        self._polled = asyncio.Event()
        self._task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"<SnmpTelemetrySource {self.name} {self.session!r} health={self.health.state}>"

    # -- settings

    @classmethod
    def check_settings(cls, settings: dict[str, Any], *, file, key: str) -> dict[str, Any]:
        """Names, types and the metric table, merged over the defaults and the profile. Touches no
        device. The merged table is in the result's "metric_table" (a list of Metric)."""
        m, err = driver_settings(settings, file=file, key=key, known=_SETTINGS, defaults=DEFAULTS)
        check_snmp_settings(m, err, file=file, key=key, writes=False)
        if "name" in m and (not isinstance(m["name"], str) or not m["name"]):
            raise err("name", "a non-empty string", m["name"])
        if m["profile"] not in PROFILES:
            raise err("profile", f"one of {', '.join(PROFILES)}", m["profile"])
        v = m["poll_interval"]
        if not _number(v) or not v > 0:
            raise err("poll_interval", "a positive number of seconds", v)
        v = m["qber_alarm"]
        if not _number(v) or not 0 < v <= 0.5:
            raise err("qber_alarm", "a QBER as a fraction, above 0 and at most 0.5 (0.08 = 8 %)", v)
        if not isinstance(m["down_after"], int) or isinstance(m["down_after"], bool) or m["down_after"] < 1:
            raise err("down_after", "a positive integer (failed polls in a row)", m["down_after"])
        m["metric_table"] = _metric_table(PROFILES[m["profile"]].get("metrics", {}), m.get("metrics", {}),
                                          file=file, key=key)
        return m

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, file, key: str) -> "SnmpTelemetrySource":
        m = cls.check_settings(settings, file=file, key=key)
        name = m.get("name") or f"{m['host']}:{m['port']}"
        return cls(session=SnmpSession.from_settings(name, m), name=name, metrics=m["metric_table"],
                   poll_interval=m["poll_interval"], qber_alarm=m["qber_alarm"], down_after=m["down_after"])

    # -- lifecycle

    async def connect(self) -> None:
        """Start polling and wait for the first poll; raise its error if the agent did not answer.
        The poller keeps going either way (it recovers by itself): `close()` stops it."""
        if self._task is None or self._task.done():
            waiting = self.next_poll()
            self._task = asyncio.create_task(self._run(), name=f"snmp-telemetry {self.name}")
            outcome = await waiting
        else:
            outcome = self._outcome if self._outcome is not None else await self.next_poll()
        if isinstance(outcome, DriverError):
            raise copy.copy(outcome) from None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.session.close()

    # -- TelemetrySource

    async def telemetry(self) -> PolledTelemetry:
        """The latest poll: polled now when no poller runs; from the poller otherwise."""
        if self._task is None or self._task.done():
            return await self.poll()
        outcome = self._outcome if self._outcome is not None else await self.next_poll()
        if isinstance(outcome, DriverError):
            raise copy.copy(outcome) from None
        return outcome

    async def next_poll(self) -> PolledTelemetry | DriverError:
        """Wait for the next poll to finish; its result, or the error it met (not raised)."""
        event = self._polled
        await event.wait()
        return self._outcome

    async def poll(self) -> PolledTelemetry:
        """Poll every metric now."""
        try:
            result = await self._poll()
        except DriverError as exc:
            self.health.failed(exc)
            self._done(exc)
            raise
        except Exception as exc:                          # nothing untyped leaves the driver
            error = DeviceProtocolError(f"{self.name}: {exc.__class__.__name__}: "
                                        f"{self.session.scrub(str(exc))[:200]}")
            self.health.failed(error)
            self._done(error)
            raise error from None
        self._done(result)
        return result

    # -- plumbing

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(DriverError):
                await self.poll()
            await asyncio.sleep(self.poll_interval)

    def _done(self, outcome: PolledTelemetry | DriverError) -> None:
        self._outcome = outcome
        if isinstance(outcome, PolledTelemetry):
            self.last = outcome
        event, self._polled = self._polled, asyncio.Event()
        event.set()

    async def _poll(self) -> PolledTelemetry:
        oids = [m.oid for m in self.metrics]
        try:
            rows: list = await self.session.get(oids)
        except DeviceUnavailable:
            if len(oids) == 1:
                raise
            rows = await self.session.get_each(oids)      # is it one OID that hangs, or the whole agent?
            if all(isinstance(r, DeviceUnavailable) for r in rows):
                raise rows[0] from None
        values: dict[str, float | str] = {}
        missing: dict[str, str] = {}
        alarms: dict[str, str] = {}
        for metric, row in zip(self.metrics, rows):
            at = oid_text(metric.oid)
            if isinstance(row, DeviceUnavailable):
                reason, garbage = (f"no answer for {at} within {self.session.timeout:g} s while the agent answers "
                                   "other OIDs"), False
            elif absent(row[1]):
                reason, garbage = f"{absent(row[1])} at {at}", False
            else:
                try:
                    values[metric.name] = metric.take(row[1])
                    continue
                except ValueError as exc:
                    reason, garbage = f"{at} answered {exc}", True
            if garbage:
                alarms[metric.name] = f"{metric.name}: {reason}"
            elif metric.name in self._answered:
                reason += " (it answered before: gone, e.g. after a software update of the unit)"
                alarms[metric.name] = f"{metric.name}: {reason}"
            else:
                reason += " (never answered since start: check the OID)"
            missing[metric.name] = reason
        self._answered.update(values)
        q = values.get("qber")
        if isinstance(q, float) and q > self.qber_alarm:
            alarms["qber-high"] = f"QBER {q * 100:.2f} % above the alarm threshold {self.qber_alarm * 100:.2f} %"
        self._set_alarms(alarms)
        known = {f.name for f in fields(LinkTelemetry)}
        return PolledTelemetry(state=str(values.get("state", "unknown")),
                               **{k: v for k, v in values.items() if k in known and k != "state"},
                               extra={k: v for k, v in values.items() if k not in known},
                               missing=missing, alarms=dict(alarms), polled_at=time.time())

    def _set_alarms(self, alarms: dict[str, str]) -> None:
        for name in alarms.keys() - self.alarms.keys():
            log.warning("%s: alarm: %s", self.name, alarms[name])
        for name in self.alarms.keys() - alarms.keys():
            log.info("%s: alarm cleared: %s", self.name, name)
        self.alarms = dict(alarms)
        if not alarms:
            self.health.ok()
            return
        text = "; ".join(alarms[k] for k in sorted(alarms))
        if self.health.state != "degraded" or self.health.last_error != text[:300]:
            self.health.failures = 0                       # the agent answers: alarms do not count toward down
            self.health.failed(text)

    def _health_changed(self, old: str, new: str) -> None:
        level = logging.INFO if new == "up" else logging.WARNING
        log.log(level, "%s: health %s -> %s%s", self.name, old, new,
                f" ({self.health.last_error})" if new != "up" else "")


def _metric_table(profile: dict[str, dict], overrides: Any, *, file, key: str) -> list[Metric]:
    if not isinstance(overrides, dict):
        raise ConfigError(file, f"{key}.metrics", "a table of metrics (name = {oid, type, scale, ...})", overrides)
    table: list[Metric] = []
    seen: dict[Oid, str] = {}
    for name in list(profile) + [n for n in overrides if n not in profile]:
        here = f"{key}.metrics.{name}"

        def err(what: str, expected: str, found: object = None, missing: bool = False) -> ConfigError:
            return ConfigError(file, f"{here}.{what}" if what else here, expected, found, missing=missing)

        if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
            raise err("", "a metric name of lower-case letters, digits and _", name)
        over = overrides.get(name, {})
        if not isinstance(over, dict):
            raise err("", "a table {oid, type, scale, ...}", over)
        for k in over:
            if k not in _METRIC_KEYS:
                raise ConfigError(file, f"{here}.{k}", f"one of {', '.join(sorted(_METRIC_KEYS))}",
                                  shown="a key this table does not know (its value is not shown)")
        spec = {**profile.get(name, {}), **over}
        oid = parse_oid(spec.get("oid"))
        if oid is None:
            raise err("oid", 'a numeric OID such as "1.3.6.1.4.1.99999.1.1.0"', spec.get("oid"),
                      missing="oid" not in spec)
        if oid in seen:
            raise err("oid", f"an OID no other metric uses (metric {seen[oid]} has it)", spec["oid"])
        seen[oid] = name
        kind = spec.get("type")
        if kind not in TYPES:
            raise err("type", f"one of {', '.join(TYPES)}", kind, missing="type" not in spec)
        if name == "state" and kind not in ("enum", "string"):
            raise err("type", 'enum or string (the state is a word such as "running")', kind)
        if name in _FIELD_BOUNDS and kind not in ("gauge", "integer", "counter", "number"):
            raise err("type", "a numeric type: gauge, integer, counter or number", kind)
        scale = spec.get("scale", 1.0)
        if not _number(scale) or scale == 0 or not math.isfinite(scale):
            raise err("scale", "a non-zero number (the unit of the raw value, e.g. 0.0001)", scale)
        lo, hi = spec.get("min"), spec.get("max")
        for what, v in (("min", lo), ("max", hi)):
            if v is not None and not _number(v):
                raise err(what, "a number (after scaling)", v)
        if lo is not None and hi is not None and lo > hi:
            raise err("max", f"at least min ({lo})", hi)
        states = None
        if kind == "enum":
            raw = spec.get("states")
            if not isinstance(raw, dict) or not raw:
                raise err("states", 'a table of values and names, e.g. { "1" = "running", "2" = "stopped" }', raw,
                          missing="states" not in spec)
            states = {}
            for k, v in raw.items():
                if not re.fullmatch(r"-?\d+", str(k)) or not isinstance(v, str) or not v:
                    raise err("states", "integer keys with non-empty names", {k: v})
                states[int(k)] = v
        elif "states" in spec:
            raise err("states", "nothing: only an enum metric has states", spec["states"])
        table.append(Metric(name, oid, kind, float(scale), lo, hi, states))
    if not table:
        raise ConfigError(file, f"{key}.metrics", "at least one metric (the profile has none)", missing=True)
    return table


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _shown(raw: Any) -> str:
    if getattr(raw, "tagSet", None) == rfc1902.OctetString.tagSet:
        return repr(bytes(raw)[:40])
    try:
        return raw.prettyPrint()[:40]
    except Exception:
        return "?"
