"""The SDN agent: the node as the SDN controller sees it (ETSI GS QKD 015, YANG module
`etsi-qkd-sdn-node`), and switched CV-QKD links made on the controller's request (docs/sdn.md).

The controller reaches the agent over HTTPS with mutual TLS; its certificate's commonName must
be `[sdn] controller` (any other client is refused with 403). RESTCONF-style JSON:

    GET    /restconf/data/etsi-qkd-sdn-node:qkd_node                        the node model
    GET    /restconf/data/etsi-qkd-sdn-node:qkd_node/qkd_links/qkd_link=ID  one link
    POST   /restconf/data/etsi-qkd-sdn-node:qkd_node/qkd_links              create a switched link
    DELETE /restconf/data/etsi-qkd-sdn-node:qkd_node/qkd_links/qkd_link=ID  delete it
    GET    /restconf/streams/etsi-qkd-sdn-node/json                         notifications (server-sent events)

A switched link joins a spare CV-QKD module of this node (`[[devices]] kind = "cvqkd"`) to one of
the remote node's, through both nodes' optical switches and a dark fibre between them
(`[[sdn.fibres]]`). The node that receives the request coordinates; the other takes part over
the peer channel (node-level verbs `sdn-plan`, `sdn-apply`, `sdn-release`). Set-up is all or
nothing: every check (ports free and away from classical traffic, the loss budget, a free DWDM
channel at both nodes) is made on maps read back from the switches before anything changes; the
remote end applies first, then this end; a failure at any step takes back every step already
made, at both ends. Deletion takes back the same steps in reverse and restores both switch maps.

Never any key material here: the model and the notifications carry names, counts, rates and
states only (architecture §4, invariant 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import re
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aiohttp import web

from qkdnode import __version__
from qkdnode.config import DeviceConfig, FibreConfig, LinkConfig
from qkdnode.errors import DriverError, PeerRejected, PeerUnavailable, QkdnodeError, SdnRefused
from qkdnode.interfaces import DeviceHealth
from qkdnode.peer import BadMessage
from qkdnode.tlsutil import peer_identity

if TYPE_CHECKING:
    from qkdnode.links import LinkPool
    from qkdnode.node import Node

log = logging.getLogger("qkdnode.sdn")

MODULE = "etsi-qkd-sdn-node"
T = "etsi-qkdn-types:"                     # prefix of the identities of module etsi-qkd-node-types
EXT = "qkdnode:"                           # our own leaves beside the standard ones (docs/sdn.md)
NODE_PATH = f"/restconf/data/{MODULE}:qkd_node"
STREAM_PATH = f"/restconf/streams/{MODULE}/json"
YANG_JSON = "application/yang-data+json"
# qkdn_id, and the qkdl_id of configured links, are UUIDs (as the model's types say) derived from
# the names in the config: the same at every node, stable across restarts.
NAMESPACE = uuid.UUID("5c0a6f0e-52b2-4c4b-9d83-7b1f3a3c8e15")
WATCH_INTERVAL = 0.5                       # s between looks for changes to notify
CONSUMPTION_WINDOW = 60.0                  # s over which a link's key consumption rate is measured
EVENT_BACKLOG = 256                        # notifications kept for a client that reconnects (Last-Event-ID)
REMOTE_LOCK_WAIT = 5.0                     # s the other end waits for its own SDN lock before saying busy
STATE_FILE = "sdn-links.json"

_WAVELENGTH = re.compile(r"[1-9][0-9]{0,3}\Z")   # typedef wavelength: a WDM channel number


def node_uuid(node_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"node:{node_id}"))


def link_uuid(link_id: str) -> str:
    """A switched link's id is the controller's UUID; a configured link's is derived from its name."""
    try:
        if str(uuid.UUID(link_id)) == link_id:
            return link_id
    except ValueError:
        pass
    return str(uuid.uuid5(NAMESPACE, f"link:{link_id}"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _role_identity(role: str) -> str:
    return T + ("TRANSMITTER" if role == "transmitter" else "RECEIVER")


# ------------------------------------------------------------------ applications (SAE associations)


@dataclass
class Association:
    app_id: str
    master: str
    slaves: tuple[str, ...]
    remote_node: str
    created: str
    consumed_bits: int = 0
    since: str = ""


class Applications:
    """SAE associations this node has served since it started: a master SAE and its slave SAEs,
    whichever API (ETSI 014, 004, SKIP) they came through: all go through Node.hand_out and
    Node.deliver. Counts of bits only, never bits."""

    def __init__(self, node_id: str, saes: dict[str, str]):
        self.node_id, self.saes = node_id, saes
        self.apps: dict[tuple[str, tuple[str, ...]], Association] = {}

    def _seen(self, master: str, slaves: tuple[str, ...], remote: str, bits: int) -> None:
        key = (master, slaves)
        app = self.apps.get(key)
        if app is None:
            now = _now()
            app = self.apps[key] = Association(str(uuid.uuid5(NAMESPACE, "app:" + "|".join((master, *slaves)))),
                                               master, slaves, remote, now, since=now)
        app.consumed_bits += bits

    def handed_out(self, master: str, slaves: list[str], bits: int) -> None:
        remote = next((self.saes.get(s) for s in slaves if self.saes.get(s) != self.node_id), self.node_id)
        self._seen(master, tuple(sorted(slaves)), remote or "", bits)

    def delivered(self, slave: str, master: str, bits: int) -> None:
        self._seen(master, (slave,), self.saes.get(master, ""), bits)


# ------------------------------------------------------------------ notifications


class Subscriber:
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=1024)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)


class Notifier:
    """Server-sent events to the controller: one queue per open stream, a short backlog for a
    client that reconnects with Last-Event-ID. A client that does not read is dropped."""

    def __init__(self):
        self._ids = itertools.count(1)
        self.backlog: deque[tuple[int, str, dict]] = deque(maxlen=EVENT_BACKLOG)
        self.subscribers: set[Subscriber] = set()

    def publish(self, name: str, body: dict) -> None:
        event = (next(self._ids), name, {"ietf-restconf:notification": {
            "eventTime": _now(), f"{MODULE}:{name}": body}})
        self.backlog.append(event)
        for sub in list(self.subscribers):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:       # it does not read: end its stream, it may reconnect
                self.subscribers.discard(sub)
                sub.closed = True

    def subscribe(self, last_id: int | None) -> Subscriber:
        sub = Subscriber()
        if last_id is not None:
            for event in self.backlog:
                if event[0] > last_id:
                    sub.queue.put_nowait(event)
        self.subscribers.add(sub)
        return sub

    def close_all(self) -> None:
        for sub in list(self.subscribers):
            sub.close()
        self.subscribers.clear()


# ------------------------------------------------------------------ switched links


@dataclass
class SwitchedLink:
    """One end of a switched link, as this node made it (and keeps it across restarts)."""

    qkdl_id: str
    peer: str
    role: str               # this end's module: transmitter (the link's master end) or receiver
    device: str             # this end's spare module ([[devices]] kind cvqkd)
    qkdi_id: int
    remote_qkdi_id: int
    switch: str
    pairs: dict[int, int]   # the cross-connect(s) on this node's switch, ingress -> egress
    channel: int            # ITU channel, 100 GHz grid
    loss_db: float          # the whole path: both switches and the fibre
    created: str = ""
    filled: bool = False    # its pool has held its target once: the link is up

    def to_json(self) -> dict:
        return dict(asdict(self), pairs={str(i): e for i, e in self.pairs.items()})

    @classmethod
    def from_json(cls, d: dict) -> "SwitchedLink":
        return cls(**dict(d, pairs={int(i): int(e) for i, e in d["pairs"].items()}))


class _Borrowed:
    """A spare module lent to a link's pool: the pool may use it but not close it (the device
    stays the node's, idle again once the link is deleted)."""

    def __init__(self, driver: Any):
        self._driver = driver

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)

    async def close(self) -> None:
        pass


@dataclass
class _Candidate:
    """One way to make the link: a module and a fibre at each end, and what stands in its way."""

    local: dict
    remote: dict
    loss_db: float
    reason: str | None = None


class SdnAgent:
    def __init__(self, node: "Node"):
        self.node = node
        self.cfg = node.cfg.sdn
        self.me = node.cfg.node_id
        self.metrics = node.metrics
        self.applications = Applications(self.me, node.cfg.saes)
        self.notifier = Notifier()
        self.links: dict[str, SwitchedLink] = {}
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._state = node.cfg.vault.path.parent / STATE_FILE
        self._seen: dict[str, Any] = {}
        self._consumed: dict[str, deque[tuple[float, int]]] = {}
        # Interface numbers: the configured links' devices first, then the spare modules, in config order.
        self.qkdi = {f"link:{link.id}": i for i, link in enumerate(node.cfg.links, 1)}
        self.qkdi.update({d.id: len(node.cfg.links) + i
                          for i, d in enumerate((d for d in node.cfg.devices if d.kind == "cvqkd"), 1)})

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for record in self._load_state():
            try:
                await self._restore(record)
            except (QkdnodeError, KeyError, OSError) as exc:
                log.error("switched link %s (to node %s) could not be restored: %s", record.qkdl_id, record.peer, exc)
        self._seen = self._snapshot()
        self._tasks.append(asyncio.create_task(self._watch(), name="sdn notifications"))

    def close_streams(self) -> None:
        """End the controller's notification streams (before the listener stops: they never end by themselves)."""
        self.notifier.close_all()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def peer_calls(self) -> dict:
        return {"sdn-plan": self._on_plan, "sdn-apply": self._on_apply, "sdn-release": self._on_release}

    # ------------------------------------------------------------ the model

    def model(self) -> dict:
        return {f"{MODULE}:qkd_node": {
            "qkdn_id": node_uuid(self.me),
            "qkdn_version": f"qkdnode {__version__}",
            "qkdn_location_id": "",
            "qkdn_capabilities": {"link_stats_support": True, "application_stats_support": True,
                                  "key_relay_mode_enable": True},
            EXT + "node_id": self.me,
            "qkd_applications": {"qkd_app": self._applications()},
            "qkd_interfaces": {"qkd_interface": self._interfaces()},
            "qkd_links": {"qkd_link": self._links()},
        }}

    def _applications(self) -> list[dict]:
        out = []
        for app in self.applications.apps.values():
            pool = self.node.pool_to(app.remote_node)
            backing = [link_uuid(pool.cfg.id)] if pool else \
                ([self._virtual_id(app.remote_node)] if app.remote_node and app.remote_node != self.me else [])
            out.append({
                "app_id": app.app_id, "app_status": T + "ON", "app_type": T + "CLIENT",
                "server_app_id": app.master, "client_app_id": list(app.slaves),
                "local_qkdn_id": node_uuid(self.me), "remote_qkdn_id": node_uuid(app.remote_node),
                "backing_qkdl_id": backing, "creation_time": app.created,
                "app_statistics": {"statistics": [{"start_time": app.since, "end_time": _now(),
                                                   "consumed_bits": app.consumed_bits}]},
            })
        return out

    def _interfaces(self) -> list[dict]:
        out = []
        for link in self.node.cfg.links:
            pool = self.node.pools.get(link.id)
            entry = {"qkdi_id": self.qkdi[f"link:{link.id}"], "qkdi_model": link.driver,
                     "qkdi_type": T + ("CV-QKD" if link.driver == "cvqkd-serial" else "DV-QKD"),
                     "qkdi_status": self._iface_status(pool.source, pool.device_ok) if pool else T + "DOWN",
                     EXT + "link": link.id}
            if link.driver == "cvqkd-serial" and link.settings.get("role") in ("transmitter", "receiver"):
                entry["qkdi_capabilities"] = {"role_support": _role_identity(link.settings["role"])}
            out.append(entry)
        for d in self._modules():
            dev = self.node.devices.devices[d.id]
            used = next((s for s in self.links.values() if s.device == d.id), None)
            entry = {"qkdi_id": self.qkdi[d.id], "qkdi_model": self._model_name(dev.driver, d.driver),
                     "qkdi_type": T + "CV-QKD",
                     "qkdi_att_point": {"device": d.switch, "port": d.switch_port},
                     "qkdi_capabilities": {"role_support": _role_identity(d.role), "max_absorption": d.max_loss_db},
                     "qkdi_status": self._iface_status(dev.driver, dev.connected),
                     EXT + "device": d.id}
            if used:
                entry[EXT + "link"] = used.qkdl_id
            out.append(entry)
        return out

    @staticmethod
    def _model_name(driver: Any, name: str) -> str:
        ident = getattr(driver, "identity", None) or {}
        if ident.get("vendor") and ident.get("model"):
            return f"{ident['vendor'][:32]}/{ident['model'][:32]}"
        return name

    @staticmethod
    def _iface_status(driver: Any, connected: bool) -> str:
        health = getattr(driver, "health", None)
        state = health.state if isinstance(health, DeviceHealth) else ("up" if connected else "unknown")
        return T + ("UP" if state in ("up", "degraded") else "DOWN")

    def _links(self) -> list[dict]:
        out = [self._link_entry(pool) for pool in list(self.node.pools.values())]
        # Virtual links: every node with SAEs that no direct link joins us to is reached by key relay.
        direct = {p.cfg.peer for p in self.node.pools.values()}
        for dest in sorted(set(self.node.cfg.saes.values()) - direct - {self.me}):
            path = self.node.router.route(dest, 1)
            out.append({"qkdl_id": self._virtual_id(dest), "qkdl_type": T + "VIRT", "qkdl_enable": True,
                        "qkdl_status": T + ("ACTIVE" if path else "PASSIVE"),
                        "qkdl_local": {"qkdn_id": node_uuid(self.me)}, "qkdl_remote": {"qkdn_id": node_uuid(dest)},
                        "virt_next_hop": [node_uuid(path[1])] if path else [],
                        EXT + "path": list(path) if path else []})
        return out

    def _virtual_id(self, dest: str) -> str:
        return str(uuid.uuid5(NAMESPACE, "virt:" + "|".join(sorted((self.me, dest)))))

    def _link_entry(self, pool: "LinkPool") -> dict:
        link, sw = pool.cfg, self.links.get(pool.cfg.id)
        status = self._link_status(pool)
        m = self.metrics.registry
        qber = m.get_sample_value("qkdnode_link_qber_ratio", {"link": link.id})
        noise = m.get_sample_value("qkdnode_link_excess_noise_snu", {"link": link.id})
        skr = m.get_sample_value("qkdnode_link_secret_key_rate_bits_per_second", {"link": link.id})
        perf: dict[str, Any] = {"skr": int(skr) if skr is not None and math.isfinite(skr) else int(pool.ingest_bps),
                                "eskr": int(pool.ingest_bps), "expected_consumption": int(self._consumption(pool))}
        phys = []
        if qber is not None:
            phys.append({"perf_type": T + "QBER", "value": qber})
        if phys:
            perf["phys_perf"] = phys
        entry: dict[str, Any] = {
            "qkdl_id": link_uuid(link.id), "qkdl_type": T + "PHYS", "qkdl_enable": True, "qkdl_status": status,
            "qkdl_local": {"qkdn_id": node_uuid(self.me)},
            "qkdl_remote": {"qkdn_id": node_uuid(link.peer)},
            "qkdl_performance": perf,
            EXT + "link_id": link.id, EXT + "switched": sw is not None, EXT + "ready_bits": pool.ready_bits,
            EXT + "consumed_bits": pool.consumed_bits,
        }
        if noise is not None:
            entry[EXT + "excess_noise_snu"] = noise
        if sw is not None:
            entry["qkdl_local"]["qkdi_id"] = sw.qkdi_id
            entry["qkdl_remote"]["qkdi_id"] = sw.remote_qkdi_id
            entry.update({"phys_channel_att": round(sw.loss_db, 2), "phys_wavelength": str(sw.channel),
                          "phys_qkd_role": _role_identity(sw.role), EXT + "cross_connects":
                              {"switch": sw.switch, "pairs": {str(i): e for i, e in sw.pairs.items()}}})
        else:
            entry["qkdl_local"]["qkdi_id"] = self.qkdi[f"link:{link.id}"]
            if link.driver == "cvqkd-serial":
                if isinstance(link.settings.get("itu_channel"), int):
                    entry["phys_wavelength"] = str(link.settings["itu_channel"])
                if link.settings.get("role") in ("transmitter", "receiver"):
                    entry["phys_qkd_role"] = _role_identity(link.settings["role"])
        return entry

    def _link_status(self, pool: "LinkPool") -> str:
        sw = self.links.get(pool.cfg.id)
        if sw is not None and not sw.filled:
            return T + "PENDING"
        health = getattr(pool.source, "health", None)
        device_up = health.state in ("up", "degraded") if isinstance(health, DeviceHealth) else pool.device_ok
        peer_up = self.node.peers[pool.cfg.peer].up is not False
        return T + ("ACTIVE" if device_up and peer_up else "PASSIVE")

    def _consumption(self, pool: "LinkPool") -> float:
        """Bits per second cut from the link's pool over the last minute."""
        now = time.monotonic()
        samples = self._consumed.setdefault(pool.cfg.id, deque())
        samples.append((now, pool.consumed_bits))
        while len(samples) > 2 and now - samples[1][0] > CONSUMPTION_WINDOW:
            samples.popleft()
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 - t0 >= 1.0 else 0.0

    def _modules(self) -> list[DeviceConfig]:
        return [d for d in self.node.cfg.devices if d.kind == "cvqkd"]

    # ------------------------------------------------------------ notifications

    def _snapshot(self) -> dict[str, Any]:
        links = {}
        for pool in list(self.node.pools.values()):
            sw = self.links.get(pool.cfg.id)
            if sw is not None and not sw.filled and pool.ready_bits >= pool.cfg.pool_target_bits:
                sw.filled = True          # its pool has filled: the link is up from now on
                self._save_state()
            links[link_uuid(pool.cfg.id)] = self._link_status(pool)
        devices = {}
        for dev_id, d in self.node.devices.devices.items():
            health = getattr(d.driver, "health", None)
            state = health.state if isinstance(health, DeviceHealth) else ("up" if d.connected else "unknown")
            devices[dev_id] = (d.cfg.kind, state, tuple(sorted((d.last_map or {}).items())))
        return {"links": links, "devices": devices, "apps": {a.app_id for a in self.applications.apps.values()}}

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self._notify_changes()
            except Exception:
                log.exception("SDN notifications: unexpected failure")

    def _notify_changes(self) -> None:
        old, new = self._seen, self._snapshot()
        entries = None
        for lid, status in new["links"].items():
            if old["links"].get(lid) != status:
                entries = entries or {e["qkdl_id"]: e for e in self._links()}
                name = "sdqkdn_link_new" if lid not in old["links"] else "sdqkdn_link_status_update"
                self.notifier.publish(name, {"qkdl_id": lid, "qkdl_status": status, "qkd_link": entries.get(lid)})
        for lid in set(old["links"]) - set(new["links"]):
            self.notifier.publish("sdqkdn_link_down", {"qkdl_id": lid, "reason": "link removed"})
        for dev, (kind, state, pairs) in new["devices"].items():
            before = old["devices"].get(dev)
            if before is None or before[1] != state or before[2] != pairs:
                body: dict[str, Any] = {EXT + "device": dev, EXT + "kind": kind, EXT + "state": state}
                if kind == "switch":
                    body[EXT + "cross_connects"] = {str(i): e for i, e in pairs}
                if kind == "cvqkd" and dev in self.qkdi:
                    body["qkdi_id"] = self.qkdi[dev]
                self.notifier.publish("sdqkdn_device_status_update", body)
        for app in self.applications.apps.values():
            if app.app_id not in old["apps"]:
                self.notifier.publish("sdqkdn_application_new", {"app_id": app.app_id, "server_app_id": app.master,
                                                                 "client_app_id": list(app.slaves),
                                                                 "remote_qkdn_id": node_uuid(app.remote_node)})
        self._seen = new

    # ------------------------------------------------------------ the controller's requests

    async def create(self, request: dict) -> dict:
        """Check a qkd_link entry, make the switched link it asks for, or refuse with nothing changed."""
        want = self._check_request(request)
        async with self._lock:
            remote = want["remote"]
            if self.node.pool_to(remote) is not None:
                raise SdnRefused(f"node {self.me} already has a link to node {remote} "
                                 f"({self.node.pool_to(remote).cfg.id}); one link per pair of nodes", "data-exists")
            if want["qkdl_id"] in self.node.pools or want["qkdl_id"] in self.links:
                raise SdnRefused(f"a link {want['qkdl_id']} exists", "data-exists")
            plan = await self._call_remote(remote, "sdn-plan", {"qkdl_id": want["qkdl_id"]})
            cands = await self._candidates(remote, plan, want)
            usable = [c for c in cands if c.reason is None]
            if not usable:
                if not cands:
                    raise SdnRefused(f"no spare CV-QKD module pair and fibre join node {self.me} to node {remote}"
                                     + self._asked(want), "resource-denied")
                raise SdnRefused("refused, nothing was changed: " + "; ".join(
                    f"module {c.local['qkdi_id']} at {self.me} to module {c.remote['qkdi_id']} at {remote}: {c.reason}"
                    for c in cands), "resource-denied")
            best = min(usable, key=lambda c: c.loss_db)
            channel = self._channel(plan, want)
            local_role = best.local["role"]
            body = {"qkdl_id": want["qkdl_id"], "qkdi_id": best.remote["qkdi_id"],
                    "fibre_port": best.remote["fibre_port"], "channel": channel, "loss_db": best.loss_db,
                    "remote_qkdi_id": best.local["qkdi_id"]}
            try:
                await self._call_remote(remote, "sdn-apply", body, timeout=60.0)
            except SdnRefused as exc:
                if exc.status >= 500:   # no answer, or not a refusal: it may have made its end; take it back
                    with contextlib.suppress(QkdnodeError):
                        await self._call_remote(remote, "sdn-release", {"qkdl_id": want["qkdl_id"]}, timeout=60.0)
                raise
            try:
                sw = await self._apply(want["qkdl_id"], remote, best.local["device"], best.local["fibre_port"],
                                       channel, best.loss_db, best.remote["qkdi_id"])
            except BaseException as exc:
                with contextlib.suppress(QkdnodeError):
                    await self._call_remote(remote, "sdn-release", {"qkdl_id": want["qkdl_id"]}, timeout=60.0)
                if isinstance(exc, QkdnodeError):
                    raise SdnRefused(f"node {self.me} could not make its end ({exc}); node {remote}'s end was "
                                     "taken back, nothing is left changed", "operation-failed", 500) from None
                raise
            log.info("switched link %s to node %s made: module %s (%s) on channel %d, %.1f dB", sw.qkdl_id, remote,
                     sw.device, local_role, channel, sw.loss_db)
            return self._link_entry(self.node.pools[sw.qkdl_id])

    async def delete(self, qkdl_id: str) -> None:
        with contextlib.suppress(ValueError):
            qkdl_id = str(uuid.UUID(qkdl_id))   # any case of a UUID names the link
        async with self._lock:
            sw = self.links.get(qkdl_id)
            if sw is None:
                if any(link_uuid(p.cfg.id) == qkdl_id or p.cfg.id == qkdl_id for p in self.node.pools.values()):
                    raise SdnRefused(f"link {qkdl_id} is configured in the node's file, not switched: "
                                     "it is not the controller's to delete", "access-denied", 403)
                raise SdnRefused(f"no switched link {qkdl_id} at node {self.me}", "data-missing", 404)
            await self._call_remote(sw.peer, "sdn-release", {"qkdl_id": qkdl_id}, timeout=60.0)
            await self._release(sw)

    def _asked(self, want: dict) -> str:
        parts = [f"{k} {want[k]}" for k in ("local_qkdi_id", "remote_qkdi_id", "role") if want.get(k) is not None]
        return f" (asked for {', '.join(parts)})" if parts else ""

    def _check_request(self, body: Any) -> dict:
        """A RESTCONF POST body: {"etsi-qkd-sdn-node:qkd_link": [one entry]}. Unknown fields, wrong
        types or values: SdnRefused(invalid-value, 400), naming the field."""
        def bad(what: str) -> SdnRefused:
            return SdnRefused(what, "invalid-value", 400)

        if not isinstance(body, dict) or set(body) != {f"{MODULE}:qkd_link"}:
            raise bad(f'the body must be {{"{MODULE}:qkd_link": [ENTRY]}}')
        entries = body[f"{MODULE}:qkd_link"]
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
            raise bad(f"{MODULE}:qkd_link must be an array of exactly one qkd_link entry")
        e = entries[0]
        known = {"qkdl_id", "qkdl_type", "qkdl_enable", "qkdl_local", "qkdl_remote", "phys_wavelength",
                 "phys_qkd_role"}
        unknown = sorted(set(e) - known)
        if unknown:
            raise bad(f"qkd_link: field(s) {', '.join(unknown)} are not accepted here "
                      "(docs/sdn.md lists those that are)")
        qkdl_id = e.get("qkdl_id")
        try:
            if not isinstance(qkdl_id, str) or str(uuid.UUID(qkdl_id)) != qkdl_id.lower():
                raise ValueError
        except ValueError:
            raise bad(f"qkdl_id must be a UUID (RFC 4122 text form), found {str(qkdl_id)[:60]!r}") from None
        if e.get("qkdl_type") not in (T + "PHYS", "PHYS"):
            raise bad(f"qkdl_type must be {T}PHYS: a switched link is a direct quantum channel "
                      f"(virtual links are made by key relay), found {str(e.get('qkdl_type'))[:40]!r}")
        if e.get("qkdl_enable", True) is not True:
            raise bad("qkdl_enable must be true (a link is made to make key)")
        out: dict[str, Any] = {"qkdl_id": qkdl_id.lower()}
        for side in ("qkdl_local", "qkdl_remote"):
            part = e.get(side)
            if not isinstance(part, dict) or set(part) - {"qkdn_id", "qkdi_id"} or "qkdn_id" not in part:
                raise bad(f"{side} must be an object with qkdn_id (and optionally qkdi_id)")
            node = self._node_named(part["qkdn_id"], side)
            qkdi = part.get("qkdi_id")
            if qkdi is not None and (isinstance(qkdi, bool) or not isinstance(qkdi, int) or not 0 < qkdi < 1 << 32):
                raise bad(f"{side}.qkdi_id must be an interface number (uint32), found {qkdi!r}")
            out["local" if side == "qkdl_local" else "remote"] = node
            out["local_qkdi_id" if side == "qkdl_local" else "remote_qkdi_id"] = qkdi
        if out["local"] != self.me:
            raise bad(f"qkdl_local.qkdn_id must be this node ({node_uuid(self.me)}, node {self.me}); send the "
                      "request to the node at the link's local end")
        if out["remote"] == self.me:
            raise bad("qkdl_remote.qkdn_id names this node: a link joins two nodes")
        if out["remote"] not in self.node.peers:
            raise SdnRefused(f"node {out['remote']} is not a peer of node {self.me} ([peers] in its config)",
                             "invalid-value", 400)
        wl = e.get("phys_wavelength")
        if wl is not None:
            if not isinstance(wl, str) or not _WAVELENGTH.match(wl):
                raise bad(f"phys_wavelength must be a WDM channel number as a string (e.g. \"37\"), found {wl!r}")
            if int(wl) not in self.cfg.channels:
                raise SdnRefused(f"channel {wl} is not one of the quantum channels of node {self.me} "
                                 f"({', '.join(map(str, self.cfg.channels))})", "invalid-value", 400)
            out["channel"] = int(wl)
        role = e.get("phys_qkd_role")
        if role is not None:
            if role not in (T + "TRANSMITTER", T + "RECEIVER"):
                raise bad(f"phys_qkd_role must be {T}TRANSMITTER or {T}RECEIVER (this end's module), found {role!r}")
            out["role"] = "transmitter" if role.endswith("TRANSMITTER") else "receiver"
        return out

    def _node_named(self, value: Any, side: str) -> str:
        """A node named by its qkdn_id (the UUID its model gives) or by its node_id."""
        if isinstance(value, str):
            for n in (self.me, *self.node.peers):
                if value in (n, node_uuid(n)):
                    return n
        raise SdnRefused(f"{side}.qkdn_id {str(value)[:60]!r} is neither this node nor one of its peers",
                         "invalid-value", 400)

    async def _call_remote(self, remote: str, verb: str, body: dict, timeout: float = 15.0) -> dict:
        try:
            return await self.node.peers[remote].call_node(verb, dict(body, **{"from": self.me}), timeout=timeout)
        except PeerRejected as exc:
            if exc.answer.get("refused"):
                raise SdnRefused(f"node {remote}: {exc.answer.get('message')}", str(exc.answer["refused"])) from None
            raise SdnRefused(f"node {remote} did not take part: {exc}; nothing was changed", "operation-failed",
                             502) from None
        except PeerUnavailable as exc:
            raise SdnRefused(f"node {remote} does not answer on the peer channel ({exc}); nothing was changed",
                             "operation-failed", 503) from None

    # ------------------------------------------------------------ planning (both ends, no change)

    async def _local_options(self, remote: str) -> list[dict]:
        """This node's half of every possible path to `remote`: a free spare module and a fibre
        to that node on the same switch, with the reason it cannot be used now, if any (read
        back from the switch: ports in use, classical traffic)."""
        out = []
        maps: dict[str, dict[int, int] | str] = {}
        for d in self._modules():
            busy = next((s.qkdl_id for s in self.links.values() if s.device == d.id), None)
            for f in self.cfg.fibres:
                if f.node != remote or f.switch != d.switch:
                    continue
                reason = f"module {d.id} is in use by link {busy}" if busy else None
                if reason is None:
                    reason = await self._ports_reason(d, f, maps)
                if reason is None and not self._module_up(d):
                    reason = f"module {d.id} does not answer"
                out.append({"qkdi_id": self.qkdi[d.id], "device": d.id, "role": d.role, "switch": d.switch,
                            "module_port": d.switch_port, "fibre_port": f.port, "remote_port": f.remote_port,
                            "fibre_loss_db": f.loss_db, "insertion_loss_db": self._switch(d.switch).insertion_loss_db,
                            "max_loss_db": d.max_loss_db, "reason": reason})
        return out

    def _module_up(self, d: DeviceConfig) -> bool:
        dev = self.node.devices.devices[d.id]
        health = getattr(dev.driver, "health", None)
        return dev.connected and (not isinstance(health, DeviceHealth) or health.state in ("up", "degraded"))

    def _switch(self, switch_id: str) -> DeviceConfig:
        return self.node.devices.devices[switch_id].cfg

    @staticmethod
    def _pair(d: DeviceConfig, f: FibreConfig) -> dict[int, int]:
        # Light goes from transmitter to receiver: into the switch from the module and out to the
        # fibre at the transmitter's node, in from the fibre and out to the module at the receiver's.
        return {d.switch_port: f.port} if d.role == "transmitter" else {f.port: d.switch_port}

    async def _ports_reason(self, d: DeviceConfig, f: FibreConfig, maps: dict) -> str | None:
        sw = self._switch(d.switch)
        if sw.id not in maps:
            try:
                maps[sw.id] = await self.node.devices.read_map(sw.id)
                maps[sw.id + ":size"] = await self.node.devices.devices[sw.id].driver.size()
            except DriverError as exc:
                maps[sw.id] = f"switch {sw.id} cannot be read: {exc}"
        current = maps[sw.id]
        if isinstance(current, str):
            return current
        n, m = maps[sw.id + ":size"]
        ((i, e),) = self._pair(d, f).items()
        if not (1 <= i <= n < e <= n + m):
            return (f"switch {sw.id}: the path needs ingress {i} to egress {e}, but the switch's ingress ports are "
                    f"1..{n} and its egress ports {n + 1}..{n + m} (check switch_port and the fibre's port)")
        classical = set(sw.settings.get("classical_ports", []) or [])
        partners = {**current, **{eg: ig for ig, eg in current.items()}}
        for p in (i, e):
            if p in classical:
                return f"switch {sw.id}: port {p} carries classical traffic"
            q = partners.get(p)
            if q is not None and q in classical:
                return (f"switch {sw.id}: port {p} is connected to port {q}, which carries classical traffic; "
                        "the link would disturb it")
            if q is not None:
                return f"switch {sw.id}: port {p} is in use (connected to port {q})"
        return None

    def _free_channels(self) -> list[int]:
        """Quantum channels of this node no quantum link at this node uses: its static CV links
        and its switched links share the node's DWDM multiplexer (and its OSA watches them)."""
        used = {s.channel for s in self.links.values()}
        for link in self.node.cfg.links:
            ch = link.settings.get("itu_channel")
            parts = link.settings.get("parts") if isinstance(link.settings.get("parts"), list) else []
            chans = [ch] + [p.get("settings", {}).get("itu_channel") for p in parts if isinstance(p, dict)]
            used |= {c for c in chans if isinstance(c, int)}
        return [c for c in self.cfg.channels if c not in used]

    async def _candidates(self, remote: str, plan: dict, want: dict) -> list[_Candidate]:
        local = await self._local_options(remote)
        theirs = plan.get("options") if isinstance(plan.get("options"), list) else []
        out = []
        for a in local:
            for b in theirs:
                if not isinstance(b, dict) or b.get("role") == a["role"]:
                    continue
                if want.get("local_qkdi_id") not in (None, a["qkdi_id"]) or \
                        want.get("remote_qkdi_id") not in (None, b.get("qkdi_id")) or \
                        want.get("role") not in (None, a["role"]):
                    continue
                if (b.get("fibre_port"), b.get("remote_port")) != (a["remote_port"], a["fibre_port"]):
                    continue  # not the same fibre
                try:
                    loss = a["insertion_loss_db"] + a["fibre_loss_db"] + float(b["insertion_loss_db"])
                    budget = min(a["max_loss_db"], float(b["max_loss_db"]))
                    their_fibre = float(b["fibre_loss_db"])
                except (KeyError, TypeError, ValueError):
                    continue
                reason = a["reason"] or b.get("reason")
                if reason is None and abs(their_fibre - a["fibre_loss_db"]) > 0.05:
                    reason = (f"the two nodes' configs disagree on the fibre's loss ({a['fibre_loss_db']:g} dB here, "
                              f"{their_fibre:g} dB at node {remote})")
                if reason is None and loss > budget:
                    reason = (f"loss budget exceeded: {loss:.1f} dB on the path (switch {a['switch']} "
                              f"{a['insertion_loss_db']:g} dB + fibre {a['fibre_loss_db']:g} dB + switch at node "
                              f"{remote} {float(b['insertion_loss_db']):g} dB), the modules take at most {budget:g} dB")
                out.append(_Candidate(a, b, loss, reason))
        return sorted(out, key=lambda c: (c.reason is not None, c.loss_db))

    def _channel(self, plan: dict, want: dict) -> int:
        theirs = plan.get("channels") if isinstance(plan.get("channels"), list) else []
        mine = self._free_channels()
        both = [c for c in mine if c in theirs]
        if want.get("channel") is not None:
            if want["channel"] in both:
                return want["channel"]
            raise SdnRefused(f"no free channel: channel {want['channel']} is in use at node "
                             f"{self.me if want['channel'] not in mine else want['remote']}; nothing was changed",
                             "resource-denied")
        if not both:
            raise SdnRefused(f"no free channel: node {self.me} has {_chans(mine)} free, node {want['remote']} "
                             f"{_chans(theirs)}; none is free at both; nothing was changed", "resource-denied")
        return both[0]

    # ------------------------------------------------------------ peer verbs (the other end)

    async def _on_plan(self, caller: str, body: dict) -> dict:
        self._from(caller, body)
        if self.node.pool_to(caller) is not None:
            raise SdnRefused(f"node {self.me} already has a link to node {caller}", "data-exists")
        return {"qkdn_id": node_uuid(self.me), "options": await self._local_options(caller),
                "channels": self._free_channels()}

    async def _on_apply(self, caller: str, body: dict) -> dict:
        self._from(caller, body)
        try:
            await asyncio.wait_for(self._lock.acquire(), REMOTE_LOCK_WAIT)
        except asyncio.TimeoutError:
            raise SdnRefused(f"node {self.me} is busy with another SDN request; try again", "resource-denied") from None
        try:
            qkdl_id, channel = _str(body, "qkdl_id"), _int(body, "channel")
            qkdi, fibre_port = _int(body, "qkdi_id"), _int(body, "fibre_port")
            remote_qkdi = _int(body, "remote_qkdi_id")
            loss = body.get("loss_db")
            if not isinstance(loss, (int, float)) or isinstance(loss, bool):
                raise BadMessage("loss_db must be a number")
            if self.node.pool_to(caller) is not None or qkdl_id in self.node.pools:
                raise SdnRefused(f"node {self.me} already has a link to node {caller}", "data-exists")
            device = next((d for d in self._modules() if self.qkdi[d.id] == qkdi), None)
            if device is None:
                raise SdnRefused(f"node {self.me} has no spare module {qkdi}", "invalid-value")
            if channel not in self._free_channels():
                raise SdnRefused(f"channel {channel} is not free at node {self.me}", "resource-denied")
            option = next((o for o in await self._local_options(caller)
                           if o["qkdi_id"] == qkdi and o["fibre_port"] == fibre_port), None)
            if option is None:
                raise SdnRefused(f"no fibre from port {fibre_port} of module {qkdi}'s switch to node {caller}",
                                 "invalid-value")
            if option["reason"]:
                raise SdnRefused(option["reason"] + "; nothing was changed", "resource-denied")
            try:
                await self._apply(qkdl_id, caller, device.id, fibre_port, channel, float(loss), remote_qkdi)
            except QkdnodeError as exc:
                raise SdnRefused(f"node {self.me} could not make its end ({exc}); what it had done was taken back",
                                 "operation-failed") from None
            return {"made": qkdl_id}
        finally:
            self._lock.release()

    async def _on_release(self, caller: str, body: dict) -> dict:
        self._from(caller, body)
        qkdl_id = _str(body, "qkdl_id")
        sw = self.links.get(qkdl_id)
        if sw is None:
            return {"released": None}       # idempotent: a retried release, or an apply that never happened
        if sw.peer != caller:
            raise SdnRefused(f"link {qkdl_id} belongs to node {sw.peer}", "access-denied")
        try:
            await asyncio.wait_for(self._lock.acquire(), REMOTE_LOCK_WAIT)
        except asyncio.TimeoutError:
            raise SdnRefused(f"node {self.me} is busy with another SDN request; try again", "resource-denied") from None
        try:
            if qkdl_id in self.links:
                await self._release(self.links[qkdl_id])
        finally:
            self._lock.release()
        return {"released": qkdl_id}

    def _from(self, caller: str, body: dict) -> None:
        if body.get("from") != caller:
            raise BadMessage(f"a message from node {caller} that says it comes from {body.get('from')!r}")

    # ------------------------------------------------------------ making and taking back one end

    async def _apply(self, qkdl_id: str, peer: str, device_id: str, fibre_port: int, channel: int,
                     loss_db: float, remote_qkdi: int) -> SwitchedLink:
        """Make this node's end, step by step; on any failure take back the steps made and raise."""
        d = next(d for d in self._modules() if d.id == device_id)
        f = next(f for f in self.cfg.fibres if f.switch == d.switch and f.port == fibre_port)
        sw = SwitchedLink(qkdl_id, peer, d.role, d.id, self.qkdi[d.id], remote_qkdi, d.switch, self._pair(d, f),
                          channel, loss_db, created=_now())
        module = self.node.devices.devices[d.id].driver
        done: list[str] = []
        try:
            await self.node.devices.add_cross_connects(sw.switch, sw.pairs)
            done.append("switch")
            await module.connect()
            await module.tune(channel)
            await module.start()
            done.append("module")
            await self.node.add_link(self._link_config(sw, d), _Borrowed(module))
            done.append("pool")
            self.links[qkdl_id] = sw
            self._save_state()
        except BaseException:
            self.links.pop(qkdl_id, None)
            await self._undo(sw, module, done)
            raise
        return sw

    def _link_config(self, sw: SwitchedLink, d: DeviceConfig) -> LinkConfig:
        # The transmitter's node is the link's master end: it pulls blocks and allocates.
        return LinkConfig(id=sw.qkdl_id, peer=sw.peer, role="master" if sw.role == "transmitter" else "slave",
                          driver=d.driver, pool_target_bits=self.cfg.pool_target_bits,
                          fetch_interval=self.cfg.fetch_interval, settings={})

    async def _release(self, sw: SwitchedLink) -> None:
        module = self.node.devices.devices[sw.device].driver
        self.links.pop(sw.qkdl_id, None)
        self._save_state()
        await self._undo(sw, module, ["switch", "module", "pool"], strict=True)
        log.info("switched link %s to node %s deleted; switch %s restored", sw.qkdl_id, sw.peer, sw.switch)

    async def _undo(self, sw: SwitchedLink, module: Any, done: list[str], strict: bool = False) -> None:
        errors = []
        if "pool" in done and sw.qkdl_id in self.node.pools:
            try:
                await self.node.remove_link(sw.qkdl_id)
            except QkdnodeError as exc:
                errors.append(f"pool: {exc}")
        if "module" in done:
            try:
                await module.stop()
            except DriverError as exc:
                errors.append(f"module {sw.device}: {exc}")
        if "switch" in done:
            try:
                await self.node.devices.remove_cross_connects(sw.switch, sw.pairs)
            except DriverError as exc:
                errors.append(f"switch {sw.switch}: {exc}")
        if errors:
            log.error("switched link %s: taking it back left: %s", sw.qkdl_id, "; ".join(errors))
            if strict:
                raise SdnRefused(f"link {sw.qkdl_id} deleted, but: {'; '.join(errors)}", "operation-failed", 500)

    # ------------------------------------------------------------ kept across restarts

    def _save_state(self) -> None:
        tmp = self._state.with_name(f".{STATE_FILE}.tmp")
        try:
            tmp.write_text(json.dumps([s.to_json() for s in self.links.values()], indent=1))
            os.replace(tmp, self._state)
        except OSError as exc:
            log.error("cannot save the switched links to %s: %s", self._state, exc)

    def _load_state(self) -> list[SwitchedLink]:
        try:
            return [SwitchedLink.from_json(d) for d in json.loads(self._state.read_text())]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("%s is unreadable, no switched link restored: %s", self._state, exc)
            return []

    async def _restore(self, sw: SwitchedLink) -> None:
        """After a restart: keep the link's cross-connects (the switch still has them, or gets them
        again), put the module back on its channel, and start the pool again on its blocks."""
        d = next(d for d in self._modules() if d.id == sw.device)
        dev = self.node.devices.switch(sw.switch)
        async with dev.lock:
            dev.kept.update(sw.pairs)
        module = self.node.devices.devices[d.id].driver
        self.links[sw.qkdl_id] = sw
        await self.node.add_link(self._link_config(sw, d), _Borrowed(module))
        self._tasks.append(asyncio.create_task(self._retune(sw, module), name=f"retune {sw.device}"))
        log.info("switched link %s to node %s restored (module %s, channel %d)", sw.qkdl_id, sw.peer, sw.device,
                 sw.channel)

    async def _retune(self, sw: SwitchedLink, module: Any) -> None:
        delay = 0.5
        while sw.qkdl_id in self.links:
            try:
                await module.connect()
                await module.tune(sw.channel)
                await module.start()
                return
            except DriverError as exc:
                log.warning("switched link %s: module %s: %s", sw.qkdl_id, sw.device, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    # ------------------------------------------------------------ the HTTPS app

    def app(self) -> web.Application:
        controller = self.cfg.controller
        metrics = self.metrics

        @web.middleware
        async def guard(request: web.Request, handler):
            caller = peer_identity(request.transport)
            if caller != controller:
                return _restconf_error(403, "access-denied", f"only the SDN controller ({controller!r}) may use this "
                                       f"interface; the caller's certificate names {caller!r}")
            try:
                return await handler(request)
            except web.HTTPException as exc:
                return _restconf_error(exc.status, "operation-not-supported" if exc.status == 405 else "invalid-value",
                                       exc.reason)

        async def get_node(request: web.Request) -> web.Response:
            return _json(self.model())

        async def get_link(request: web.Request) -> web.Response:
            lid = request.match_info["id"]
            for e in self._links():
                if e["qkdl_id"] == lid or e.get(EXT + "link_id") == lid:
                    return _json({f"{MODULE}:qkd_link": [e]})
            return _restconf_error(404, "invalid-value", f"no link {lid} at node {self.me}")

        async def post_link(request: web.Request) -> web.Response:
            try:
                body = await request.json()
            except ValueError:
                metrics.sdn_requests.labels("create", "refused").inc()
                return _restconf_error(400, "malformed-message", "the body is not JSON")
            try:
                entry = await self.create(body)
            except SdnRefused as exc:
                metrics.sdn_requests.labels("create", "refused" if exc.status < 500 else "failed").inc()
                log.warning("SDN request to create a link refused: %s", exc)
                return _restconf_error(exc.status, exc.tag, str(exc))
            metrics.sdn_requests.labels("create", "done").inc()
            return _json({f"{MODULE}:qkd_link": [entry]}, status=201,
                         headers={"Location": f"{NODE_PATH}/qkd_links/qkd_link={entry['qkdl_id']}"})

        async def delete_link(request: web.Request) -> web.Response:
            try:
                await self.delete(request.match_info["id"])
            except SdnRefused as exc:
                metrics.sdn_requests.labels("delete", "refused" if exc.status < 500 else "failed").inc()
                log.warning("SDN request to delete link %s refused: %s", request.match_info["id"], exc)
                return _restconf_error(exc.status, exc.tag, str(exc))
            metrics.sdn_requests.labels("delete", "done").inc()
            return web.Response(status=204)

        async def events(request: web.Request) -> web.StreamResponse:
            last = request.headers.get("Last-Event-ID")
            sub = self.notifier.subscribe(int(last) if last and last.isdigit() else None)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            try:
                await resp.write(b": etsi-qkd-sdn-node notifications of node " + self.me.encode() + b"\n\n")
                while not sub.closed:
                    try:
                        event = await asyncio.wait_for(sub.queue.get(), 15.0)
                    except asyncio.TimeoutError:
                        await resp.write(b": keep-alive\n\n")
                        continue
                    if event is None:
                        break
                    ev_id, name, body = event
                    await resp.write(f"id: {ev_id}\nevent: {name}\ndata: {json.dumps(body)}\n\n".encode())
            except ConnectionError:
                pass
            finally:
                self.notifier.subscribers.discard(sub)
            return resp

        app = web.Application(middlewares=[guard], client_max_size=64 << 10)
        app.router.add_get(NODE_PATH, get_node)
        app.router.add_get(NODE_PATH + "/qkd_links/qkd_link={id}", get_link)
        app.router.add_post(NODE_PATH + "/qkd_links", post_link)
        app.router.add_delete(NODE_PATH + "/qkd_links/qkd_link={id}", delete_link)
        app.router.add_get(STREAM_PATH, events)
        return app


def _json(body: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type=YANG_JSON, headers=headers)


def _restconf_error(status: int, tag: str, message: str) -> web.Response:
    """An error as RFC 8040 section 7.1 shapes it."""
    return _json({"ietf-restconf:errors": {"error": [{
        "error-type": "protocol" if tag in ("malformed-message", "access-denied") else "application",
        "error-tag": tag, "error-message": message}]}}, status=status)


def _chans(chans: list) -> str:
    return ("channel(s) " + ", ".join(map(str, chans))) if chans else "no channel"


def _str(body: dict, name: str) -> str:
    v = body.get(name)
    if not isinstance(v, str) or not v:
        raise BadMessage(f"field {name!r} missing or not a string")
    return v


def _int(body: dict, name: str) -> int:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadMessage(f"field {name!r} missing or not an integer")
    return v
