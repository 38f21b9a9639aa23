"""`qkdnode demo`, as a newcomer and as an outside tool use it: the console script in .venv/bin,
the manifest it prints, and a key fetched with nothing but the manifest."""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.sae_client import SaeClient, bits

QKDNODE = Path(sys.executable).parent / "qkdnode"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_demo_prints_the_manifest_and_serves_keys_from_it(tmp_path):
    workdir = tmp_path / "demo"
    proc = await asyncio.create_subprocess_exec(
        str(QKDNODE), "demo", "--workdir", str(workdir), "--duration", "120",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()
        assert line.startswith("manifest: "), line
        path = Path(line.split(" ", 1)[1].strip())
        assert path == workdir / "testbed.json"
        m = json.loads(path.read_text())

        assert Path(m["ca"]).is_absolute() and Path(m["ca"]).is_file()
        assert set(m["nodes"]) == {"A", "B", "C", "D", "E"}  # config/demo-topology.toml
        for node in m["nodes"].values():
            assert set(node) == {"etsi014", "peer", "metrics", "sdn", "etsi004", "skip", "pid"}
            assert node["etsi004"].startswith("https://") and node["skip"].startswith("https://")
            assert node["sdn"].startswith("https://127.0.0.1:")  # the SDN agent (docs/sdn.md)
            assert node["etsi014"].startswith("https://127.0.0.1:") and node["peer"].startswith("https://")
            assert alive(node["pid"])
        assert set(m["controller"]) == {"cert", "key"} and Path(m["controller"]["key"]).is_file()
        for sae, entry in m["saes"].items():
            assert entry["node"] in m["nodes"]
            assert Path(entry["cert"]).is_absolute() and Path(entry["key"]).is_file()

        # sae-e1's node E is three hops from A: the key is relayed through trusted nodes.
        for slave in ("sae-b1", "sae-e1"):
            async with SaeClient(m, "sae-a1") as a, SaeClient(m, slave) as b:
                for _ in range(300):
                    status, answer = await a.enc_keys(slave, number=2, size=256)
                    if status == 200:
                        break
                    await asyncio.sleep(0.2)  # the links are still filling their pools
                assert status == 200, answer
                status, got = await b.dec_keys("sae-a1", [k["key_ID"] for k in answer["keys"]], post=True)
                assert status == 200 and bits(got) == bits(answer)

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
        for node in m["nodes"].values():
            for _ in range(50):
                if not alive(node["pid"]):
                    break
                await asyncio.sleep(0.1)
            assert not alive(node["pid"])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_demo_refuses_a_workdir_it_did_not_make(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    out = subprocess.run([str(QKDNODE), "demo", "--workdir", str(tmp_path), "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "not empty" in out.stderr and str(tmp_path) in out.stderr
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
