"""An emulated QKD network on one machine: throwaway PKI, emulated devices (ETSI 014 KME pairs of
the IDQ and Toshiba profiles, CV-QKD module pairs on pseudo-terminals) and qkdnode daemons as
real processes on loopback, from a topology (config/demo-topology.toml for `qkdnode demo`),
described by WORKDIR/testbed.json.

The manifest is a contract with tools outside the project; its shape is:
  {"ca": PATH, "nodes": {NAME: {"etsi014": URL, "peer": URL, "metrics": URL|null, "sdn": URL|null,
   "etsi004": URL|null, "skip": URL|null, "pid": INT}},
   "saes": {SAE_ID: {"node": NAME, "cert": PATH, "key": PATH}},
   "controller": {"cert": PATH, "key": PATH}}
"sdn" is the base URL of the node's SDN agent: its ETSI GS QKD 015 model is at
SDN_URL/restconf/data/etsi-qkd-sdn-node:qkd_node, for the client certificate in "controller"
(commonName `sdn-controller`) only (docs/sdn.md).
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
import tomllib
from dataclasses import dataclass, field
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


_HANDED_OUT: set[int] = set()  # ports this process gave out: never twice, though nothing is bound to them yet


def free_port(host: str = HOST) -> int:
    """A free port below the kernel's ephemeral range: a port picked now and bound later by a
    node process cannot be taken meanwhile by some socket the kernel numbers itself, nor handed
    to another node of this process (it has not bound it yet either)."""
    lo, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(10000, lo)
        if port in _HANDED_OUT:
            continue
        _HANDED_OUT.add(port)
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
    etsi004_port: int
    skip_port: int
    proc: subprocess.Popen | None = None
    sdn_port: int = 0

    @property
    def sdn(self) -> str:
        return f"https://{HOST}:{self.sdn_port}"

    @property
    def etsi014(self) -> str:
        return f"https://{HOST}:{self.api_port}"


@dataclass(frozen=True)
class LinkSpec:
    """A QKD link of the emulated network: `master` pulls key and allocates; `devices` names the
    device pairs on its span: "idq" or "toshiba" (an ETSI 014 KME pair of that profile) or "cv"
    (a CV-QKD module pair on pseudo-terminals). Two devices make a combined link (XOR)."""

    id: str
    master: str
    slave: str
    devices: tuple[str, ...]
    switch: str | None = None   # the node whose optical switch the link's fibre runs through


@dataclass(frozen=True)
class SpareSpec:
    """A spare CV-QKD module pair for switched links on demand (docs/sdn.md): the transmitter at
    one node and the receiver at another, each attached to its node's optical switch, and a dark
    fibre of `fibre_loss_db` between the two switches. No link until the SDN controller asks."""

    id: str
    transmitter: str
    receiver: str
    fibre_loss_db: float = 7.0
    max_loss_db: float = 23.0   # the channel loss the modules make key through (HWDU CV-QKD: 23 dB)


@dataclass(frozen=True)
class Topology:
    nodes: dict[str, tuple[str, ...]]          # node -> its SAE IDs
    links: tuple[LinkSpec, ...]
    routes: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)  # node -> dest -> path
    osa: frozenset[str] = frozenset()          # nodes with an optical spectrum analyser on the quantum fibre
    spares: tuple[SpareSpec, ...] = ()         # spare CV-QKD pairs the SDN agent can switch into links
    sdn_channels: tuple[int, ...] = (34, 37, 38)  # DWDM channels for quantum links (the Madrid co-located domain's)

    @property
    def saes(self) -> dict[str, str]:
        return {sae: node for node, saes in self.nodes.items() for sae in saes}

    def neighbours(self, name: str) -> list[str]:
        return [l.slave if l.master == name else l.master for l in self.links if name in (l.master, l.slave)]

    def peers(self, name: str) -> list[str]:
        """The nodes `name` talks to: its neighbours, and the far ends of its spare pairs (a
        switched link needs the peer channel before it exists)."""
        far = [s.receiver if s.transmitter == name else s.transmitter for s in self.spares
               if name in (s.transmitter, s.receiver)]
        return list(dict.fromkeys(self.neighbours(name) + far))

    @property
    def switch_nodes(self) -> list[str]:
        return sorted({l.switch for l in self.links if l.switch} |
                      {n for s in self.spares for n in (s.transmitter, s.receiver)})


DEVICES = ("idq", "toshiba", "cv")


def two_nodes(profile: str = "idq") -> Topology:
    return Topology({"A": ("sae-a1", "sae-a2"), "B": ("sae-b1", "sae-b2")}, (LinkSpec("A-B", "A", "B", (profile,)),))


def load_topology(path: Path) -> Topology:
    """A topology file (config/demo-topology.toml is the default demo's)."""
    data = tomllib.loads(Path(path).read_text())
    try:
        nodes = {name: tuple(t.get("saes", ())) for name, t in data["nodes"].items()}
        links = tuple(LinkSpec(l["id"], l["master"], l["slave"], tuple(l["devices"]), l.get("switch"))
                      for l in data["links"])
        routes = {n: {d: tuple(p) for d, p in r.items()} for n, r in data.get("routes", {}).items()}
        osa = frozenset(name for name, t in data["nodes"].items() if t.get("osa") is True)
        spares = tuple(SpareSpec(s["id"], s["transmitter"], s["receiver"], float(s.get("fibre_loss_db", 7.0)),
                                 float(s.get("max_loss_db", 23.0))) for s in data.get("spares", ()))
        channels = tuple(data.get("sdn", {}).get("channels", (34, 37, 38)))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise RuntimeError(f"{path}: not a topology file ({exc!r})") from None
    for spare in spares:
        if spare.transmitter not in nodes or spare.receiver not in nodes or spare.transmitter == spare.receiver:
            raise RuntimeError(f"{path}: spare {spare.id}: transmitter and receiver must be two listed nodes")
    if not channels or not all(isinstance(c, int) and 17 <= c <= 61 for c in channels):
        raise RuntimeError(f"{path}: sdn.channels: ITU channel numbers from 17 to 61")
    for link in links:
        if link.master not in nodes or link.slave not in nodes or not link.devices or \
                len(link.devices) > 2 or any(d not in DEVICES for d in link.devices):
            raise RuntimeError(f"{path}: link {link.id}: nodes must be listed and devices one or two of {DEVICES}")
        if link.switch is not None and (link.switch not in (link.master, link.slave) or link.devices != ("cv",)):
            raise RuntimeError(f"{path}: link {link.id}: a switched link is a CV link through a switch at one end")
    return Topology(nodes, links, routes, osa, spares, channels)


DEFAULT_TOPOLOGY = Path(__file__).resolve().parent.parent / "config" / "demo-topology.toml"
UNLIMITED_CV_TIME_SCALE = 500.0  # CV-QKD pairs push blocks: emulated time this much faster (~3 Mb/s at 8 dB)


class Testbed:
    """An emulated network of qkdnode processes: two nodes A and B joined by one vendor link by
    default, or any `topology` (the demo's is shaped like part of the Madrid network)."""

    __test__ = False  # not a pytest class, despite its name

    def __init__(self, workdir: Path, *, rate_bps: float | None = 50_000.0, initial_keys: int = 256,
                 pool_target_bits: int = 1 << 17, profile: str = "idq", key_size: int = 256,
                 topology: Topology | None = None, cv_time_scale: float = 4.0, unlimited_key_rate: bool = False):
        if unlimited_key_rate:  # every link makes key as fast as it is asked for (benchmarks measure software)
            rate_bps, cv_time_scale = None, max(cv_time_scale, UNLIMITED_CV_TIME_SCALE)
        self.dir = Path(workdir).resolve()
        self.rate_bps, self.initial_keys = rate_bps, initial_keys
        self.pool_target_bits, self.profile, self.key_size = pool_target_bits, profile, key_size
        self.topology = topology or two_nodes(profile)
        self.SAES = self.topology.saes
        self.cv_time_scale = cv_time_scale
        self.nodes: dict[str, NodeProc] = {}
        self.devices: dict[str, list] = {}     # link id -> its emulated device pairs (KmePair or CvLink)
        self.sae_creds: dict[str, Credential] = {}
        self.node_creds: dict[str, Credential] = {}
        self.controller_cred: Credential | None = None   # the identity every node's SDN agent accepts
        self.spares: dict[str, object] = {}               # spare pair id -> its emulated CvLink
        self.manifest_path = self.dir / "testbed.json"

    @property
    def kme(self) -> KmePair | None:
        """The first ETSI 014 KME pair of the network (the only one of the two-node default)."""
        return next((d for ds in self.devices.values() for d in ds if isinstance(d, KmePair)), None)

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
        await self._start_optics()
        for link in self.topology.links:
            self.devices[link.id] = [await self._start_device(link, i, kind) for i, kind in enumerate(link.devices)]
        for spare in self.topology.spares:
            self.spares[spare.id] = await self._start_spare(spare)
        for sae in self.SAES:
            self.sae_creds[sae] = self.pki.issue(sae, sae)
        self.controller_cred = self.pki.issue("sdn-controller", self.CONTROLLER, client=True)
        for name in self.topology.nodes:
            self.nodes[name] = NodeProc(name, self.dir / name / "node.toml", self.dir / name / "node.log",
                                        free_port(), free_port(), free_port(), free_port(), free_port(),
                                        sdn_port=free_port())
        for name in self.nodes:
            self._write_node(name)
        for name in self.nodes:
            self.spawn(name)
        await asyncio.gather(*(self.wait_ready(n) for n in self.nodes))
        self.write_manifest()

    # Switched CV links: at their switch node, ingress port 2k+1 takes the fibre from the far end
    # and egress port 2k+17 goes to the CV module; ports 2 and 18 carry a classical channel.
    # Spare pairs take the next slots: at the transmitter's switch the module on ingress 2k+1 and
    # the fibre on egress 2k+17, at the receiver's the fibre on ingress 2k+1 and the module on egress 2k+17.
    CLASSICAL_PORTS = (2, 18)
    CONTROLLER = "sdn-controller"
    INSERTION_LOSS_DB = 1.0         # one pass through an emulated switch (PolatisModel's default)

    def _slots(self, node: str) -> list:
        return [l for l in self.topology.links if l.switch == node] + \
               [s for s in self.topology.spares if node in (s.transmitter, s.receiver)]

    def _switch_ports(self, link: LinkSpec) -> tuple[int, int]:
        k = self._slots(link.switch).index(link)
        return 2 * k + 1, 2 * k + 17  # odd ports: never the classical ones

    def spare_ports(self, spare: SpareSpec, node: str) -> dict[str, int]:
        """The ports of a spare pair's end at `node`: where its module and its fibre are attached,
        and the cross-connect a switched link needs there."""
        k = self._slots(node).index(spare)
        ingress, egress = 2 * k + 1, 2 * k + 17
        if node == spare.transmitter:
            return {"module": ingress, "fibre": egress, "ingress": ingress, "egress": egress}
        return {"module": egress, "fibre": ingress, "ingress": ingress, "egress": egress}

    async def _start_spare(self, spare: SpareSpec):
        """The spare pair's modules; their light reaches each other only through both switches."""
        from hil.cvqkd import CvLink
        tx_sw, rx_sw = self.switches[spare.transmitter], self.switches[spare.receiver]
        tx, rx = self.spare_ports(spare, spare.transmitter), self.spare_ports(spare, spare.receiver)

        def fibre() -> bool:
            return tx_sw.model.map.get(tx["ingress"]) == tx["egress"] and \
                rx_sw.model.map.get(rx["ingress"]) == rx["egress"]

        cv = CvLink(self.dir / "cv" / f"spare-{spare.id}",
                    channel_loss_db=spare.fibre_loss_db + 2 * self.INSERTION_LOSS_DB,
                    tune_seconds=2.0, time_scale=self.cv_time_scale, name="cv", fibre=fibre)
        return await cv.start()

    async def _start_optics(self) -> None:
        from hil.osa import Aq6370Emulator
        from hil.switch import PolatisEmulator
        self.switches: dict[str, PolatisEmulator] = {}
        self.osas: dict[str, Aq6370Emulator] = {}
        for node in self.topology.switch_nodes:
            sw = PolatisEmulator(ingress=16, egress=16, serial=f"EMU-{node}", insertion_loss_db=self.INSERTION_LOSS_DB)
            await sw.start(HOST)
            sw.model.map[self.CLASSICAL_PORTS[0]] = self.CLASSICAL_PORTS[1]  # live classical traffic
            self.switches[node] = sw
        for node in sorted(self.topology.osa):
            osa = Aq6370Emulator(sweep_time=0.5)
            await osa.start(HOST)
            self.osas[node] = osa

    async def _start_device(self, link: LinkSpec, i: int, kind: str):
        if kind == "cv":
            from hil.cvqkd import CvLink
            fibre = None
            if link.switch:
                sw, (port_in, port_out) = self.switches[link.switch], self._switch_ports(link)
                fibre = lambda: sw.model.map.get(port_in) == port_out  # noqa: E731
            cv = CvLink(self.dir / "cv" / f"{link.id}-{i}", channel_loss_db=8.0, tune_seconds=2.0,
                        time_scale=self.cv_time_scale, name="cv", fibre=fibre)
            return await cv.start()
        tag = f"{link.id.lower()}-{i}"
        creds = [self.pki.issue(f"kme-{tag}-{side}", f"KME-{tag}-{side}", hosts=(f"kme-{tag}-{side}.lab",),
                                server=True, client=False) for side in ("a", "b")]
        pair = KmePair(sae_a=f"qkdnode-{link.master}", sae_b=f"qkdnode-{link.slave}", profile=kind,
                       rate_bps=self.rate_bps, max_key_count=8192, initial_keys=self.initial_keys,
                       key_size=self.key_size, kme_ids=(f"KME-{tag}-a", f"KME-{tag}-b"))
        await pair.start(_server_ssl(self.pki, creds[0]), _server_ssl(self.pki, creds[1]))
        return pair

    def _device_settings(self, link: LinkSpec, i: int, name: str) -> dict:
        kind, dev = link.devices[i], self.devices[link.id][i]
        master = name == link.master
        if kind == "cv":
            m = dev.tx if master else dev.rx
            return {"driver": "cvqkd-serial",
                    "settings": {"port": str(m.port), "role": "transmitter" if master else "receiver",
                                 "itu_channel": 34, "poll_interval": 1.0}}
        side, tag = ("a" if master else "b"), f"{link.id.lower()}-{i}"
        other = link.slave if master else link.master
        return {"driver": "etsi014",
                "settings": {"profile": kind, "url": dev.url("A" if master else "B"),
                             "server_hostname": f"kme-{tag}-{side}.lab", "sae_id": f"qkdnode-{name}",
                             "peer_sae_id": f"qkdnode-{other}", "ca": str(self.pki.ca),
                             "cert": str(self._kme_client[name].cert), "key": str(self._kme_client[name].key)}}

    def _write_node(self, name: str) -> None:
        n = self.nodes[name]
        d = n.config.parent
        d.mkdir(parents=True, exist_ok=True)
        # All nodes listen on 127.0.0.1, so the peer channel verifies a name only this node's certificate has.
        node_cred = self.pki.issue(f"node-{name}", name, hosts=(HOST, "localhost", self.node_hostname(name)),
                                   server=True, client=True)
        self.node_creds[name] = node_cred
        self._kme_client = getattr(self, "_kme_client", {})
        self._kme_client[name] = self.pki.issue(f"kme-client-{name}", f"qkdnode-{name}")
        write_private(d / "master.key", os.urandom(32).hex().encode() + b"\n")
        text = [f"""# Node {name} of the emulated testbed (written by qkdnode demo; throwaway)
node_id = "{name}"

[api]
listen = "{HOST}:{n.api_port}"

[peer]
listen = "{HOST}:{n.peer_port}"

[metrics]
listen = "{HOST}:{n.metrics_port}"

[etsi004]
listen = "{HOST}:{n.etsi004_port}"

[skip]
listen = "{HOST}:{n.skip_port}"

[sdn]
listen = "{HOST}:{n.sdn_port}"
controller = "{self.CONTROLLER}"
channels = {json.dumps(list(self.topology.sdn_channels))}
pool_target_bits = {self.pool_target_bits}
fetch_interval = 0.2
{self._fibres_config(name)}
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
"""]
        for other in self.topology.peers(name):
            o = self.nodes[other]
            text.append(f"""
[peers.{other}]
url = "https://{HOST}:{o.peer_port}"
server_hostname = "{self.node_hostname(other)}"
""")
        for link in self.topology.links:
            if name not in (link.master, link.slave):
                continue
            other = link.slave if name == link.master else link.master
            parts = [self._device_settings(link, i, name) for i in range(len(link.devices))]
            driver = parts[0] if len(parts) == 1 else {"driver": "combined", "settings": {"parts": parts}}
            text.append(f"""
[[links]]
id = "{link.id}"
peer = "{other}"
role = "{'master' if name == link.master else 'slave'}"
driver = "{driver['driver']}"
pool_target_bits = {self.pool_target_bits}
fetch_interval = 0.2
settings = {_toml_inline(driver['settings'])}
""")
        text.append(self._optics_config(name))
        text.append("\n[saes]\n" + "\n".join(f'"{s}" = "{node}"' for s, node in self.SAES.items()) + "\n")
        routes = self.topology.routes.get(name, {})
        if routes:
            text.append("\n[routes]\n" + "\n".join(f'{dest} = {json.dumps(list(path))}'
                                                    for dest, path in routes.items()) + "\n")
        n.config.write_text("".join(text))

    def _fibres_config(self, name: str) -> str:
        out = []
        for spare in self.topology.spares:
            if name not in (spare.transmitter, spare.receiver):
                continue
            other = spare.receiver if name == spare.transmitter else spare.transmitter
            out.append(f"""
[[sdn.fibres]]
switch = "sw-{name}"
port = {self.spare_ports(spare, name)["fibre"]}
node = "{other}"
remote_port = {self.spare_ports(spare, other)["fibre"]}
loss_db = {spare.fibre_loss_db!r}
""")
        return "".join(out)

    @staticmethod
    def spare_module_id(spare: SpareSpec, node: str) -> str:
        return f"cv-{spare.id.lower()}-{'tx' if node == spare.transmitter else 'rx'}"

    def _optics_config(self, name: str) -> str:
        out = []
        if name in self.switches:
            pairs = {str(a): b for a, b in (self._switch_ports(l) for l in self.topology.links if l.switch == name)}
            settings = {"resource": self.switches[name].resource, "classical_ports": list(self.CLASSICAL_PORTS)}
            out.append(f"""
[[devices]]
id = "sw-{name}"
kind = "switch"
driver = "polatis-scpi"
poll_interval = 1.0
insertion_loss_db = {self.INSERTION_LOSS_DB!r}
cross_connects = {_toml_inline(pairs)}
settings = {_toml_inline(settings)}
""")
        for spare in self.topology.spares:
            if name not in (spare.transmitter, spare.receiver):
                continue
            tx = name == spare.transmitter
            m = self.spares[spare.id].tx if tx else self.spares[spare.id].rx
            settings = {"port": str(m.port), "role": "transmitter" if tx else "receiver", "autostart": False,
                        "poll_interval": 1.0}
            out.append(f"""
[[devices]]
id = "{self.spare_module_id(spare, name)}"
kind = "cvqkd"
driver = "cvqkd-serial"
poll_interval = 1.0
switch = "sw-{name}"
switch_port = {self.spare_ports(spare, name)["module"]}
max_loss_db = {spare.max_loss_db!r}
settings = {_toml_inline(settings)}
""")
        if name in self.osas:
            out.append(f"""
[[devices]]
id = "osa-{name}"
kind = "osa"
driver = "aq6370"
poll_interval = 3.0
quantum_channels = [34]
quantum_alarm_dbm = -50.0
settings = {_toml_inline({"resource": self.osas[name].resource})}
""")
        return "".join(out)

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
            # This wait blocks the loop the emulated devices run on: a node stopping cleanly while
            # one of its calls to them is in flight waits for that call to time out, and its
            # listeners for handlers in flight (aiohttp gives them up to 60 s).
            proc.wait(timeout=90)

    async def restart(self, name: str) -> None:
        self.spawn(name)
        await self.wait_ready(name)
        self.write_manifest()

    async def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        """Until the node answers an SAE's ETSI 014 status call with 200."""
        n = self.nodes[name]
        sae = next(s for s, node in self.SAES.items() if node == name)
        neighbours = self.topology.peers(name)
        peer_sae = next(s for s, node in self.SAES.items() if node in neighbours)
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
                             "metrics": f"http://{HOST}:{n.metrics_port}/metrics", "sdn": n.sdn,
                             "etsi004": f"https://{HOST}:{n.etsi004_port}", "skip": f"https://{HOST}:{n.skip_port}",
                             "pid": n.proc.pid} for name, n in self.nodes.items()},
            "saes": {sae: {"node": node, "cert": str(self.sae_creds[sae].cert), "key": str(self.sae_creds[sae].key)}
                     for sae, node in self.SAES.items()},
            "controller": {"cert": str(self.controller_cred.cert), "key": str(self.controller_cred.key)},
        }

    def write_manifest(self) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.manifest(), indent=2) + "\n")
        tmp.replace(self.manifest_path)

    async def stop(self) -> None:
        # Every node at once, and waited for without blocking the event loop: the emulated devices
        # run on this loop, and a node finishing a call to one of them must get its answer.
        running = [n.proc for n in self.nodes.values() if n.proc and n.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while any(proc.poll() is None for proc in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for devices in self.devices.values():
            for dev in devices:
                await dev.stop()
        for cv in self.spares.values():
            await cv.stop()
        for optic in [*getattr(self, "switches", {}).values(), *getattr(self, "osas", {}).values()]:
            await optic.stop()


def _toml_inline(value) -> str:
    """A TOML inline value (tables, arrays, strings, numbers, booleans) for driver settings."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_inline(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


async def run_demo(workdir: Path, duration: float | None, rate_bps: float, topology: Path | None = None,
                   unlimited_key_rate: bool = False) -> int:
    try:
        topo = load_topology(topology or DEFAULT_TOPOLOGY)
    except (OSError, tomllib.TOMLDecodeError, RuntimeError) as exc:
        print(f"qkdnode demo: {exc}", file=sys.stderr)
        return 1
    tb = Testbed(workdir, rate_bps=rate_bps, topology=topo, unlimited_key_rate=unlimited_key_rate)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await tb.start()
        m = tb.manifest()
        names = list(m["nodes"])
        first = names[0]
        # The node farthest from the first one shows relay: a key crosses trusted nodes to reach it.
        far = max(names[1:], key=lambda n: _hops(topo, first, n))
        master = next(s for s, n in tb.SAES.items() if n == first)
        slave = next(s for s, n in tb.SAES.items() if n == far)
        a, b = m["saes"][master], m["saes"][slave]
        links = ", ".join(f"{l.id} ({'+'.join(l.devices)}{f', through the switch of node {l.switch}' if l.switch else ''})"
                          for l in topo.links)
        optics = "".join(f"\nNode {n}'s spectrum analyser: qkdnode spectrum --node {n} --workdir {tb.dir} --out spectrum-{n}.png"
                         for n in sorted(topo.osa))
        print(f"manifest: {tb.manifest_path}", flush=True)
        print(f"""
Nodes {', '.join(names)} run on loopback; links: {links}. Logs: {tb.dir}/NODE/node.log
Node {far} is {_hops(topo, first, far)} hop(s) from node {first}: its keys are relayed through trusted nodes.
Fetch a key for {slave} from node {first} as {master}, then the same key from node {far} as {slave}:

  curl --cacert {m['ca']} --cert {a['cert']} --key {a['key']} \\
       '{m['nodes'][first]['etsi014']}/api/v1/keys/{slave}/enc_keys?number=1&size=256'
  curl --cacert {m['ca']} --cert {b['cert']} --key {b['key']} \\
       '{m['nodes'][far]['etsi014']}/api/v1/keys/{master}/dec_keys?key_ID=KEY_ID_FROM_THE_FIRST_ANSWER'

Metrics: {'  '.join(n['metrics'] for n in m['nodes'].values())}{optics}
{_sdn_hint(topo, tb.manifest_path)}
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


def _sdn_hint(topo: Topology, manifest: Path) -> str:
    if not topo.spares:
        return ""
    s = topo.spares[0]
    return (f"\nNodes {s.transmitter} and {s.receiver} share a spare CV-QKD pair: as the SDN controller, make a direct "
            f"link between them\n(and `unlink NODE QKDL_ID` again):\n\n  {sys.executable} -m hil.controller "
            f"--manifest {manifest} link {s.transmitter} {s.receiver} --wait\n")


def _hops(topo: Topology, a: str, b: str) -> int:
    seen, frontier, n = {a}, [a], 0
    while frontier:
        if b in frontier:
            return n
        frontier = [y for x in frontier for y in topo.neighbours(x) if y not in seen]
        seen.update(frontier)
        n += 1
    return 0
