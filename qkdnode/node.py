"""The composition root: builds one node from its config and runs it.

This is the one place that knows every concrete class: the vault, the drivers (found by name
in the registry), the link pools, the peer channel and the servers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qkdnode.api004 import Streams, make_api004_app
from qkdnode.api014 import make_api_app
from qkdnode.config import Listen, NodeConfig
from qkdnode.errors import QkdnodeError
from qkdnode.interfaces import load_driver
from qkdnode.links import LinkPool
from qkdnode.metrics import NodeMetrics
from qkdnode.peer import PeerClient, make_peer_app
from qkdnode.relay import Router, node_sae
from qkdnode.sdnotify import SystemdNotifier
from qkdnode.skip import make_skip_app
from qkdnode.tlsutil import checked, client_context, server_context
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
        client_ssl = checked(cfg.file, client_context, *pems)
        self.peers = {pid: PeerClient(p, client_ssl, self.metrics) for pid, p in cfg.peers.items()}
        self.pools: dict[str, LinkPool] = {}
        for i, link in enumerate(cfg.links):
            source = load_driver(link.driver, link.settings, file=cfg.file, key=f"links[{i}].driver")
            # The two nodes themselves are parties of a link too: relay pads are hand-outs between them.
            parties = dict(cfg.saes, **{node_sae(cfg.node_id): cfg.node_id, node_sae(link.peer): link.peer})
            self.pools[link.id] = LinkPool(link, cfg.node_id, self.vault, source, self.peers[link.peer],
                                           self.metrics, parties)
        self.router = Router(self)
        self.streams = Streams(self)  # ETSI 004 key streams (both ends), served if [etsi004] is configured
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task] = []

    def pool_to(self, node_id: str) -> LinkPool | None:
        link = self.cfg.link_to(node_id)
        return self.pools[link.id] if link else None

    async def hand_out(self, master: str, slaves: list[str], number: int, size_bits: int) -> list[HandOut]:
        """Fresh keys for `master` (an SAE of this node) shared with `slaves` (SAEs of other
        nodes, any number of them): over the direct link, or relayed. Durable before it returns.
        Raises PoolExhausted/NoRoute when no path has key, PeerUnavailable when none answers."""
        return await self.router.hand_out(master, slaves, number, size_bits)

    async def deliver(self, slave: str, master: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
        """The keys `master` got for `slave`, once each (UnknownKey, NotYourKey otherwise)."""
        return await self.vault.run(self.vault.deliver, slave, master, key_ids)

    async def start(self) -> None:
        await asyncio.to_thread(self.vault.open, True)
        for peer in self.peers.values():
            await peer.start()
        await self._serve(make_peer_app(self.cfg.node_id, self.pools,
                                        {"relay": self.router.on_relay, "lsa": self.router.on_lsa,
                                         "etsi004": self.streams.on_peer}),
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
        if self.cfg.vault.audit_retention_days:
            self._tasks.append(asyncio.create_task(self._audit_retention(), name="audit retention"))
        log.info("node %s up: ETSI 014 on https://%s, peer channel on https://%s, %d link(s)",
                 self.cfg.node_id, self.cfg.api, self.cfg.peer_listen, len(self.pools))

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

    async def _audit_retention(self) -> None:
        while True:
            cutoff = time.time() - self.cfg.vault.audit_retention_days * 86400
            try:
                pruned = await self.vault.run(self.vault.prune_audit, cutoff)
                self.metrics.audit_pruned.inc(pruned)
            except QkdnodeError as exc:
                log.warning("audit retention: %s", exc)
            await asyncio.sleep(3600)

    async def stop(self) -> None:
        # First stop taking requests (answers in flight finish), then the background loops.
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.router.stop()
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
    # Fed from the start: opening a large vault may take longer than half of WatchdogSec.
    watchdog = systemd.start_watchdog(healthy=lambda: node.vault.writer_alive)
    try:
        systemd.status(f"node {cfg.node_id}: opening the vault, starting listeners and links")
        await node.start()
        systemd.ready(f"node {cfg.node_id}: serving ETSI 014 on {cfg.api}, peer channel on {cfg.peer_listen}, "
                      f"{len(node.pools)} link(s)")
        await stop.wait()
        log.info("node %s stopping", cfg.node_id)
        systemd.stopping(f"node {cfg.node_id}: stopping")
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await node.stop()  # also after a failed start: close what was opened
