"""The node's optical gear as an operator sees it: a CV-QKD link through node B's all-optical
switch (the node keeps its configured cross-connect), a spectrum analyser on the quantum fibre,
their metrics, faults, and `qkdnode spectrum`. Real processes, SCPI over TCP through pyvisa,
the CV modules on pseudo-terminals."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from hil.osa import Leak
from hil.testbed import LinkSpec, Testbed, Topology
from qkdnode import config
from qkdnode.errors import ConfigError
from tests.conftest import scrape, wait_for
from tests.sae_client import SaeClient, bits

QKDNODE = Path(sys.executable).parent / "qkdnode"
SWITCHED = Topology({"A": ("sae-a1",), "B": ("sae-b1",)}, (LinkSpec("A-B", "A", "B", ("cv",), switch="B"),),
                    osa=frozenset({"B"}))


@pytest.fixture
async def net(tmp_path):
    tb = Testbed(tmp_path / "net", topology=SWITCHED)
    await tb.start()
    yield tb
    await tb.stop()


def metrics(tb: Testbed, node: str) -> dict[str, float]:
    return scrape(tb.manifest()["nodes"][node]["metrics"])


async def until(predicate, timeout: float = 30.0):
    return await wait_for(lambda: asyncio.sleep(0, predicate()), timeout=timeout, interval=0.3)


async def test_cv_key_flows_through_the_switch_the_node_keeps_and_survives_a_switch_fault(net):
    sw = net.switches["B"]
    # Node B sets its configured cross-connect; the classical channel on ports 2 -> 18 stays.
    await until(lambda: sw.model.map.get(1) == 17)
    assert sw.model.map[2] == 18
    await until(lambda: metrics(net, "B").get('qkdnode_switch_cross_connect{egress="17",ingress="1",switch="sw-B"}')
                == 1)
    m = net.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b1") as b:
        async def fetch():
            status, answer = await a.enc_keys("sae-b1", number=2, size=256)
            return status == 200 and answer
        answer = await wait_for(fetch, timeout=60, interval=0.5)  # CV key, privacy-amplified at both ends
        status, got = await b.dec_keys("sae-a1", [k["key_ID"] for k in answer["keys"]])
        assert status == 200 and bits(got) == bits(answer)

        # The switch stops answering: the device shows down, the node keeps serving from its pool.
        sw.faults.hang = True
        await until(lambda: metrics(net, "B").get('qkdnode_device_up{device="sw-B",kind="switch"}') == 0, 60)
        status, answer = await a.enc_keys("sae-b1", number=1, size=256)
        assert status == 200
        # Someone pulled the cross-connect meanwhile (a reboot lost it); once the switch answers
        # again the node puts it back, and only it: the classical path is untouched.
        sw.model.map.pop(1)
        sw.faults.clear()
        await until(lambda: metrics(net, "B").get('qkdnode_device_up{device="sw-B",kind="switch"}') == 1, 60)
        await until(lambda: sw.model.map.get(1) == 17)
        assert sw.model.map[2] == 18


async def test_classical_light_in_the_quantum_band_shows_in_metrics_and_the_spectrum(net, tmp_path):
    osa = net.osas["B"]
    key = 'qkdnode_quantum_band_power_dbm{channel="34",osa="osa-B"}'
    await until(lambda: key in metrics(net, "B"))
    assert metrics(net, "B")[key] < -50  # the notch keeps channel 34 dark
    png = tmp_path / "dark.png"
    out = subprocess.run([str(QKDNODE), "spectrum", "--node", "B", "--workdir", str(net.dir), "--out", str(png)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "quantum channel 34" in out.stdout and "dark" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    osa.fault(leak=Leak(34, -20.0))  # a classical carrier tuned onto the quantum channel
    await until(lambda: metrics(net, "B").get(key, -999) > -50, 30)
    assert "classical light in quantum channel 34" in (net.nodes["B"].log.read_text())
    out = subprocess.run([str(QKDNODE), "spectrum", "--node", "B", "--workdir", str(net.dir), "--out",
                          str(tmp_path / "leak.png"), "--osa", "osa-B"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ALARM" in out.stdout, out
    osa.fault(leak=None)
    await until(lambda: metrics(net, "B").get(key, 0) < -50, 30)

    out = subprocess.run([str(QKDNODE), "spectrum", "--node", "B", "--workdir", str(net.dir), "--out",
                          str(tmp_path / "x.png"), "--osa", "osa-Z"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "osa-B" in out.stderr  # names the analysers there are


BASE = {"node_id": "A", "api": {"listen": "127.0.0.1:8443"}, "peer": {"listen": "127.0.0.1:9443"},
        "tls": {"ca": "ca.pem", "cert": "a.pem", "key": "a-key.pem"},
        "vault": {"path": "vault.db", "master_key_file": "master.key"},
        "peers": {"B": {"url": "https://127.0.0.1:9444"}},
        "links": [{"id": "A-B", "peer": "B", "role": "master", "driver": "etsi014"}]}


@pytest.mark.parametrize("device, key", [
    ({"id": "x", "kind": "laser", "driver": "polatis-scpi"}, "devices[0].kind"),
    ({"id": "sw", "kind": "switch", "driver": "polatis-scpi", "cross_connects": {"1": 17, "2": 17}},
     "devices[0].cross_connects"),
    ({"id": "osa", "kind": "osa", "driver": "aq6370", "quantum_channels": [34, 400]}, "devices[0].quantum_channels"),
    ({"id": "t", "kind": "telemetry", "driver": "idq-snmp", "link": "A-Z"}, "devices[0].link"),
    ({"id": "A-B", "kind": "switch", "driver": "polatis-scpi"}, "devices[0].id"),
], ids=["kind", "egress twice", "channel", "telemetry of no link", "id of a link"])
def test_a_device_mistake_is_named(device, key):
    with pytest.raises(ConfigError) as info:
        config.parse(Path("/etc/qkdnode/node.toml"), dict(BASE, devices=[device]))
    assert key in str(info.value)
