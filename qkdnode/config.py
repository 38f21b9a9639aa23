"""One TOML file per node, read into typed, frozen objects.

Every error names the file, the dotted key, what was expected and what was found. Unknown
keys are errors too: a typo in a node's config must not silently fall back to a default.
Relative paths are taken relative to the config file's folder.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdnode.errors import ConfigError
from qkdnode.limits import SaeLimit

ROLES = ("master", "slave")


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class VaultConfig:
    path: Path
    master_key_file: Path | None
    master_key_credential: str | None
    audit_retention_days: float = 365.0  # 0 keeps the audit forever
    key_ttl_hours: float = 168.0         # keys no slave fetched are deleted after this; 0 keeps them


@dataclass(frozen=True)
class KeyLimits:
    """What the northbound ETSI 014 API offers its SAEs (reported by `status`)."""

    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_per_request: int
    max_SAE_ID_count: int


@dataclass(frozen=True)
class LimitsConfig:
    """Per-SAE request rates and key-bit quotas (qkdnode/limits.py): `default` for every SAE,
    `saes` for the SAEs named under [limits.saes]."""

    default: SaeLimit = SaeLimit()
    saes: dict[str, SaeLimit] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerConfig:
    node_id: str
    url: str
    server_hostname: str | None


@dataclass(frozen=True)
class LinkConfig:
    id: str
    peer: str
    role: str  # "master": pulls new key from its KME and allocates hand-outs; "slave": follows
    driver: str
    pool_target_bits: int
    fetch_interval: float
    settings: dict[str, Any] = field(hash=False)

    @property
    def is_master(self) -> bool:
        return self.role == "master"


DEVICE_KINDS = ("switch", "osa", "telemetry", "cvqkd")
CV_ROLES = ("transmitter", "receiver")


@dataclass(frozen=True)
class DeviceConfig:
    """Optical gear and telemetry sources of the node beside its links' key sources.

    switch: `cross_connects` is the map this node keeps on the switch (set at start, kept when a
    device comes back; other cross-connects are left alone). osa: swept every `poll_interval`
    over `sweep_nm`; `quantum_channels` are ITU channels that must stay dark of classical light
    (`quantum_alarm_dbm`). telemetry: figures of link `link` (QBER, key rate) from another
    device than its key source (SNMP for the IDQ profile). cvqkd: a spare CV-QKD module, idle until
    the SDN agent makes a switched link with it (docs/sdn.md); its fibre is attached to port
    `switch_port` of switch `switch`, and `max_loss_db` is the channel loss it can make key through.
    A switch's `insertion_loss_db` is what one pass through it costs (the SDN agent's loss budget)."""

    id: str
    kind: str
    driver: str
    poll_interval: float
    settings: dict[str, Any] = field(hash=False)
    cross_connects: dict[int, int] = field(default_factory=dict, hash=False)
    quantum_channels: tuple[int, ...] = ()
    quantum_alarm_dbm: float = -50.0
    sweep_nm: tuple[float, float] = (1528.0, 1568.0)
    link: str | None = None
    insertion_loss_db: float = 1.0
    switch: str | None = None
    switch_port: int | None = None
    max_loss_db: float = 23.0

    @property
    def role(self) -> str | None:
        """A CV-QKD module's role, as its driver settings say."""
        return self.settings.get("role") if self.kind == "cvqkd" else None


@dataclass(frozen=True)
class FibreConfig:
    """A dark fibre from a port of this node's switch to a port of another node's switch."""

    switch: str
    port: int
    node: str
    remote_port: int
    loss_db: float


@dataclass(frozen=True)
class SdnConfig:
    """The SDN agent (docs/sdn.md): the ETSI GS QKD 015 node model for the controller whose
    certificate commonName is `controller`, and switched CV-QKD links on its request."""

    listen: Listen
    controller: str
    channels: tuple[int, ...] = (34, 37, 38)   # DWDM channels switched quantum links may use
    pool_target_bits: int = 1 << 20            # for the pools of switched links
    fetch_interval: float = 1.0
    fibres: tuple[FibreConfig, ...] = ()


@dataclass(frozen=True)
class NodeConfig:
    file: Path
    node_id: str
    api: Listen
    peer_listen: Listen
    metrics: Listen | None
    tls: TlsConfig
    vault: VaultConfig
    keys: KeyLimits
    peers: dict[str, PeerConfig]
    links: tuple[LinkConfig, ...]
    saes: dict[str, str]  # SAE ID -> node ID (any node of the network; others are reached by relay)
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node -> static path, next hop first
    devices: tuple[DeviceConfig, ...] = ()
    etsi004: Listen | None = None  # ETSI GS QKD 004 key streams for SAEs (docs/apis.md); None: not served
    skip: Listen | None = None     # SKIP for routers (docs/apis.md); None: not served
    sdn: SdnConfig | None = None   # the SDN agent (docs/sdn.md); None: not served
    limits: LimitsConfig = LimitsConfig()  # per-SAE request rates and key-bit quotas; default: none

    def link_to(self, node_id: str) -> LinkConfig | None:
        for link in self.links:
            if link.peer == node_id:
                return link
        return None


class _Table:
    """Typed access to one TOML table, remembering its dotted name for error messages."""

    def __init__(self, file: Path, name: str, data: Any):
        self.file, self.name = file, name
        if not isinstance(data, dict):
            raise ConfigError(file, name or "(top level)", "a table", data)
        self.data = data
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str, expected: str, found: object = None, missing: bool = False) -> ConfigError:
        return ConfigError(self.file, self._key(key), expected, found, missing=missing)

    def get(self, key: str, expected: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self.error(key, expected, missing=True)
            return default
        value = self.data[key]
        # TOML booleans are ints to Python; an operator who wrote `true` meant no number.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.error(key, expected, value)
        return value

    def string(self, key: str, default: Any = ...) -> str:
        value = self.get(key, "a non-empty string", str, default)
        if value is not None and value == "":
            raise self.error(key, "a non-empty string", value)
        return value

    def integer(self, key: str, lo: int, hi: int, default: Any = ...) -> int:
        expected = f"an integer from {lo} to {hi}"
        value = self.get(key, expected, int, default)
        if not lo <= value <= hi:
            raise self.error(key, expected, value)
        return value

    def number(self, key: str, lo: float, hi: float, default: Any = ...) -> float:
        expected = f"a number from {lo} to {hi}"
        value = self.get(key, expected, (int, float), default)
        if not lo <= value <= hi:
            raise self.error(key, expected, value)
        return float(value)

    def path(self, key: str, default: Any = ...) -> Path | None:
        value = self.string(key, default)
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() else (self.file.parent / p).resolve()

    def listen(self, key: str, default: Any = ...) -> Listen | None:
        expected = 'an address "HOST:PORT" with a port from 1 to 65535'
        value = self.get(key, expected, str, default)
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise self.error(key, expected, value)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise self.error(key, expected + " (HOST an IP address or localhost)", value) from None
        return Listen(host, int(port))

    def table(self, key: str, default: Any = ...) -> "_Table":
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self.error(key, "a table", missing=True)
            return _Table(self.file, self._key(key), default)
        return _Table(self.file, self._key(key), self.data[key])

    def finish(self) -> None:
        """Refuse keys nobody read: they are typos or options of another version."""
        for key in self.data:
            if key not in self.used:
                raise ConfigError(self.file, self._key(key), "no such key here (check the spelling)",
                                  shown="a key this version does not know (its value is not shown)")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _is_ident(value: str) -> bool:
    return bool(value) and value not in (".", "..") and all(c.isalnum() or c in "-_." for c in value)


def _ident(t: _Table, key: str) -> str:
    value = t.string(key)
    if not _is_ident(value):
        raise t.error(key, "an identifier of letters, digits, '-', '_' or '.'", value)
    return value


def load(path: str | Path) -> NodeConfig:
    file = Path(path).resolve()
    try:
        text = file.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is fine
    except OSError as exc:
        raise ConfigError(file, "(file)", "a readable TOML file", exc.strerror) from None
    except UnicodeDecodeError as exc:  # a ValueError: would escape the CLI as a traceback
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(file, "(file)", "UTF-8 text", f"byte 0x{exc.object[exc.start]:02x} on line {line}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", "valid TOML", str(exc)) from None
    return parse(file, data)


def parse(file: Path, data: dict[str, Any]) -> NodeConfig:
    top = _Table(file, "", data)
    node_id = _ident(top, "node_id")

    api = top.table("api")
    api_listen = api.listen("listen")
    api.finish()

    peer_t = top.table("peer")
    peer_listen = peer_t.listen("listen")
    peer_t.finish()

    metrics_t = top.table("metrics", {})
    metrics = metrics_t.listen("listen", None)
    metrics_t.finish()

    etsi004_t = top.table("etsi004", {})
    etsi004 = etsi004_t.listen("listen", None)
    etsi004_t.finish()

    skip_t = top.table("skip", {})
    skip = skip_t.listen("listen", None)
    skip_t.finish()

    tls_t = top.table("tls")
    tls = TlsConfig(tls_t.path("ca"), tls_t.path("cert"), tls_t.path("key"))
    tls_t.finish()

    vault_t = top.table("vault")
    vault = VaultConfig(
        path=vault_t.path("path"),
        master_key_file=vault_t.path("master_key_file", None),
        master_key_credential=vault_t.string("master_key_credential", None),
        audit_retention_days=vault_t.number("audit_retention_days", 0, 100 * 365, 365.0),
        key_ttl_hours=vault_t.number("key_ttl_hours", 0, 100 * 365 * 24, 168.0),
    )
    if vault.master_key_credential is not None and not _is_ident(vault.master_key_credential):
        raise vault_t.error("master_key_credential", "the name of a systemd credential (no '/')",
                            vault.master_key_credential)
    if (vault.master_key_file is None) == (vault.master_key_credential is None):
        raise vault_t.error(
            "master_key_file",
            "exactly one of master_key_file or master_key_credential (the master key never sits in the config)",
            "both" if vault.master_key_file else None,
            missing=vault.master_key_file is None,
        )
    vault_t.finish()

    keys_t = top.table("keys", {})
    keys = KeyLimits(
        key_size=keys_t.integer("key_size", 8, 1 << 20, 256),
        min_key_size=keys_t.integer("min_key_size", 8, 1 << 20, 64),
        max_key_size=keys_t.integer("max_key_size", 8, 1 << 20, 8192),
        max_key_per_request=keys_t.integer("max_key_per_request", 1, 100_000, 128),
        max_SAE_ID_count=keys_t.integer("max_SAE_ID_count", 0, 1000, 8),
    )
    for name in ("key_size", "min_key_size", "max_key_size"):
        if getattr(keys, name) % 8:
            raise keys_t.error(name, "a multiple of 8 bits", getattr(keys, name))
    if not keys.min_key_size <= keys.key_size <= keys.max_key_size:
        raise keys_t.error("key_size", f"between min_key_size ({keys.min_key_size}) and max_key_size "
                           f"({keys.max_key_size})", keys.key_size)
    keys_t.finish()

    peers_t = top.table("peers", {})
    peers: dict[str, PeerConfig] = {}
    for peer_id in list(peers_t.data):
        p = peers_t.table(peer_id)
        url = p.string("url")
        if not url.startswith("https://"):
            raise p.error("url", "an https:// URL of the peer's channel", url)
        if not _is_ident(peer_id) or peer_id == node_id:
            raise peers_t.error(peer_id, f"a node ID other than this node's ({node_id}): letters, digits, "
                                "'-', '_' or '.'", peer_id)
        peers[peer_id] = PeerConfig(peer_id, url.rstrip("/"), p.string("server_hostname", None))
        p.finish()
    peers_t.finish()

    links_raw = top.get("links", "an array of [[links]] tables", list, [])
    links: list[LinkConfig] = []
    for i, raw in enumerate(links_raw):
        t = _Table(file, f"links[{i}]", raw)
        link = LinkConfig(
            id=_ident(t, "id"),
            peer=t.string("peer"),
            role=t.string("role"),
            driver=t.string("driver"),
            pool_target_bits=t.integer("pool_target_bits", 8, 1 << 40, 1 << 20),
            fetch_interval=t.number("fetch_interval", 0.01, 3600, 1.0),
            settings=t.get("settings", "a table of driver settings", dict, {}),
        )
        if link.role not in ROLES:
            raise t.error("role", 'one of "master" or "slave"', link.role)
        if link.peer not in peers:
            raise t.error("peer", f"a node listed under [peers] ({', '.join(sorted(peers)) or 'none listed'})",
                          link.peer)
        if any(other.id == link.id for other in links):
            raise t.error("id", "an id no other link has", link.id)
        if any(other.peer == link.peer for other in links):
            raise t.error("peer", "one link per peer node (two devices on one span: the `combined` driver)",
                          link.peer)
        # Relative paths in driver settings follow the same rule as everywhere else.
        settings = dict(link.settings)
        for k, v in settings.items():
            if k in ("ca", "cert", "key") and isinstance(v, str) and not Path(v).is_absolute():
                settings[k] = str((file.parent / v).resolve())
        object.__setattr__(link, "settings", settings)
        t.used.add("settings")
        t.finish()
        links.append(link)

    devices = _devices(file, top.get("devices", "an array of [[devices]] tables", list, []), links)
    sdn = _sdn(top.table("sdn", None), devices, peers, node_id) if "sdn" in top.data else None
    top.used.add("sdn")

    saes_t = top.table("saes", {})
    saes: dict[str, str] = {}
    for sae_id in list(saes_t.data):
        if not _is_ident(sae_id):
            raise saes_t.error(sae_id, "an SAE ID of letters, digits, '-', '_' or '.' (it appears in URL paths)",
                               sae_id)
        if sae_id == node_id or sae_id in peers:
            # Identities are certificate commonNames under one CA: an SAE named like a node could
            # speak for that node on the peer channel.
            raise saes_t.error(sae_id, "an SAE ID that is not also a node ID", sae_id)
        saes[sae_id] = _ident(saes_t, sae_id)
    saes_t.finish()
    if sdn is not None and (sdn.controller in saes or sdn.controller == node_id or sdn.controller in peers):
        # The controller's identity is a commonName under the same CA: it must not be an SAE's or a node's.
        raise ConfigError(file, "sdn.controller", "a certificate commonName that is no SAE's and no node's",
                          sdn.controller)

    routes_t = top.table("routes", {})
    routes: dict[str, tuple[str, ...]] = {}
    link_peers = {link.peer for link in links}
    for dest in list(routes_t.data):
        expected = (f"a path to node {dest}: an array of node IDs, the next hop first (a node this node has a "
                    f"link to: {', '.join(sorted(link_peers)) or 'none'}) and {dest} last, no node twice")
        path = routes_t.get(dest, expected, list)
        if not (path and all(isinstance(n, str) and _is_ident(n) for n in path) and path[0] in link_peers
                and path[-1] == dest and len(set(path)) == len(path) and node_id not in path):
            raise routes_t.error(dest, expected, path)
        routes[dest] = tuple(path)
    routes_t.finish()

    limits = _limits(top.table("limits", {}), saes, node_id)
    top.finish()

    return NodeConfig(
        file=file,
        node_id=node_id,
        api=api_listen,
        peer_listen=peer_listen,
        metrics=metrics,
        tls=tls,
        vault=vault,
        keys=keys,
        peers=peers,
        links=tuple(links),
        saes=saes,
        routes=routes,
        etsi004=etsi004,
        skip=skip,
        devices=devices,
        sdn=sdn,
        limits=limits,
    )


def _devices(file: Path, raw: list, links: list[LinkConfig]) -> tuple[DeviceConfig, ...]:
    out: list[DeviceConfig] = []
    for i, item in enumerate(raw):
        t = _Table(file, f"devices[{i}]", item)
        dev_id, kind = _ident(t, "id"), t.string("kind")
        if kind not in DEVICE_KINDS:
            raise t.error("kind", f"one of {', '.join(DEVICE_KINDS)}", kind)
        if any(d.id == dev_id for d in out) or any(link.id == dev_id for link in links):
            raise t.error("id", "an id no other device or link has", dev_id)
        settings = dict(t.get("settings", "a table of driver settings", dict, {}))
        for k, v in settings.items():
            if k in ("ca", "cert", "key") and isinstance(v, str) and not Path(v).is_absolute():
                settings[k] = str((file.parent / v).resolve())
        kw: dict[str, Any] = {}
        if kind == "switch":
            kw["insertion_loss_db"] = t.number("insertion_loss_db", 0, 30, 1.0)
            raw_map = t.get("cross_connects", 'a table of ingress = egress ports, e.g. { "1" = 17 }', dict, {})
            pairs: dict[int, int] = {}
            for k, v in raw_map.items():
                if not (k.isdigit() and isinstance(v, int) and not isinstance(v, bool) and int(k) > 0 and v > 0):
                    raise t.error("cross_connects", 'ingress = egress port numbers, e.g. { "1" = 17 }', {k: v})
                pairs[int(k)] = v
            if len(set(pairs.values())) != len(pairs):
                raise t.error("cross_connects", "each egress port used once", raw_map)
            kw["cross_connects"] = pairs
        elif kind == "osa":
            chans = t.get("quantum_channels", "an array of ITU channel numbers", list, [])
            if not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 100 for c in chans):
                raise t.error("quantum_channels", "an array of ITU channel numbers from 1 to 100", chans)
            kw["quantum_channels"] = tuple(chans)
            kw["quantum_alarm_dbm"] = t.number("quantum_alarm_dbm", -200, 50, -50.0)
            span = t.get("sweep_nm", "[start, stop] wavelengths in nm", list, [1528.0, 1568.0])
            if not (len(span) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in span)
                    and 1200 <= span[0] < span[1] <= 1700):
                raise t.error("sweep_nm", "[start, stop] wavelengths in nm, 1200 <= start < stop <= 1700", span)
            kw["sweep_nm"] = (float(span[0]), float(span[1]))
        elif kind == "cvqkd":
            if settings.get("role") not in CV_ROLES:
                raise t.error("settings", 'driver settings with role = "transmitter" or "receiver"',
                              settings.get("role"), missing="role" not in settings)
            sw = _ident(t, "switch")
            switch = next((d for d in out if d.id == sw and d.kind == "switch"), None)
            if switch is None:
                raise t.error("switch", "the id of a [[devices]] switch listed before this module "
                              f"({', '.join(d.id for d in out if d.kind == 'switch') or 'none listed'})", sw)
            kw["switch"] = sw
            kw["switch_port"] = t.integer("switch_port", 1, 100_000)
            kw["max_loss_db"] = t.number("max_loss_db", 0, 100, 23.0)
            classical = switch.settings.get("classical_ports", [])
            if isinstance(classical, list) and kw["switch_port"] in classical:
                raise t.error("switch_port", f"a port of {sw} that carries no classical traffic "
                              f"(classical_ports {classical})", kw["switch_port"])
            if kw["switch_port"] in _ports_in_use(out, sw):
                raise t.error("switch_port", f"a port of {sw} no other module or cross-connect uses",
                              kw["switch_port"])
        else:
            link = t.string("link")
            if not any(lk.id == link for lk in links):
                raise t.error("link", f"the id of one of this node's links ({', '.join(lk.id for lk in links)})",
                              link)
            kw["link"] = link
        dev = DeviceConfig(id=dev_id, kind=kind, driver=t.string("driver"),
                           poll_interval=t.number("poll_interval", 0.1, 3600, 5.0), settings=settings, **kw)
        t.used.add("settings")
        t.finish()
        out.append(dev)
    return tuple(out)


def _ports_in_use(devices: list[DeviceConfig], switch: str) -> set[int]:
    """Ports of a switch already taken by its configured cross-connects or by spare modules."""
    used: set[int] = set()
    for d in devices:
        if d.id == switch:
            used |= set(d.cross_connects) | set(d.cross_connects.values())
        elif d.kind == "cvqkd" and d.switch == switch and d.switch_port is not None:
            used.add(d.switch_port)
    return used


def _sdn(t: _Table, devices: tuple[DeviceConfig, ...], peers: dict[str, PeerConfig], node_id: str) -> SdnConfig:
    listen = t.listen("listen")
    controller = t.string("controller")
    chans = t.get("channels", "an array of ITU channel numbers (100 GHz grid, C band: 17 to 61)", list, [34, 37, 38])
    if not chans or len(set(chans)) != len(chans) or \
            not all(isinstance(c, int) and not isinstance(c, bool) and 17 <= c <= 61 for c in chans):
        raise t.error("channels", "a non-empty array of distinct ITU channel numbers from 17 to 61", chans)
    fibres: list[FibreConfig] = []
    switches = {d.id: d for d in devices if d.kind == "switch"}
    for i, raw in enumerate(t.get("fibres", "an array of [[sdn.fibres]] tables", list, [])):
        f = _Table(t.file, f"sdn.fibres[{i}]", raw)
        sw = f.string("switch")
        if sw not in switches:
            raise f.error("switch", f"the id of a [[devices]] switch ({', '.join(switches) or 'none listed'})", sw)
        fibre = FibreConfig(switch=sw, port=f.integer("port", 1, 100_000), node=f.string("node"),
                            remote_port=f.integer("remote_port", 1, 100_000), loss_db=f.number("loss_db", 0, 100))
        if fibre.node not in peers:
            raise f.error("node", f"a node listed under [peers] ({', '.join(sorted(peers)) or 'none listed'})",
                          fibre.node)
        classical = switches[sw].settings.get("classical_ports", [])
        if isinstance(classical, list) and fibre.port in classical:
            raise f.error("port", f"a port of {sw} that carries no classical traffic (classical_ports {classical})",
                          fibre.port)
        if fibre.port in _ports_in_use(list(devices), sw) or \
                any(o.switch == sw and o.port == fibre.port for o in fibres):
            raise f.error("port", f"a port of {sw} no module, cross-connect or other fibre uses", fibre.port)
        f.finish()
        fibres.append(fibre)
    cfg = SdnConfig(listen=listen, controller=controller, channels=tuple(chans),
                    pool_target_bits=t.integer("pool_target_bits", 8, 1 << 40, 1 << 20),
                    fetch_interval=t.number("fetch_interval", 0.01, 3600, 1.0), fibres=tuple(fibres))
    t.finish()
    return cfg


def _sae_limit(t: _Table, base: SaeLimit) -> SaeLimit:
    return SaeLimit(
        requests_per_second=t.number("requests_per_second", 0, 1e6, base.requests_per_second),
        burst=t.integer("burst", 1, 1_000_000, base.burst),
        key_bits_per_day=t.integer("key_bits_per_day", 0, 1 << 62, base.key_bits_per_day),
    )


def _limits(t: _Table, saes: dict[str, str], node_id: str) -> LimitsConfig:
    """[limits]: defaults for every SAE; [limits.saes.ID]: one SAE of this node, the keys it
    leaves out taken from [limits]."""
    default = _sae_limit(t, SaeLimit())
    per_t = t.table("saes", {})
    per: dict[str, SaeLimit] = {}
    for sae in list(per_t.data):
        if saes.get(sae) != node_id:
            raise per_t.error(sae, f"an SAE attached to this node ({node_id}) in [saes]", sae)
        one = per_t.table(sae)
        per[sae] = _sae_limit(one, default)
        one.finish()
    per_t.finish()
    t.finish()
    return LimitsConfig(default, per)


class ConfigInForce:
    """The config of `holder` (a node) as it is when it is read: a SIGHUP may replace holder.cfg,
    so the API apps read through this rather than keep the config they were built with."""

    def __init__(self, holder: Any):
        self._holder = holder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._holder.cfg, name)
