"""A small network for the application APIs' tests: nodes in this process (real `Node` objects,
real HTTPS listeners with client certificates on loopback), joined by emulated KME pairs.

Independent of hil/testbed.py on purpose: it writes its own node configs with `[etsi004]` and
`[skip]` listeners. `AppNet(["A", "B"])` is one link A-B; `AppNet(["A", "B", "C"])` is a chain
A-B-C (A and C share no link: their keys are relayed by B).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path

import aiohttp

from hil.kme import KmePair
from hil.pki import ThrowawayPKI, write_private
from hil.testbed import free_port  # never hands a port out twice in this process (the testbeds' too)
from qkdnode import config
from qkdnode.node import Node

HOST = "127.0.0.1"


class AppNet:
    def __init__(self, workdir: Path, names: list[str], *, initial_keys: int = 64, rate_bps: float = 0.0,
                 pool_target_bits: int = 1 << 14, extra: dict[str, str] | None = None):
        self.dir = Path(workdir)
        self.names = names
        self.extra = extra or {}  # more TOML for a node's config, by node name (e.g. its [limits])
        self.initial_keys, self.rate_bps, self.pool_target_bits = initial_keys, rate_bps, pool_target_bits
        self.saes = {f"sae-{n.lower()}{i}": n for n in names for i in (1, 2)}
        self.nodes: dict[str, Node] = {}
        self.kmes: list[KmePair] = []
        self.ports: dict[str, dict[str, int]] = {}

    def hostname(self, name: str) -> str:
        return f"node-{name.lower()}.qkd.test"

    async def start(self) -> "AppNet":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki = ThrowawayPKI(self.dir / "pki")
        for sae in self.saes:
            pki.issue(sae, sae)
        links = list(zip(self.names, self.names[1:]))  # (master end, slave end)
        kme_urls: dict[tuple[str, str], tuple[str, str]] = {}
        for a, b in links:
            creds = [pki.issue(f"kme-{x}-{a}{b}", f"KME-{x}", hosts=(f"kme-{x.lower()}.lab",), server=True, client=False)
                     for x in (a, b)]
            kme = KmePair(sae_a=f"qkdnode-{a}", sae_b=f"qkdnode-{b}", rate_bps=self.rate_bps,
                          initial_keys=self.initial_keys, max_key_count=4096)
            await kme.start(*(self._server_ssl(c) for c in creds))
            self.kmes.append(kme)
            kme_urls[(a, b)] = (kme.url("A"), kme.url("B"))
        for n in self.names:
            self.ports[n] = {k: free_port() for k in ("api", "peer", "etsi004", "skip")}
        for n in self.names:
            node_cred = pki.issue(f"node-{n}", n, hosts=(HOST, self.hostname(n)), server=True, client=True)
            kme_client = pki.issue(f"kme-client-{n}", f"qkdnode-{n}")
            d = self.dir / n
            d.mkdir(exist_ok=True)
            write_private(d / "master.key", os.urandom(32).hex().encode() + b"\n")
            p = self.ports[n]
            neighbours = [b for a, b in links if a == n] + [a for a, b in links if b == n]
            text = [f'node_id = "{n}"', f'[api]\nlisten = "{HOST}:{p["api"]}"', f'[peer]\nlisten = "{HOST}:{p["peer"]}"',
                    f'[etsi004]\nlisten = "{HOST}:{p["etsi004"]}"', f'[skip]\nlisten = "{HOST}:{p["skip"]}"',
                    f'[tls]\nca = "{pki.ca}"\ncert = "{node_cred.cert}"\nkey = "{node_cred.key}"',
                    '[vault]\npath = "vault.db"\nmaster_key_file = "master.key"',
                    "[keys]\nkey_size = 256\nmin_key_size = 64\nmax_key_size = 8192\nmax_key_per_request = 128"]
            for o in neighbours:
                text.append(f'[peers.{o}]\nurl = "https://{HOST}:{self.ports[o]["peer"]}"\n'
                            f'server_hostname = "{self.hostname(o)}"')
            for a, b in links:
                if n not in (a, b):
                    continue
                other, side = (b, "A") if n == a else (a, "B")
                url = kme_urls[(a, b)][0 if side == "A" else 1]
                text.append(f'[[links]]\nid = "{a}-{b}"\npeer = "{other}"\nrole = "{"master" if n == a else "slave"}"\n'
                            f'driver = "etsi014"\npool_target_bits = {self.pool_target_bits}\nfetch_interval = 0.2\n'
                            f'[links.settings]\nprofile = "idq"\nurl = "{url}"\n'
                            f'server_hostname = "kme-{n.lower()}.lab"\nsae_id = "qkdnode-{n}"\n'
                            f'peer_sae_id = "qkdnode-{other}"\nca = "{pki.ca}"\ncert = "{kme_client.cert}"\n'
                            f'key = "{kme_client.key}"')
            text.append("[saes]\n" + "\n".join(f'"{s}" = "{node}"' for s, node in self.saes.items()))
            if n in self.extra:
                text.append(self.extra[n])
            (d / "node.toml").write_text("\n\n".join(text) + "\n")
        for n in self.names:
            self.nodes[n] = Node(config.load(self.dir / n / "node.toml"))
        try:
            for node in self.nodes.values():
                await node.start()
        except BaseException:
            await self.stop()
            raise
        return self

    def _server_ssl(self, cred) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.pki.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(str(cred.cert), str(cred.key))
        return ctx

    async def stop(self) -> None:
        for node in self.nodes.values():
            try:
                await node.stop()
            except Exception:
                pass
        for kme in self.kmes:
            await kme.stop()

    async def wait_ready(self, bits: int, timeout: float = 30.0) -> None:
        """Until every link holds `bits` ready at both ends (and, on a chain, routes are known)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ok = all(p.ready_bits >= bits for node in self.nodes.values() for p in node.pools.values())
            first, last = self.nodes[self.names[0]], self.names[-1]
            if ok and first.router.route(last, 1) is not None:
                return
            if loop.time() > deadline:
                raise AssertionError(f"links not ready with {bits} bits within {timeout} s")
            for node in self.nodes.values():
                for p in node.pools.values():
                    await p.refresh_gauge()
            await asyncio.sleep(0.1)

    def manifest(self) -> dict:
        """The testbed.json fields this network would publish (base URLs of every API)."""
        return {"ca": str(self.pki.ca),
                "nodes": {n: {"etsi014": f"https://{HOST}:{p['api']}", "etsi004": f"https://{HOST}:{p['etsi004']}",
                              "skip": f"https://{HOST}:{p['skip']}"} for n, p in self.ports.items()},
                "saes": {s: {"node": n, "cert": str(self.pki.dir / f"{s}.pem"),
                             "key": str(self.pki.dir / f"{s}-key.pem")} for s, n in self.saes.items()}}


@contextlib.asynccontextmanager
async def running(workdir: Path, names: list[str], ready_bits: int = 8192, **kw):
    """An AppNet started, its links holding `ready_bits`, stopped on the way out."""
    n = AppNet(workdir, names, **kw)
    try:
        await n.start()
        await n.wait_ready(ready_bits)
        yield n
    finally:
        await n.stop()


class Client:
    """An application that knows only the manifest: its certificate, its node's base URLs."""

    def __init__(self, manifest: dict, sae: str, cert: str | None = None, key: str | None = None):
        entry = manifest["saes"].get(sae, {})
        self.sae = sae
        self.urls = manifest["nodes"][entry.get("node", "A")]
        ctx = ssl.create_default_context(cafile=manifest["ca"])
        ctx.load_cert_chain(cert or entry["cert"], key or entry["key"])
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))

    def at(self, node: str, manifest: dict) -> "Client":
        self.urls = manifest["nodes"][node]
        return self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self._session.close()

    async def _json(self, method: str, url: str, **kw):
        async with self._session.request(method, url, **kw) as r:
            return r.status, await r.json(content_type=None)

    # ETSI GS QKD 004
    async def call004(self, verb: str, body=None, raw: bytes | None = None):
        url = f"{self.urls['etsi004']}/etsi004/v1/{verb}"
        if raw is not None:
            return await self._json("POST", url, data=raw, headers={"Content-Type": "application/json"})
        return await self._json("POST", url, json=body)

    async def open_connect(self, source: str, destination: str, qos: dict | None = None, ksid: str | None = None):
        body = {"source": source, "destination": destination}
        if qos is not None:
            body["qos"] = qos
        if ksid is not None:
            body["key_stream_ID"] = ksid
        return await self.call004("open_connect", body)

    async def get_key(self, ksid: str, index: int | None = None, **extra):
        body = {"key_stream_ID": ksid, **extra}
        if index is not None:
            body["index"] = index
        return await self.call004("get_key", body)

    async def close(self, ksid: str):
        return await self.call004("close", {"key_stream_ID": ksid})

    # SKIP
    async def skip(self, path: str, **params):
        return await self._json("GET", f"{self.urls['skip']}{path}", params=params)

    # ETSI GS QKD 014
    async def status(self, slave: str):
        return await self._json("GET", f"{self.urls['etsi014']}/api/v1/keys/{slave}/status")

    async def dec_keys(self, master: str, key_ids: list[str]):
        return await self._json("POST", f"{self.urls['etsi014']}/api/v1/keys/{master}/dec_keys",
                                json={"key_IDs": [{"key_ID": k} for k in key_ids]})

    async def enc_keys(self, slave: str, number: int = 1, size: int = 256):
        return await self._json("POST", f"{self.urls['etsi014']}/api/v1/keys/{slave}/enc_keys",
                                json={"number": number, "size": size})
