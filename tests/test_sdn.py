"""The SDN agent as the controller of a QKD network meets it (docs/sdn.md): the ETSI GS QKD 015
node model over HTTPS with its own certificate, a direct CV-QKD link switched on demand between
two nodes that were joined only through relays, keys on it, its deletion, and the requests the
agents refuse without touching a switch. Every node is a process; the controller is
hil/controller.py, which knows nothing but the manifest and the agents' interface."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from hil.controller import Controller, SdnError
from hil.testbed import DEFAULT_TOPOLOGY, LinkSpec, SpareSpec, Testbed, Topology, load_topology
from qkdnode import config
from qkdnode.errors import ConfigError
from tests.conftest import scrape, wait_for
from tests.ops_support import config_of
from tests.sae_client import SaeClient, bits

T = "etsi-qkdn-types:"
NODE = "/restconf/data/etsi-qkd-sdn-node:qkd_node"


def metric(tb: Testbed, node: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    values = scrape(tb.manifest()["nodes"][node]["metrics"])
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{") and want in k)


def maps(tb: Testbed) -> dict[str, dict[int, int]]:
    """Every switch's cross-connects, read from the (emulated) switch itself."""
    return {node: dict(sw.model.map) for node, sw in tb.switches.items()}


def interface(model: dict, device: str) -> int:
    return next(i["qkdi_id"] for i in model["qkd_interfaces"]["qkd_interface"] if i.get("qkdnode:device") == device)


def phys_link_to(model: dict, ctl: Controller, node: str) -> dict | None:
    return next((lk for lk in model["qkd_links"]["qkd_link"] if lk["qkdl_type"] == T + "PHYS"
                 and ctl.node_of(lk["qkdl_remote"]["qkdn_id"]) == node), None)


async def get_keys(client: SaeClient, slave: str, number: int = 2, timeout: float = 60.0) -> dict:
    async def attempt():
        status, answer = await client.enc_keys(slave, number=number, size=256)
        return status == 200 and answer
    return await wait_for(attempt, timeout=timeout, interval=0.3)


class Events:
    """Every notification of one node, collected in the background by the reference controller."""

    def __init__(self, ctl: Controller, node: str):
        self.items: list[tuple[str, dict]] = []
        self.raw: list[str] = []
        self.opened = asyncio.Event()
        self._task = asyncio.create_task(self._run(ctl, node))

    async def _run(self, ctl: Controller, node: str) -> None:
        async for name, body in ctl.events(node, opened=self.opened):
            self.items.append((name, body))
            self.raw.append(json.dumps(body))

    def names(self, **match) -> list[str]:
        return [n for n, b in self.items if all(b.get(k) == v for k, v in match.items())]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def demo(tmp_path):
    tb = Testbed(tmp_path / "demo", topology=load_topology(DEFAULT_TOPOLOGY))
    await tb.start()
    yield tb
    await tb.stop()


async def test_a_controller_switches_a_direct_cv_link_between_two_relayed_nodes_and_takes_it_away(demo):
    """A and C share no link in the demo: keys between their SAEs are relayed (via B or D). The
    controller asks A for a direct link to C: both nodes set their switches, tune their spare CV
    modules to a free channel (34 is the D-C link's at C) and start them; keys then flow on the
    new link. Deleting it restores both switch maps exactly, and keys are relayed again."""
    m = demo.manifest()
    await wait_for(lambda: asyncio.sleep(0, demo.switches["C"].model.map.get(1) == 17), timeout=30)  # D-C's
    before = maps(demo)
    async with Controller.from_manifest(m) as ctl, SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-c1") as c:
        topo = await ctl.topology()
        assert phys_link_to(topo["A"], ctl, "C") is None
        virtual = [lk for lk in topo["A"]["qkd_links"]["qkd_link"] if lk["qkdl_type"] == T + "VIRT"
                   and ctl.node_of(lk["qkdl_remote"]["qkdn_id"]) == "C"]
        assert len(virtual) == 1                     # C is reached by key relay
        assert ("A", "C") in await ctl.spare_pairs()

        relayed = await get_keys(a, "sae-c1")
        relayed_paths = metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C")
        assert relayed_paths >= 2 and metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C", path="A>C") == 0

        events_a, events_c = Events(ctl, "A"), Events(ctl, "C")
        await asyncio.wait_for(asyncio.gather(events_a.opened.wait(), events_c.opened.wait()), 10)
        link = await ctl.create_link("A", "C")
        qkdl_id = link["qkdl_id"]
        assert link["qkdl_status"] == T + "PENDING" and link["qkdl_type"] == T + "PHYS"
        assert link["phys_wavelength"] == "37"       # 34 is taken at C by the D-C link
        assert link["phys_channel_att"] == pytest.approx(9.0)  # 7 dB of fibre, 1 dB per switch
        assert link["phys_qkd_role"] == T + "TRANSMITTER"
        # Each node set its own switch; nothing else on either switch moved (the classical 2->18 neither).
        now = maps(demo)
        assert now["A"] == {**before["A"], 1: 17} and now["C"] == {**before["C"], 3: 19}
        assert demo.spares["A-C"].tx.channel == demo.spares["A-C"].rx.channel == 37

        up = await ctl.wait_link_status("A", qkdl_id, "ACTIVE", timeout=120)  # when its pool has filled
        assert up["qkdnode:ready_bits"] >= demo.pool_target_bits
        await ctl.wait_link_status("C", qkdl_id, "ACTIVE", timeout=60)

        direct = await get_keys(a, "sae-c1", number=3)
        status, got = await c.dec_keys("sae-a1", [k["key_ID"] for k in direct["keys"]])
        assert status == 200 and bits(got) == bits(direct)
        assert metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C", path="A>C") == 3
        assert metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C") == relayed_paths + 3

        # The operator's `qkdnode status` lists the switched link beside the configured ones.
        shown = await status_links(m, "A")
        assert qkdl_id in shown and shown[qkdl_id]["switched"] is True, shown
        assert (shown[qkdl_id]["peer"], shown[qkdl_id]["role"]) == ("C", "master")
        assert shown[qkdl_id]["pool"]["ready_bits"] > 0 and shown[qkdl_id]["device"] == "up"
        assert not any(ln["switched"] for lid, ln in shown.items() if lid != qkdl_id)

        model = await ctl.model("A")
        entry = phys_link_to(model, ctl, "C")
        assert entry["qkdl_id"] == qkdl_id and entry["qkdnode:consumed_bits"] >= 3 * 256
        assert entry["qkdl_local"]["qkdi_id"] == interface(model, "cv-a-c-tx")
        app = next(x for x in model["qkd_applications"]["qkd_app"]
                   if x["server_app_id"] == "sae-a1" and x["client_app_id"] == ["sae-c1"])
        assert app["backing_qkdl_id"] == [qkdl_id] and app["app_type"] == T + "CLIENT"
        await wait_for(lambda: asyncio.sleep(0, "sdqkdn_application_new" in events_a.names()), timeout=10)

        # No key material, and no key_ID, in the model or the notifications.
        seen = json.dumps(model) + json.dumps(await ctl.model("C")) + "".join(events_a.raw + events_c.raw)
        for answer in (relayed, direct):
            for k in answer["keys"]:
                assert k["key_ID"] not in seen and k["key"] not in seen
                assert base64.b64decode(k["key"]).hex() not in seen

        # The node keeps its switched link across a restart: same cross-connects, same channel, keys again.
        demo.kill("C", signal.SIGKILL)
        demo.spares["A-C"].rx.power_cycle()            # and the module forgets its settings meanwhile
        await demo.restart("C")
        assert maps(demo)["C"] == now["C"]
        await ctl.wait_link_status("C", qkdl_id, "ACTIVE", timeout=120)
        await wait_for(lambda: asyncio.sleep(0, demo.spares["A-C"].rx.channel == 37), timeout=30)

        async def direct_again():                    # until a request goes over the link again, not around it
            direct = metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C", path="A>C")
            answer = await get_keys(a, "sae-c1", number=1, timeout=60)
            status, got = await c.dec_keys("sae-a1", [k["key_ID"] for k in answer["keys"]])
            assert status == 200 and bits(got) == bits(answer)
            return metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C", path="A>C") > direct
        await wait_for(direct_again, timeout=120, interval=0.5)

        await ctl.delete_link("A", qkdl_id)
        assert maps(demo) == before                  # both switch maps exactly as they were
        assert demo.spares["A-C"].tx.state == demo.spares["A-C"].rx.state == "idle"
        for node in ("A", "C"):
            assert phys_link_to(await ctl.model(node), ctl, "C" if node == "A" else "A") is None
        await wait_for(lambda: asyncio.sleep(0, "sdqkdn_link_down" in events_a.names(qkdl_id=qkdl_id)), timeout=10)
        names = events_a.names(qkdl_id=qkdl_id)
        assert names[0] == "sdqkdn_link_new" and "sdqkdn_link_status_update" in names
        assert any(n == "sdqkdn_device_status_update" and b.get("qkdnode:device") == "sw-A"
                   and b.get("qkdnode:cross_connects", {}).get("1") == 17 for n, b in events_a.items)
        with pytest.raises(SdnError) as info:
            await ctl.delete_link("A", qkdl_id)
        assert info.value.status == 404
        assert qkdl_id not in await status_links(m, "A")

        direct = metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C", path="A>C")
        total = metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C")
        await get_keys(a, "sae-c1", number=1)        # relayed again
        assert metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C", path="A>C") == direct
        assert metric(demo, "A", "qkdnode_relay_route_keys_total", dest="C") == total + 1
        assert metric(demo, "A", "qkdnode_sdn_requests_total", operation="create", result="done") == 1
        assert metric(demo, "A", "qkdnode_sdn_requests_total", operation="delete", result="done") == 1
        await events_a.close()
        await events_c.close()


async def status_links(m: dict, node: str) -> dict[str, dict]:
    """The links `qkdnode status --config FILE --json` reports for a running node, by ID."""
    proc = await asyncio.create_subprocess_exec(str(Path(sys.executable).parent / "qkdnode"), "status", "--config",
                                                str(config_of(m["nodes"][node])), "--json",
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return {ln["id"]: ln for ln in json.loads(out)["links"]}


# ------------------------------------------------------------------ refusals

# A and C share two spare pairs on two fibres (7 dB and 26 dB); one pair is of an older kind that
# makes key through 8 dB at most, less than any path (1 dB per switch on top of the fibre). C's
# switch carries the static D-C CV link on channel 34 and a classical channel on ports 2 -> 18;
# the only quantum channel is 34.
REFUSALS = Topology(
    {"A": ("sae-a1",), "C": ("sae-c1",), "D": ("sae-d1",)},
    (LinkSpec("D-C", "D", "C", ("cv",), switch="C"),),
    spares=(SpareSpec("ac", "A", "C", 7.0), SpareSpec("ac-old", "A", "C", 26.0, max_loss_db=8.0)),
    sdn_channels=(34,))


@pytest.fixture
async def net(tmp_path):
    tb = Testbed(tmp_path / "net", topology=REFUSALS)
    await tb.start()
    yield tb
    await tb.stop()


async def test_requests_that_would_disturb_light_exceed_the_budget_or_find_no_channel_change_nothing(net):
    m = net.manifest()
    async with Controller.from_manifest(m) as ctl:
        topo = await ctl.topology()
        spare = REFUSALS.spares[0]
        ids = {s.id: tuple(interface(topo[n], net.spare_module_id(s, n)) for n in ("A", "C"))
               for s in REFUSALS.spares}
        await wait_for(lambda: asyncio.sleep(0, net.switches["C"].model.map.get(1) == 17), timeout=30)

        async def refused(pair: str, **kw) -> SdnError:
            before = maps(net)
            with pytest.raises(SdnError) as info:
                await ctl.create_link("A", "C", local_qkdi_id=ids[pair][0], remote_qkdi_id=ids[pair][1], **kw)
            assert maps(net) == before, "a refused request changed a switch"
            for node, other in (("A", "C"), ("C", "A")):
                assert phys_link_to(await ctl.model(node), ctl, other) is None
            assert net.spares[pair].tx.state == net.spares[pair].rx.state == "idle"
            return info.value

        # Someone re-patched C's classical channel onto the port of the spare receiver: the link
        # would cut it. Refused, and neither switch is touched.
        sw = net.switches["C"]
        rx_port = net.spare_ports(spare, "C")["module"]
        sw.model.map[2] = rx_port
        err = await refused("ac")
        assert err.status == 409 and err.tag == "resource-denied"
        assert "classical traffic" in err.message and f"port {rx_port}" in err.message
        sw.model.map[2] = 18

        err = await refused("ac-old")                # over either fibre: 9 dB and 28 dB, the modules take 8
        assert err.status == 409 and "loss budget exceeded: 9.0 dB" in err.message
        assert "loss budget exceeded: 28.0 dB" in err.message and "at most 8 dB" in err.message

        err = await refused("ac")                    # 34 is the D-C link's at C
        assert err.status == 409 and "no free channel" in err.message
        err = await refused("ac", wavelength=34)
        assert err.status == 409 and "channel 34 is in use at node C" in err.message
        assert metric(net, "A", "qkdnode_sdn_requests_total", operation="create", result="refused") == 4

        # And without naming modules: the agent tries both pairs and says why each cannot be used.
        before = maps(net)
        with pytest.raises(SdnError) as info:
            await ctl.create_link("A", "C")
        assert "no free channel" in info.value.message and maps(net) == before


async def test_only_the_controllers_certificate_opens_the_model_and_bad_requests_are_named(net):
    m = net.manifest()
    url = m["nodes"]["A"]["sdn"]

    def context(cred: dict | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=m["ca"])
        if cred:
            ctx.load_cert_chain(cred["cert"], cred["key"])
        return ctx

    node_cred = {"cert": str(net.node_creds["C"].cert), "key": str(net.node_creds["C"].key)}
    for cred in (m["saes"]["sae-a1"], node_cred):   # same CA, wrong identity
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context(cred))) as s:
            for method in ("GET", "POST"):
                async with s.request(method, url + NODE + ("/qkd_links" if method == "POST" else ""), json={}) as r:
                    assert r.status == 403
                    err = (await r.json(content_type=None))["ietf-restconf:errors"]["error"][0]
                    assert err["error-tag"] == "access-denied" and "sdn-controller" in err["error-message"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context(None))) as s:
        with pytest.raises(aiohttp.ClientError):     # no certificate: no TLS session at all
            async with s.get(url + NODE) as r:
                await r.read()

    async with Controller.from_manifest(m) as ctl:
        a = (await ctl.model("A"))["qkdn_id"]
        c = (await ctl.model("C"))["qkdn_id"]
        good = {"qkdl_id": str(uuid.uuid4()), "qkdl_type": T + "PHYS", "qkdl_local": {"qkdn_id": a},
                "qkdl_remote": {"qkdn_id": c}}
        before = maps(net)
        for body, says in [
            ({"qkd_link": [good]}, "etsi-qkd-sdn-node:qkd_link"),
            ({"etsi-qkd-sdn-node:qkd_link": [good, good]}, "exactly one"),
            ({"etsi-qkd-sdn-node:qkd_link": [dict(good, qkdl_id="link-1")]}, "qkdl_id must be a UUID"),
            ({"etsi-qkd-sdn-node:qkd_link": [dict(good, qkdl_type=T + "VIRT")]}, "qkdl_type"),
            ({"etsi-qkd-sdn-node:qkd_link": [dict(good, phys_channel_att=3.0)]}, "phys_channel_att"),
            ({"etsi-qkd-sdn-node:qkd_link": [dict(good, qkdl_local={"qkdn_id": c})]}, "qkdl_local.qkdn_id"),
            ({"etsi-qkd-sdn-node:qkd_link": [dict(good, qkdl_remote={"qkdn_id": "Z"})]}, "qkdl_remote.qkdn_id"),
            ({"etsi-qkd-sdn-node:qkd_link": [dict(good, qkdl_remote={"qkdn_id": c, "qkdi_id": -1})]}, "qkdi_id"),
            ({"etsi-qkd-sdn-node:qkd_link": [dict(good, phys_wavelength=37)]}, "phys_wavelength"),
            ({"etsi-qkd-sdn-node:qkd_link": [dict(good, phys_wavelength="38")]}, "not one of the quantum channels"),
        ]:
            with pytest.raises(SdnError) as info:
                await ctl._call("POST", "A", NODE + "/qkd_links", body)
            assert info.value.status == 400 and info.value.tag == "invalid-value", info.value
            assert says in info.value.message, info.value.message
        with pytest.raises(SdnError) as info:          # a configured link is not the controller's to delete
            await ctl.delete_link("C", "D-C")
        assert info.value.status == 403
        assert maps(net) == before


# ------------------------------------------------------------------ config

BASE = {"node_id": "A", "api": {"listen": "127.0.0.1:8443"}, "peer": {"listen": "127.0.0.1:9443"},
        "tls": {"ca": "ca.pem", "cert": "a.pem", "key": "a-key.pem"},
        "vault": {"path": "vault.db", "master_key_file": "master.key"},
        "peers": {"C": {"url": "https://127.0.0.1:9444"}}, "saes": {"sae-a1": "A"},
        "devices": [{"id": "sw-a", "kind": "switch", "driver": "polatis-scpi",
                     "settings": {"resource": "TCPIP::10.0.0.20::3082::SOCKET", "classical_ports": [2, 18]}},
                    {"id": "cv-a", "kind": "cvqkd", "driver": "cvqkd-serial", "switch": "sw-a", "switch_port": 1,
                     "settings": {"port": "/dev/ttyUSB0", "role": "transmitter", "autostart": False}}],
        "sdn": {"listen": "127.0.0.1:9550", "controller": "sdn-controller",
                "fibres": [{"switch": "sw-a", "port": 17, "node": "C", "remote_port": 3, "loss_db": 7.0}]}}


def edited(path: str, value) -> dict:
    cfg = json.loads(json.dumps(BASE))
    *parents, last = path.split(".")
    target = cfg
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    target[last] = value
    return cfg


def test_the_sdn_section_as_docs_sdn_md_shows_it_parses():
    cfg = config.parse(Path("/etc/qkdnode/node.toml"), BASE)
    assert cfg.sdn.controller == "sdn-controller" and cfg.sdn.channels == (34, 37, 38)
    assert cfg.sdn.fibres[0].loss_db == 7.0 and cfg.devices[1].role == "transmitter"
    import tomllib
    doc = (Path(__file__).resolve().parent.parent / "docs" / "sdn.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    parsed = config.parse(Path("/etc/qkdnode/node.toml"), {**{k: v for k, v in BASE.items()
                                                              if k not in ("devices", "sdn")},
                                                           **tomllib.loads(example)})
    assert parsed.sdn.fibres and any(d.kind == "cvqkd" for d in parsed.devices)


@pytest.mark.parametrize("path, value, key", [
    ("sdn.controller", "sae-a1", "sdn.controller"),
    ("sdn.controller", "C", "sdn.controller"),
    ("sdn.listen", "127.0.0.1", "sdn.listen"),
    ("sdn.channels", [34, 99], "sdn.channels"),
    ("sdn.channels", [], "sdn.channels"),
    ("sdn.fibres.0.node", "Z", "sdn.fibres[0].node"),
    ("sdn.fibres.0.port", 2, "sdn.fibres[0].port"),
    ("sdn.fibres.0.port", 1, "sdn.fibres[0].port"),
    ("sdn.fibres.0.switch", "sw-z", "sdn.fibres[0].switch"),
    ("sdn.fibres.0.loss", 7.0, "sdn.fibres[0].loss"),
    ("devices.1.switch", "sw-z", "devices[1].switch"),
    ("devices.1.switch_port", 18, "devices[1].switch_port"),
    ("devices.1.settings", {"port": "/dev/ttyUSB0"}, "devices[1].settings"),
    ("sdn.chanels", [34], "sdn.chanels"),
], ids=["controller is an SAE", "controller is a node", "listen", "channel off the band", "no channel",
        "fibre to no peer", "fibre on a classical port", "fibre on a module's port", "fibre on no switch",
        "fibre key misspelt", "module on no switch", "module on a classical port", "module without a role",
        "sdn key misspelt"])
def test_an_sdn_mistake_is_named(path, value, key):
    with pytest.raises(ConfigError) as info:
        config.parse(Path("/etc/qkdnode/node.toml"), edited(path, value))
    assert f": {key}: expected" in str(info.value), str(info.value)
