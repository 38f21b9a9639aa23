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
    etsi004: Listen | None = None  # ETSI GS QKD 004 key streams for SAEs (docs/apis.md); None: not served
    skip: Listen | None = None     # SKIP for routers (docs/apis.md); None: not served
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
        limits=limits,
    )


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
