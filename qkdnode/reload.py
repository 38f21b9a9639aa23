"""SIGHUP: re-read the config file and the TLS material while the node keeps serving.

What may change while running, and takes effect at once:
- `[tls]` ca, cert and key: the files are read again (also when their paths did not change, so
  a certificate renewed in place is picked up). The node's server and client TLS contexts load
  the new certificate and key, and every handshake after the reload uses them; connections
  already open keep theirs. A CA added to `tls.ca` is trusted from then on; a CA removed stays
  trusted until the next restart (OpenSSL can add trust anchors to a live context, not drop them).
- `[keys]`: the limits the ETSI 014 API offers its SAEs.
- `[limits]`: per-SAE request rates and key-bit quotas, on every key API; the buckets and the
  day's counts stay (a reload does not hand out a fresh quota).
- per link: `pool_target_bits` and `fetch_interval`.
- `[saes]`: SAEs added to the registry. (Removing or moving an SAE could strand keys waiting
  for it: that is a restart.)
- `vault.audit_retention_days`, while it stays above 0, and `vault.key_ttl_hours`.
- `[routes]`: static relay paths, used from the next request on.

Everything else is structural: node_id, the listen addresses, peers, links added or removed, a
link's peer, role, driver or driver settings, the vault's path and master key, and any key this
module does not know. A reload with a structural change is refused as a whole: the log names
every such key, and the config in force stays, TLS material included. So is a reload of a file
that does not load or of TLS material that does not fit together. Nothing is ever dropped: the
vault, the pools and open connections are not touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from qkdnode import config
from qkdnode.config import NodeConfig
from qkdnode.errors import QkdnodeError
from qkdnode.tlsutil import checked, client_context, server_context

if TYPE_CHECKING:
    from qkdnode.node import Node
    from qkdnode.sdnotify import SystemdNotifier

log = logging.getLogger("qkdnode.reload")

# NodeConfig field -> how it is named in the TOML file
_TOML_NAME = {"api": "api.listen", "peer_listen": "peer.listen", "metrics": "metrics.listen"}
_LINK_LIVE = {"pool_target_bits", "fetch_interval"}


def compare(old: NodeConfig, new: NodeConfig) -> tuple[list[str], list[str]]:
    """(keys changed that a reload applies, keys changed that need a restart), in TOML's dotted
    names. A field of NodeConfig this function does not know counts as structural."""
    live: list[str] = []
    structural: list[str] = []
    for f in dataclasses.fields(NodeConfig):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name == "file" or a == b:
            continue
        if f.name == "keys":
            live += [f"keys.{k.name}" for k in dataclasses.fields(a) if getattr(a, k.name) != getattr(b, k.name)]
        elif f.name == "tls":
            live += [f"tls.{k.name}" for k in dataclasses.fields(a) if getattr(a, k.name) != getattr(b, k.name)]
        elif f.name == "vault":
            for k in dataclasses.fields(a):
                va, vb = getattr(a, k.name), getattr(b, k.name)
                if va != vb:
                    both_on = k.name == "audit_retention_days" and va > 0 and vb > 0
                    (live if both_on or k.name == "key_ttl_hours" else structural).append(f"vault.{k.name}")
        elif f.name == "saes":
            live += [f"saes.{s}" for s in sorted(set(b) - set(a))]
            structural += [f"saes.{s}" for s in sorted(a) if b.get(s) != a[s]]
        elif f.name == "limits":
            live += [f"limits.{k.name}" for k in dataclasses.fields(a.default)
                     if getattr(a.default, k.name) != getattr(b.default, k.name)]
            live += [f"limits.saes.{s}" for s in sorted(set(a.saes) | set(b.saes)) if a.saes.get(s) != b.saes.get(s)]
        elif f.name == "routes":  # the router reads them per request
            live += [f"routes.{d}" for d in sorted(set(a) | set(b)) if a.get(d) != b.get(d)]
        elif f.name == "peers":
            structural += [f"peers.{p}" for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
        elif f.name == "links":
            _compare_links(a, b, live, structural)
        else:
            structural.append(_TOML_NAME.get(f.name, f.name))
    return live, structural


def _compare_links(old: tuple, new: tuple, live: list[str], structural: list[str]) -> None:
    before = {link.id: link for link in old}
    for i, link in enumerate(new):
        was = before.pop(link.id, None)
        if was is None:
            structural.append(f"links[{i}] (link {link.id} added)")
            continue
        for k in dataclasses.fields(link):
            va, vb = getattr(was, k.name), getattr(link, k.name)
            if k.name == "settings":
                # names only: a setting's value may be a password
                structural += [f"links[{i}].settings.{s}" for s in sorted(set(va) | set(vb)) if va.get(s) != vb.get(s)]
            elif va != vb:
                (live if k.name in _LINK_LIVE else structural).append(f"links[{i}].{k.name}")
    structural += [f"links (link {gone} removed)" for gone in before]


async def reload_node(node: "Node") -> bool:
    """Apply the config file and TLS material as they are now on disk, or refuse and change
    nothing. True if applied."""
    old = node.cfg
    try:
        new = config.load(old.file)
        live, structural = compare(old, new)
        if structural:
            raise QkdnodeError(f"{old.file}: structural change(s) to {', '.join(structural)} need a restart")
        t = new.tls
        pems = (("tls.ca", t.ca), ("tls.cert", t.cert), ("tls.key", t.key))
        checked(new.file, server_context, *pems)  # the whole set loads and fits before anything changes
        checked(new.file, client_context, *pems)
    except (QkdnodeError, OSError) as exc:
        node.metrics.config_reloads.labels("refused").inc()
        log.error("reload refused, the config in force stays: %s", exc)
        return False
    for ctx in (node.server_ssl, node.client_ssl):
        ctx.load_verify_locations(cafile=str(t.ca))
        ctx.load_cert_chain(str(t.cert), str(t.key))
    _apply(node, new)
    node.telemetry.certificates(new)
    node.metrics.config_reloads.labels("applied").inc()
    node.metrics.config_loaded.set_to_current_time()
    log.info("reloaded %s: TLS material re-read (certificate serial %s)%s", new.file, _serial(t.cert),
             f"; changed {', '.join(live)}" if live else "; no other change")
    return True


def _apply(node: "Node", new: NodeConfig) -> None:
    links = {link.id: link for link in new.links}
    for link_id, pool in node.pools.items():
        if link_id in links:  # a switched link made by the SDN agent has no entry in the file
            pool.cfg = links[link_id]
        # The pool's own registry of parties may hold more than the config's SAEs: add, never replace.
        pool.saes.update({s: n for s, n in new.saes.items() if s not in pool.saes})
    node.limits.reconfigure(new.limits.default, new.limits.saes)
    node.cfg = new


def _serial(cert_file: Path) -> str:
    try:
        return f"{x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number:x}"
    except (OSError, ValueError):
        return "unknown"


class SighupReloads:
    """Turns SIGHUPs into reloads: one at a time, in order, and none before the node serves (a
    SIGHUP during the start is applied once it does). Tells systemd RELOADING=1, then READY=1."""

    def __init__(self, node: "Node", systemd: "SystemdNotifier"):
        self.node, self.systemd = node, systemd
        self._serving = asyncio.Event()
        self._one_at_a_time = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def signalled(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def serving(self) -> None:
        self._serving.set()

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _reload(self) -> None:
        await self._serving.wait()
        async with self._one_at_a_time:
            self.systemd.reloading()
            applied = await self.node.reload()
            self.systemd.ready(f"node {self.node.cfg.node_id}: config "
                               f"{'reloaded' if applied else 'reload refused (see the log)'} at "
                               f"{time.strftime('%H:%M:%S')}")
