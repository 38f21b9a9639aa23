"""An emulated QKD network on one machine: throwaway PKI, an emulated KME pair, and two qkdnode
daemons (nodes A and B) as real processes on loopback, described by WORKDIR/testbed.json.

The manifest is a contract with tools outside the project; its shape is:
  {"ca": PATH, "nodes": {NAME: {"etsi014": URL, "peer": URL, "metrics": URL|null, "sdn": URL|null,
   "pid": INT}}, "saes": {SAE_ID: {"node": NAME, "cert": PATH, "key": PATH}}}
It is written (atomically) only once every node answers, and again when a node is restarted.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from hil.kme import KmePair
from hil.pki import Credential, ThrowawayPKI, write_private

MARKER = ".qkdnode-demo"
HOST = "127.0.0.1"


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = HOST) -> int:
    """A free port below the kernel's ephemeral range: a port picked now and bound later by a
    node process cannot be taken meanwhile by some socket the kernel numbers itself."""
    lo, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(10000, lo)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found on {host} below {lo}")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the testbed dies, so no node outlives a killed demo."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _server_ssl(pki: ThrowawayPKI, cred: Credential) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cred.cert), str(cred.key))
    return ctx


@dataclass
class NodeProc:
    name: str
    config: Path
    log: Path
    api_port: int
    peer_port: int
    metrics_port: int
    proc: subprocess.Popen | None = None

    @property
    def etsi014(self) -> str:
        return f"https://{HOST}:{self.api_port}"


class Testbed:
    """Nodes A and B joined by one emulated vendor link (A is the link's master end)."""

    SAES = {"sae-a1": "A", "sae-a2": "A", "sae-b1": "B", "sae-b2": "B"}

    def __init__(self, workdir: Path, *, rate_bps: float | None = 50_000.0, initial_keys: int = 256,
                 pool_target_bits: int = 1 << 17, profile: str = "idq", key_size: int = 256):
        self.dir = Path(workdir).resolve()
        self.rate_bps, self.initial_keys = rate_bps, initial_keys
        self.pool_target_bits, self.profile, self.key_size = pool_target_bits, profile, key_size
        self.nodes: dict[str, NodeProc] = {}
        self.kme: KmePair | None = None
        self.sae_creds: dict[str, Credential] = {}
        self.manifest_path = self.dir / "testbed.json"

    # -- set-up

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if any(self.dir.iterdir()) and not (self.dir / MARKER).exists():
            raise RuntimeError(f"{self.dir} is not empty and was not made by `qkdnode demo`; choose another --workdir")
        for child in self.dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        (self.dir / MARKER).write_text("made by qkdnode demo; everything here is throwaway\n")
        self.pki = ThrowawayPKI(self.dir / "pki")

    async def start(self) -> None:
        self._prepare()
        pki = self.pki
        kme_a = pki.issue("kme-a", "KME-A", hosts=("kme-a.lab",), server=True, client=False)
        kme_b = pki.issue("kme-b", "KME-B", hosts=("kme-b.lab",), server=True, client=False)
        self.kme = KmePair(sae_a="qkdnode-A", sae_b="qkdnode-B", profile=self.profile, rate_bps=self.rate_bps,
                           max_key_count=8192, initial_keys=self.initial_keys, key_size=self.key_size)
        await self.kme.start(_server_ssl(pki, kme_a), _server_ssl(pki, kme_b))
        for sae in self.SAES:
            self.sae_creds[sae] = pki.issue(sae, sae)
        for name in ("A", "B"):
            self.nodes[name] = NodeProc(name, self.dir / name / "node.toml", self.dir / name / "node.log",
                                        free_port(), free_port(), free_port())
        for name in self.nodes:
            self._write_node(name)
        for name in self.nodes:
            self.spawn(name)
        await asyncio.gather(*(self.wait_ready(n) for n in self.nodes))
        self.write_manifest()

    def _write_node(self, name: str) -> None:
        other = "B" if name == "A" else "A"
        n, o = self.nodes[name], self.nodes[other]
        d = n.config.parent
        d.mkdir(parents=True, exist_ok=True)
        # Both nodes listen on 127.0.0.1, so the peer channel verifies a name only this node's certificate has.
        node_cred = self.pki.issue(f"node-{name}", name, hosts=(HOST, "localhost", self.node_hostname(name)),
                                   server=True, client=True)
        kme_client = self.pki.issue(f"kme-client-{name}", f"qkdnode-{name}")
        write_private(d / "master.key", os.urandom(32).hex().encode() + b"\n")
        saes = "\n".join(f'"{s}" = "{node}"' for s, node in self.SAES.items())
        n.config.write_text(f"""# Node {name} of the emulated testbed (written by qkdnode demo; throwaway)
node_id = "{name}"

[api]
listen = "{HOST}:{n.api_port}"

[peer]
listen = "{HOST}:{n.peer_port}"

[metrics]
listen = "{HOST}:{n.metrics_port}"

[tls]
ca = "{self.pki.ca}"
cert = "{node_cred.cert}"
key = "{node_cred.key}"

[vault]
path = "vault.db"
master_key_file = "master.key"

[keys]
key_size = 256
min_key_size = 64
max_key_size = 8192
max_key_per_request = 128
max_SAE_ID_count = 4

[peers.{other}]
url = "https://{HOST}:{o.peer_port}"
server_hostname = "{self.node_hostname(other)}"

[[links]]
id = "A-B"
peer = "{other}"
role = "{'master' if name == 'A' else 'slave'}"
driver = "etsi014"
pool_target_bits = {self.pool_target_bits}
fetch_interval = 0.2

[links.settings]
profile = "{self.profile}"
url = "{self.kme.url(name)}"
server_hostname = "kme-{name.lower()}.lab"
sae_id = "qkdnode-{name}"
peer_sae_id = "qkdnode-{other}"
ca = "{self.pki.ca}"
cert = "{kme_client.cert}"
key = "{kme_client.key}"

[saes]
{saes}
""")

    @staticmethod
    def node_hostname(name: str) -> str:
        return f"node-{name.lower()}.qkd.test"

    # -- node processes

    def spawn(self, name: str) -> None:
        n = self.nodes[name]
        logf = open(n.log, "ab")
        n.proc = subprocess.Popen([sys.executable, "-m", "qkdnode", "run", "--config", str(n.config)],
                                  stdout=logf, stderr=subprocess.STDOUT, cwd=n.config.parent,
                                  preexec_fn=_die_with_parent)
        logf.close()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.nodes[name].proc
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    async def restart(self, name: str) -> None:
        self.spawn(name)
        await self.wait_ready(name)
        self.write_manifest()

    async def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        """Until the node answers an SAE's ETSI 014 status call with 200."""
        n = self.nodes[name]
        sae = next(s for s, node in self.SAES.items() if node == name)
        peer_sae = next(s for s, node in self.SAES.items() if node != name)
        ctx = self.sae_ssl(sae)
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            while True:
                if n.proc.poll() is not None:
                    raise RuntimeError(f"node {name} exited with {n.proc.returncode}; its log {n.log} ends:\n"
                                       + n.log.read_text()[-2000:])
                try:
                    async with session.get(f"{n.etsi014}/api/v1/keys/{peer_sae}/status",
                                           timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {name} did not answer within {timeout} s; see {n.log}")
                await asyncio.sleep(0.1)

    def sae_ssl(self, sae: str) -> ssl.SSLContext:
        cred = self.sae_creds[sae]
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(str(cred.cert), str(cred.key))
        return ctx

    def manifest(self) -> dict:
        return {
            "ca": str(self.pki.ca),
            "nodes": {name: {"etsi014": n.etsi014, "peer": f"https://{HOST}:{n.peer_port}",
                             "metrics": f"http://{HOST}:{n.metrics_port}/metrics", "sdn": None,
                             "pid": n.proc.pid} for name, n in self.nodes.items()},
            "saes": {sae: {"node": node, "cert": str(self.sae_creds[sae].cert), "key": str(self.sae_creds[sae].key)}
                     for sae, node in self.SAES.items()},
        }

    def write_manifest(self) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.manifest(), indent=2) + "\n")
        tmp.replace(self.manifest_path)

    async def stop(self) -> None:
        for name in self.nodes:
            self.kill(name, signal.SIGTERM)
        if self.kme:
            await self.kme.stop()


async def run_demo(workdir: Path, duration: float | None, rate_bps: float) -> int:
    tb = Testbed(workdir, rate_bps=rate_bps)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await tb.start()
        m = tb.manifest()
        a, b = m["saes"]["sae-a1"], m["saes"]["sae-b1"]
        print(f"manifest: {tb.manifest_path}", flush=True)
        print(f"""
Nodes A and B run on loopback, joined by an emulated QKD link ({rate_bps:g} bit/s). Logs: {tb.dir}/A/node.log, {tb.dir}/B/node.log
Fetch a key for sae-b1 from node A as sae-a1, then the same key from node B as sae-b1:

  curl --cacert {m['ca']} --cert {a['cert']} --key {a['key']} \\
       '{m['nodes']['A']['etsi014']}/api/v1/keys/sae-b1/enc_keys?number=1&size=256'
  curl --cacert {m['ca']} --cert {b['cert']} --key {b['key']} \\
       '{m['nodes']['B']['etsi014']}/api/v1/keys/sae-a1/dec_keys?key_ID=KEY_ID_FROM_THE_FIRST_ANSWER'

Metrics: {m['nodes']['A']['metrics']}  {m['nodes']['B']['metrics']}
{'Stopping after %g s.' % duration if duration else 'Ctrl-C stops the network.'}
""", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), timeout=duration)
        except asyncio.TimeoutError:
            pass
        return 0
    except RuntimeError as exc:
        print(f"qkdnode demo: {exc}", file=sys.stderr)
        return 1
    finally:
        await tb.stop()
