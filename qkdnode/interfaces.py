"""Southbound driver interfaces and the driver registry.

A driver knows its device and its transport, nothing of the vault or the HTTP servers. The
node finds a driver class by name in the entry-point group `qkdnode.drivers`, so a vendor
can ship one as a package of its own.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol, runtime_checkable

from qkdnode.errors import ConfigError

DRIVER_GROUP = "qkdnode.drivers"


@dataclass
class KeyBlock:
    """A piece of link key as the device delivered it, with the ID both ends of the link know.

    `bits` is a bytearray so the holder can zero it once stored; it never appears in a repr.
    `leaked_bits` is what the device disclosed about the block during error correction (CV-QKD
    reconciled key): privacy amplification must remove at least that much. Final key from a
    vendor KME has none left."""

    block_id: str
    bits: bytearray = field(repr=False)
    leaked_bits: int = 0

    def wipe(self) -> None:
        self.bits[:] = bytes(len(self.bits))


@dataclass(frozen=True)
class SourceStatus:
    """What a key source reports about its link (ETSI 014 status, or a module's own figures)."""

    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    min_key_size: int
    max_key_size: int


@runtime_checkable
class KeySource(Protocol):
    """One end of a QKD link that yields key blocks.

    The master end asks for new blocks; the slave end asks for the same blocks by ID."""

    name: str

    async def connect(self) -> None:
        """Open the transport and read the device's limits; raises DriverError if it cannot."""

    async def close(self) -> None: ...

    async def fetch_new(self, max_bits: int) -> list[KeyBlock]:
        """Up to `max_bits` of fresh key (at least one block if any is available)."""

    async def fetch_by_ids(self, block_ids: list[str]) -> list[KeyBlock]:
        """The blocks with these IDs, in the same order; DeviceRejected (naming them) if the device
        lacks any of them, so the caller can ask one by one to find which. A driver that knows
        which raises BlocksUnavailable with their IDs, and the caller asks for the rest at once."""

    async def status(self) -> SourceStatus: ...


# ---------------------------------------------------------------- device health


class DeviceHealth:
    """A device's health as a small state machine the metrics show:
    `unknown` (never reached) -> `up` <-> `degraded` (a call failed) -> `down` (`down_after`
    failures in a row); any successful call returns it to `up`. `last_error` says why.

    A device that answers properly but refuses a request (DeviceRejected: out of its limits) is
    well: drivers call `ok()` for it. Timeouts, dropped connections, garbage and refused
    logins are failures."""

    STATES = ("unknown", "up", "degraded", "down")

    def __init__(self, down_after: int = 3, on_change: Callable[[str, str], None] | None = None):
        self.state = "unknown"
        self.last_error = ""
        self.failures = 0
        self.since = time.time()
        self.down_after = down_after
        self.on_change = on_change

    def ok(self) -> None:
        self.failures = 0
        self._go("up")

    def failed(self, error: BaseException | str) -> None:
        self.failures += 1
        self.last_error = str(error)[:300]
        self._go("down" if self.failures >= self.down_after else "degraded")

    def _go(self, state: str) -> None:
        if state != self.state:
            old, self.state, self.since = self.state, state, time.time()
            if self.on_change:
                self.on_change(old, state)


# ---------------------------------------------------------------- the ITU-T G.694.1 DWDM grid (100 GHz)


def itu_frequency_thz(channel: int) -> float:
    """Centre frequency of ITU channel `channel` on the 100 GHz grid (C34 = 193.4 THz)."""
    return round(190.0 + channel / 10, 4)


def itu_channel(frequency_thz: float, tolerance_ghz: float = 20.0) -> int | None:
    """The 100 GHz grid channel a frequency falls on, or None if it is off the grid."""
    n = round((frequency_thz - 190.0) * 10)
    return n if abs(itu_frequency_thz(n) - frequency_thz) * 1000 <= tolerance_ghz else None


def nm_to_thz(wavelength_nm: float) -> float:
    return 299_792.458 / wavelength_nm


# ---------------------------------------------------------------- optical gear


@runtime_checkable
class OpticalSwitch(Protocol):
    """An all-optical fibre switch: cross-connects from ingress to egress ports.

    Every change is confirmed by the device (operation complete) and by reading the map back;
    a change that would touch a port the config marks as carrying classical traffic is refused
    before anything is sent."""

    name: str
    health: DeviceHealth

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def size(self) -> tuple[int, int]:
        """(number of ingress ports, number of egress ports)."""

    async def cross_connects(self) -> dict[int, int]:
        """The current map, ingress port -> egress port."""

    async def connect_ports(self, pairs: dict[int, int]) -> None:
        """Add these cross-connects, keeping all others. A port already connected elsewhere is
        moved (its old partner loses its path), so the classical-port check covers both ends."""

    async def disconnect_ports(self, ingress: list[int]) -> None:
        """Remove the cross-connects of these ingress ports."""

    async def replace_map(self, pairs: dict[int, int]) -> None:
        """Make the map exactly `pairs` (touching only ports that change)."""

    async def port_powers(self) -> dict[int, float]:
        """Optical power in dBm at ports with a power monitor."""


@dataclass(frozen=True)
class Trace:
    """One sweep of a spectrum analyser: wavelengths in nm and powers in dBm, same length."""

    wavelengths_nm: tuple[float, ...]
    powers_dbm: tuple[float, ...]


@dataclass(frozen=True)
class WdmChannel:
    """One channel found by WDM analysis, placed on the ITU grid (None if off the grid)."""

    itu_channel: int | None
    centre_nm: float
    power_dbm: float
    osnr_db: float | None

    @property
    def frequency_thz(self) -> float:
        return nm_to_thz(self.centre_nm)


@runtime_checkable
class SpectrumAnalyser(Protocol):
    name: str
    health: DeviceHealth

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def sweep(self, start_nm: float, stop_nm: float, timeout: float | None = None) -> Trace:
        """A single sweep, waiting for completion up to `timeout` seconds (None: the driver's
        configured sweep timeout)."""

    async def channels(self) -> list[WdmChannel]:
        """WDM analysis of the last sweep."""


# ---------------------------------------------------------------- link telemetry and CV-QKD modules


def quantum_band_power(trace: Trace, itu_channels: Iterable[int], half_width_ghz: float, *,
                       resolution_nm: float | None = None) -> dict[int, float]:
    """Power (dBm) the trace shows inside each quantum channel's band, the ITU channel's centre
    +- `half_width_ghz`. Without `resolution_nm`: the highest level in the band (a carrier that
    leaked in shows at its own power). With the resolution bandwidth the sweep used: the power
    integrated over the band (each sample holds the power in one resolution bandwidth), which
    also catches broadband ASE. Wavelengths must ascend, as in every sweep. ValueError if a band
    holds no sample of the trace."""
    if not _finite(half_width_ghz) or half_width_ghz <= 0:
        raise ValueError(f"half_width_ghz must be a positive number, found {half_width_ghz!r}")
    if resolution_nm is not None and (not _finite(resolution_nm) or resolution_nm <= 0):
        raise ValueError(f"resolution_nm must be a positive number, found {resolution_nm!r}")
    xs, ys = trace.wavelengths_nm, trace.powers_dbm
    out: dict[int, float] = {}
    for ch in itu_channels:
        f0 = itu_frequency_thz(ch)
        lo_nm, hi_nm = nm_to_thz(f0 + half_width_ghz / 1000), nm_to_thz(f0 - half_width_ghz / 1000)
        i, j = bisect.bisect_left(xs, lo_nm), bisect.bisect_right(xs, hi_nm)
        if i >= j:
            span = f"{xs[0]:.3f}-{xs[-1]:.3f} nm" if xs else "an empty trace"
            raise ValueError(f"ITU channel {ch} +- {half_width_ghz:g} GHz ({lo_nm:.3f}-{hi_nm:.3f} nm) holds no "
                             f"sample of the trace ({span})")
        if resolution_nm is None:
            out[ch] = max(ys[i:j])
            continue
        total_mw = 0.0
        for k in range(i, j):
            left = xs[k] - xs[k - 1] if k > 0 else xs[k + 1] - xs[k] if k + 1 < len(xs) else resolution_nm
            right = xs[k + 1] - xs[k] if k + 1 < len(xs) else left
            total_mw += 10 ** (ys[k] / 10) * ((left + right) / 2) / resolution_nm
        out[ch] = 10 * math.log10(total_mw) if total_mw > 0 else -math.inf
    return out


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LinkTelemetry:
    """What a QKD module says about its link; None where the device does not report it."""

    state: str                              # e.g. "running", "stopped", "calibrating", "no-key"
    qber: float | None = None               # DV: fraction, 0.01 = 1 %
    excess_noise: float | None = None       # CV: shot-noise units
    snr: float | None = None                # CV: linear
    channel_loss_db: float | None = None
    secret_key_rate_bps: float | None = None


@runtime_checkable
class TelemetrySource(Protocol):
    async def telemetry(self) -> LinkTelemetry: ...


@runtime_checkable
class CvQkdModule(KeySource, TelemetrySource, Protocol):
    """A CV-QKD transmitter or receiver: controlled by the node, delivering reconciled blocks
    (with their leakage) that privacy amplification turns into link key."""

    health: DeviceHealth

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def tune(self, itu_channel: int) -> None:
        """Tune the laser to a channel of the 100 GHz DWDM grid."""

    async def set_modulation(self, photons_per_symbol: float) -> None: ...


def driver_settings(settings: dict[str, Any], *, file, key: str, known: set[str],
                    defaults: dict[str, Any]) -> tuple[dict[str, Any], Callable[..., ConfigError]]:
    """The first step of every driver's `check_settings`: refuse setting names the driver does
    not know (without echoing their values: they could be misplaced secrets), merge the rest
    over the driver's defaults, and give an `err(name, expected, found=None, missing=False)`
    that builds a ConfigError naming `key.name`."""
    for name in settings:
        if name not in known:
            raise ConfigError(file, f"{key}.{name}", f"one of {', '.join(sorted(known))}",
                              shown="a setting this driver does not know (its value is not shown)")

    def err(name: str, expected: str, found: object = None, missing: bool = False) -> ConfigError:
        return ConfigError(file, f"{key}.{name}", expected, found, missing=missing)

    return {**defaults, **settings}, err


def driver_class(name: str, *, file, key: str) -> type:
    """The driver class registered under `name` (key sources, optical switches, spectrum
    analysers and CV-QKD modules share one registry). A driver class has two class methods:
    `check_settings(settings, file=, key=)`, which validates its settings without touching any
    file or device, and `from_settings(settings, file=, key=)`, which builds the driver."""
    found = {ep.name: ep for ep in entry_points(group=DRIVER_GROUP)}
    if name not in found:
        raise ConfigError(file, key, f"a driver registered in {DRIVER_GROUP} ({', '.join(sorted(found)) or 'none'})",
                          name)
    return found[name].load()


def load_driver(name: str, settings: dict[str, Any], *, file, key: str) -> Any:
    """Instantiate the driver registered under `name` with its settings from the config."""
    return driver_class(name, file=file, key=key).from_settings(settings, file=file, key=_settings_key(key))


def check_driver(name: str, settings: dict[str, Any], *, file, key: str) -> None:
    driver_class(name, file=file, key=key).check_settings(settings, file=file, key=_settings_key(key))


def _settings_key(driver_key: str) -> str:
    return driver_key.rsplit(".", 1)[0] + ".settings"
