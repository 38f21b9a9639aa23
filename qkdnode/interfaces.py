"""Southbound driver interfaces and the driver registry.

A driver knows its device and its transport, nothing of the vault or the HTTP servers. The
node finds a driver class by name in the entry-point group `qkdnode.drivers`, so a vendor
can ship one as a package of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from qkdnode.errors import ConfigError

DRIVER_GROUP = "qkdnode.drivers"


@dataclass
class KeyBlock:
    """A piece of link key as the device delivered it, with the ID both ends of the link know.

    `bits` is a bytearray so the holder can zero it once stored; it never appears in a repr."""

    block_id: str
    bits: bytearray = field(repr=False)

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
        """The blocks with these IDs, in the same order; DeviceRejected if the device has none of them."""

    async def status(self) -> SourceStatus: ...


def driver_class(name: str, *, file, key: str) -> type:
    """The driver class registered under `name`. A driver class has two class methods:
    `check_settings(settings, file=, key=)`, which validates its settings without touching any
    file or device, and `from_settings(settings, file=, key=)`, which builds the KeySource."""
    found = {ep.name: ep for ep in entry_points(group=DRIVER_GROUP)}
    if name not in found:
        raise ConfigError(file, key, f"a driver registered in {DRIVER_GROUP} ({', '.join(sorted(found)) or 'none'})",
                          name)
    return found[name].load()


def load_driver(name: str, settings: dict[str, Any], *, file, key: str) -> KeySource:
    """Instantiate the driver registered under `name` with its settings from the config."""
    return driver_class(name, file=file, key=key).from_settings(settings, file=file, key=_settings_key(key))


def check_driver(name: str, settings: dict[str, Any], *, file, key: str) -> None:
    driver_class(name, file=file, key=key).check_settings(settings, file=file, key=_settings_key(key))


def _settings_key(driver_key: str) -> str:
    return driver_key.rsplit(".", 1)[0] + ".settings"
