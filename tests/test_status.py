"""`qkdnode status --config FILE` as an operator runs it on a node's host: the console script,
the node's own config, nothing else."""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from qkdnode import config
from tests.conftest import wait_for
from tests.ops_support import config_of, first_node
from tests.sae_client import SaeClient

QKDNODE = Path(sys.executable).parent / "qkdnode"


async def status(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(str(QKDNODE), "status", *args, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(), err.decode()


async def test_status_shows_links_pools_devices_peers_saes_and_certificates_of_a_running_node(network):
    tb = await network()
    m = tb.manifest()
    seen = first_node(m)
    name, path, cfg, link, master, slave = seen.name, seen.path, seen.cfg, seen.link, seen.master, seen.slave

    async def link_reported():
        code, out, err = await status("--config", str(path), "--json")
        assert code == 0, err
        r = json.loads(out)
        ln = r["links"][0]
        return (ln["qber"] is not None or ln["excess_noise_snu"] is not None) and ln["pool"]["ready_bits"] and r

    await wait_for(link_reported, timeout=30, interval=0.5)
    async with SaeClient(m, master) as sae:
        async def served():
            code, _ = await sae.enc_keys(slave, number=2, size=256)
            return code == 200
        await wait_for(served, timeout=30)
    r = await link_reported()

    assert r["node"] == name == cfg.node_id
    ln = r["links"][0]
    assert (ln["id"], ln["peer"], ln["role"], ln["driver"]) == (link.id, link.peer, link.role, link.driver)
    assert ln["device"] == "up" and ln["state"] == "running"
    if ln["qber"] is not None:                            # a DV link; a CV link reports excess noise instead
        assert 0 < ln["qber"] < 0.11
    else:
        assert 0 < ln["excess_noise_snu"] < 0.1
    assert ln["secret_key_rate_bps"] > 0
    assert ln["pool"]["target_bits"] == link.pool_target_bits and ln["pool"]["ready_bits"] > 0
    assert {d["device"]: d["up"] for d in r["devices"]} == {link.id: True}
    assert {p["id"] for p in r["peers"]} == set(cfg.peers)
    assert {s["id"] for s in r["saes"]} == set(m["saes"])
    assert {s["id"] for s in r["saes"] if s["here"]} == {s for s, e in m["saes"].items() if e["node"] == name}
    assert r["keys_served"]["enc_keys"] == 2 and r["etsi014_requests"]["enc_keys"]["200"] == 1
    expiry = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes()).not_valid_after_utc
    tls = next(c for c in r["certificates"] if c["cert"] == "tls")
    assert tls["expires"] == expiry.strftime("%Y-%m-%d %H:%M:%S UTC") and 29 < tls["days_left"] <= 30

    code, table, err = await status("--config", str(path))
    assert code == 0, err
    lines = table.splitlines()
    assert lines[0].startswith(f"node {name}")
    row = next(line for line in lines if line.startswith(link.id + " "))
    assert f" {link.peer} " in row and " up " in row and "running" in row and "bit/s" in row
    assert " %" in row or " SNU" in row
    assert any(line.startswith("tls ") and expiry.strftime("%Y-%m-%d") in line for line in lines)
    assert all(sae in table for sae in m["saes"])
    assert "keys served: enc_keys 2" in table


async def test_status_says_clearly_when_the_node_is_not_running(network, tmp_path):
    tb = await network()
    m = tb.manifest()
    name, node = next(iter(m["nodes"].items()))
    path = config_of(node)
    assert (await status("--config", str(path)))[0] == 0

    os.kill(node["pid"], signal.SIGTERM)

    async def stopped():
        return (await status("--config", str(path)))[0] == 3
    await wait_for(stopped, timeout=30, interval=0.3)
    code, out, err = await status("--config", str(path))
    assert code == 3 and out == ""
    assert f"node {name} is not running" in err and "connection refused" in err and str(
        config.load(path).metrics.port) in err


async def test_status_refuses_an_endpoint_that_is_another_nodes(network, tmp_path):
    """A config whose [metrics] port points at another node's page (a copy-paste slip) is not
    mistaken for this node's."""
    tb = await network()
    m = tb.manifest()
    (a, node_a), (b, node_b) = list(m["nodes"].items())[:2]
    text = config_of(node_a).read_text()
    port_a, port_b = config.load(config_of(node_a)).metrics.port, config.load(config_of(node_b)).metrics.port
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(text.replace(f":{port_a}\"", f":{port_b}\""))
    code, out, err = await status("--config", str(wrong))
    assert code == 3 and f"metrics endpoint of node {b}" in err


async def test_status_of_a_node_without_a_metrics_endpoint_names_the_key(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text("""node_id = "X"
[api]
listen = "127.0.0.1:18443"
[peer]
listen = "127.0.0.1:18444"
[tls]
ca = "ca.pem"
cert = "x.pem"
key = "x-key.pem"
[vault]
path = "vault.db"
master_key_file = "master.key"
""")
    code, out, err = await status("--config", str(cfg))
    assert code == 2 and "[metrics] listen is not set" in err
