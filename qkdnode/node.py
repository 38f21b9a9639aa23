"""The composition root: builds one node from its config and runs it.

This is the one place that knows every concrete class: the vault, the drivers (found by name
in the registry), the link pools, the peer channel and the servers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qkdnode.api004 import Streams, make_api004_app
from qkdnode.api014 import make_api_app
from qkdnode.config import LinkConfig, Listen, NodeConfig
from qkdnode.devices import Devices
from qkdnode.errors import NotAuthorized, QkdnodeError
from qkdnode.interfaces import load_driver
from qkdnode.limits import SaeLimits
from qkdnode.links import LinkPool
from qkdnode.metrics import NodeMetrics
from qkdnode.peer import PeerClient, make_peer_app
from qkdnode.relay import Router, node_sae
from qkdnode.reload import SighupReloads, reload_node
from qkdnode.sdn import SdnAgent
from qkdnode.sdnotify import SystemdNotifier
from qkdnode.skip import make_skip_app
from qkdnode.telemetry import Telemetry
from qkdnode.tlsutil import checked, client_context, peer_identity, server_context
from qkdnode.vault import HandOut, Vault, load_master_key

log = logging.getLogger("qkdnode.node")


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.metrics = NodeMetrics(cfg.node_id)
        self.vault = Vault(cfg.vault.path, load_master_key(cfg.vault), on_commit=self.metrics.on_vault_commit)
        t = cfg.tls
        pems = (("tls.ca", t.ca), ("tls.cert", t.cert), ("tls.key", t.key))
        self.server_ssl = checked(cfg.file, server_context, *pems)
        self.client_ssl = client_ssl = checked(cfg.file, client_context, *pems)
        self.peers = {pid: PeerClient(p, client_ssl, self.metrics) for pid, p in cfg.peers.items()}
        # Every link's pool, static and switched: the peer channel, the router and the telemetry
        # loop all read this one dict, so a link added or removed at runtime is seen by all.
        self.pools: dict[str, LinkPool] = {}
        for i, link in enumerate(cfg.links):
            source = load_driver(link.driver, link.settings, file=cfg.file, key=f"links[{i}].driver")
            self.pools[link.id] = self._make_pool(link, source)
        self.router = Router(self)
        # [limits]: one set of per-SAE buckets and quotas that every key API consults, so an SAE
        # cannot step around its quota by asking another API.
        self.limits = SaeLimits(cfg.limits.default, cfg.limits.saes)
        self.streams = Streams(self)  # ETSI 004 key streams (both ends), served if [etsi004] is configured
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task] = []
        self.devices = Devices(cfg, self.metrics)  # switches, spectrum analysers, telemetry sources
        self.telemetry = Telemetry(self.metrics, self.pools, sources={
            link.id: src for link in cfg.links if (src := self.devices.telemetry_for(link.id)) is not None})
        self.sdn = SdnAgent(self) if cfg.sdn else None  # the controller's view and switched links

    def _make_pool(self, link: LinkConfig, source) -> LinkPool:
        # The two nodes themselves are parties of a link too: relay pads are hand-outs between them.
        parties = dict(self.cfg.saes, **{node_sae(self.cfg.node_id): self.cfg.node_id, node_sae(link.peer): link.peer})
        return LinkPool(link, self.cfg.node_id, self.vault, source, self.peers[link.peer], self.metrics, parties)

    def pool_to(self, node_id: str) -> LinkPool | None:
        for pool in self.pools.values():
            if pool.cfg.peer == node_id:
                return pool
        return None

    # ------------------------------------------------------------ links made while running (SDN agent)

    async def add_link(self, link: LinkConfig, source) -> LinkPool:
        """Start a link that is not in the config file (a switched link): its pool takes key from
        `source`, agrees it with the peer over the peer channel, and serves hand-outs and relays
        like any other. The peer must be listed under [peers] and share no link with us yet."""
        if link.id in self.pools or self.pool_to(link.peer) is not None or link.peer not in self.peers:
            raise QkdnodeError(f"node {self.cfg.node_id}: cannot add link {link.id} to node {link.peer}: "
                               "a link with that id or to that node exists, or the node is not a peer")
        pool = self._make_pool(link, source)
        await pool.start()
        self.pools[link.id] = pool
        log.info("node %s: link %s to node %s added (%s end, driver %s)", self.cfg.node_id, link.id, link.peer,
                 link.role, link.driver)
        return pool

    async def remove_link(self, link_id: str, *, drop_key: bool = True) -> None:
        """Stop a link added by add_link. Keys already handed out stay deliverable; the link's
        blocks not yet used are deleted (zeroed) when `drop_key`, as the link is gone for good."""
        pool = self.pools.pop(link_id)
        try:
            if pool.cfg.is_master:  # pushes the peer has not confirmed yet: one last try
                await pool.flush_outbox(min_age=0)
        except QkdnodeError as exc:
            log.warning("link %s: outbox not delivered before removal: %s", link_id, exc)
        await pool.stop()
        if drop_key:
            dropped = await self.vault.run(self.vault.drop_link_blocks, link_id)
            log.info("link %s: %d unused block(s) deleted with the link", link_id, dropped)
        self.metrics.forget_link(link_id)
        log.info("node %s: link %s to node %s removed", self.cfg.node_id, link_id, pool.cfg.peer)

    def caller(self, transport, noun: str = "SAE") -> str:
        """The SAE a key API call comes from, for ETSI 014, ETSI 004 and SKIP alike: the identity
        of its TLS client certificate, registered in the config in force (a SIGHUP may add SAEs)
        and attached to this node. The call takes one request from the SAE's [limits] bucket.
        Raises NotAuthorized (401) or LimitExceeded (429); `noun` names the caller in messages."""
        sae, cfg = peer_identity(transport), self.cfg
        home = cfg.saes.get(sae) if sae is not None else None
        if home is None:
            raise NotAuthorized(f"the client certificate's identity {sae!r} is not a registered {noun}")
        if home != cfg.node_id:
            raise NotAuthorized(f"{noun} {sae} is attached to node {home}, not to node {cfg.node_id}")
        self.limits.admit(sae)
        return sae

    async def hand_out(self, master: str, slaves: list[str], number: int, size_bits: int) -> list[HandOut]:
        """Fresh keys for `master` (an SAE of this node) shared with `slaves` (SAEs of other
        nodes, any number of them): over the direct link, or relayed. Durable before it returns.
        Raises PoolExhausted/NoRoute when no path has key, PeerUnavailable when none answers."""
        handouts = await self.router.hand_out(master, slaves, number, size_bits)
        if self.sdn:
            self.sdn.applications.handed_out(master, slaves, number * size_bits)
        return handouts

    async def deliver(self, slave: str, master: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
        """The keys `master` got for `slave`, once each (UnknownKey, NotYourKey otherwise)."""
        keys = await self.vault.run(self.vault.deliver, slave, master, key_ids)
        if self.sdn:
            self.sdn.applications.delivered(slave, master, sum(len(bits) for _, bits in keys) * 8)
        return keys

    async def start(self) -> None:
        await asyncio.to_thread(self.vault.open, True)
        for peer in self.peers.values():
            await peer.start()
        await self._serve(make_peer_app(self.cfg.node_id, self.pools,
                                        {"relay": self.router.on_relay, "lsa": self.router.on_lsa,
                                         "etsi004": self.streams.on_peer},
                                        self.sdn.peer_calls() if self.sdn else {}, set(self.peers)),
                          self.cfg.peer_listen, self.server_ssl)
        await self._serve(make_api_app(self), self.cfg.api, self.server_ssl)
        # The other applications' APIs (docs/apis.md): same certificates, same SAE registry, same pools.
        self._tasks.append(asyncio.create_task(self.streams.run(), name="etsi004 streams"))
        if self.cfg.etsi004:
            await self._serve(make_api004_app(self), self.cfg.etsi004, self.server_ssl)
            log.info("node %s: ETSI 004 key streams on https://%s", self.cfg.node_id, self.cfg.etsi004)
        if self.cfg.skip:
            await self._serve(make_skip_app(self), self.cfg.skip, self.server_ssl)
            log.info("node %s: SKIP on https://%s", self.cfg.node_id, self.cfg.skip)
        if self.cfg.metrics:
            await self._serve(self._metrics_app(), self.cfg.metrics, None)
        for pool in self.pools.values():
            await pool.start()
        self.router.start()
        self.devices.start()
        if self.sdn:
            await self.sdn.start()  # switched links kept from before a restart come back here
            await self._serve(self.sdn.app(), self.cfg.sdn.listen, self.server_ssl)
            log.info("node %s: SDN agent on https://%s for controller %r", self.cfg.node_id, self.cfg.sdn.listen,
                     self.cfg.sdn.controller)
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="vault housekeeping"))
        self._start_telemetry()
        log.info("node %s up: ETSI 014 on https://%s, peer channel on https://%s, %d link(s)",
                 self.cfg.node_id, self.cfg.api, self.cfg.peer_listen, len(self.pools))

    # ------------------------------------------------------------ operations (issue 7)

    def _start_telemetry(self) -> None:
        self.telemetry.certificates(self.cfg)
        self.metrics.config_loaded.set_to_current_time()
        self._tasks.append(asyncio.create_task(self.telemetry.run(), name="telemetry"))

    async def reload(self) -> bool:
        """SIGHUP: re-read the config and the TLS material; apply what may change while running
        (qkdnode/reload.py says what), refuse the rest and keep the config in force."""
        return await reload_node(self)

    async def _serve(self, app: web.Application, where: Listen, ssl_context) -> None:
        # A request still waiting for a device after 5 s of shutdown is cancelled (aiohttp waits 60 s).
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, where.host, where.port, ssl_context=ssl_context, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
        self._runners.append(runner)

    def _metrics_app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    async def _housekeeping(self, period: float = 600.0) -> None:
        """Every `period` seconds: delete keys no slave fetched within `vault.key_ttl_hours`, and
        audit records older than `vault.audit_retention_days` (0 turns either off; read each round,
        so a reload applies at once)."""
        while True:
            v = self.cfg.vault
            try:
                if v.key_ttl_hours:
                    expired = await self.vault.run(self.vault.expire_keys, time.time() - v.key_ttl_hours * 3600)
                    if expired:
                        self.metrics.keys_expired.inc(expired)
                        log.info("vault: %d key(s) no slave SAE fetched within %g h deleted", expired, v.key_ttl_hours)
                if v.audit_retention_days:
                    pruned = await self.vault.run(self.vault.prune_audit, time.time() - v.audit_retention_days * 86400)
                    self.metrics.audit_pruned.inc(pruned)
            except QkdnodeError as exc:
                log.warning("vault housekeeping: %s", exc)
            await asyncio.sleep(period)

    async def stop(self) -> None:
        # First stop taking requests (answers in flight finish), then the background loops.
        if self.sdn:
            self.sdn.close_streams()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sdn:
            await self.sdn.stop()
        await self.router.stop()
        await self.devices.stop()
        for pool in self.pools.values():
            await pool.stop()
        for peer in self.peers.values():
            await peer.close()
        await asyncio.to_thread(self.vault.close)


def protect_process() -> None:
    """Files we create are ours alone (the vault's WAL too), and no core dump carries key bits."""
    os.umask(0o077)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


async def run_node(cfg: NodeConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly (open hand-outs finish, the vault closes).

    Under systemd (Type=notify) it reports READY=1 once every listener is up, feeds the
    watchdog while the event loop turns and the vault's writer lives, and says STOPPING=1 when
    it begins to shut down; outside systemd those calls do nothing."""
    protect_process()
    systemd = SystemdNotifier.from_environ()
    node = Node(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads = SighupReloads(node, systemd)
    loop.add_signal_handler(signal.SIGHUP, reloads.signalled)
    # Fed from the start: opening a large vault may take longer than half of WatchdogSec.
    watchdog = systemd.start_watchdog(healthy=lambda: node.vault.writer_alive)
    try:
        systemd.status(f"node {cfg.node_id}: opening the vault, starting listeners and links")
        await node.start()
        # What start-up built (modules, config, drivers, apps) lives as long as the process: out
        # of the collector's sight, a full collection no longer walks it. Under load one ran
        # every ~0.7 s and held the GIL for 15-20 ms each time (docs/performance.md).
        gc.collect()
        gc.freeze()
        systemd.ready(f"node {cfg.node_id}: serving ETSI 014 on {cfg.api}, peer channel on {cfg.peer_listen}, "
                      f"{len(node.pools)} link(s)")
        reloads.serving()
        await stop.wait()
        log.info("node %s stopping", cfg.node_id)
        systemd.stopping(f"node {cfg.node_id}: stopping")
    finally:
        reloads.cancel()
        if watchdog is not None:
            watchdog.cancel()
        await node.stop()  # also after a failed start: close what was opened
