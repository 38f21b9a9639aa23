"""A real Prometheus (Debian's package) scrapes the emulated network, as an operator's would:
PromQL returns the QBER (excess noise, for a CV-QKD link), the secret key rate and the pool level
of every link at every node, the alert rules load and evaluate cleanly, and every dashboard query
runs."""

import asyncio
import json
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import pytest

from qkdnode import config
from tests.ops_support import config_of

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: apt install prometheus)")

QBER, NOISE = "qkdnode_link_qber_ratio", "qkdnode_link_excess_noise_snu"
LINK_FIGURES = (QBER, NOISE, "qkdnode_link_secret_key_rate_bits_per_second", "qkdnode_pool_ready_bits")


def loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus on a free port with a temporary storage folder, scraping `targets`
    ({node name: metrics URL}) every second under job="qkdnode"; stopped at the end."""
    procs = []

    def start(targets: dict[str, str]) -> str:
        static = []
        for name, url in targets.items():
            u = urlparse(url)
            static.append({"targets": [u.netloc], "labels": {"node": name, "__metrics_path__": u.path}})
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
               "rule_files": [str(ROOT / "ops" / "prometheus" / "qkdnode-alerts.yml")],
               "scrape_configs": [{"job_name": "qkdnode", "static_configs": static}]}
        (tmp_path / "prometheus.yml").write_text(json.dumps(cfg))  # JSON is YAML
        port = loopback_port()
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append((subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT), log))
        return f"http://127.0.0.1:{port}"

    yield start
    for proc, log in procs:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> list[dict]:
    async with session.get(f"{base}/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    assert body["status"] == "success", (promql, body)
    return body["data"]["result"]


async def test_promql_returns_qber_key_rate_and_pool_level_of_every_link_at_every_node(network, prometheus, tmp_path):
    tb = await network()
    m = tb.manifest()
    expected = {(name, link.id) for name, node in m["nodes"].items()
                for link in config.load(config_of(node)).links}
    assert expected
    base = prometheus({name: node["metrics"] for name, node in m["nodes"].items()})
    figures = "|".join(LINK_FIGURES)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            try:
                result = await query(session, base, f'{{job="qkdnode", __name__=~"{figures}"}}')
            except aiohttp.ClientError:
                result = []  # Prometheus still starting
            seen = {(r["metric"]["__name__"], r["metric"]["node"], r["metric"]["link"]): float(r["value"][1])
                    for r in result}
            if all((f, n, link) in seen for f in LINK_FIGURES[2:] for n, link in expected) and \
                    all((QBER, n, link) in seen or (NOISE, n, link) in seen for n, link in expected):
                break
            assert asyncio.get_running_loop().time() < deadline, \
                f"after 60 s Prometheus has {sorted(seen)}; expected every link of {sorted(expected)}; " \
                + (tmp_path / "prometheus.log").read_text()[-2000:]
            await asyncio.sleep(0.5)

        for node, link in expected:
            if (QBER, node, link) in seen:
                assert 0 < seen[QBER, node, link] < 0.11
            else:
                assert 0 < seen[NOISE, node, link] < 0.1
            assert seen["qkdnode_link_secret_key_rate_bits_per_second", node, link] > 0
            assert seen["qkdnode_pool_ready_bits", node, link] >= 0

        up = await query(session, base, 'up{job="qkdnode"}')
        assert {r["metric"]["node"]: r["value"][1] for r in up} == {name: "1" for name in m["nodes"]}

        # The alert rules load and evaluate against live data without error; none fires on a healthy network
        # (a certificate of the throwaway PKI lives 30 days, beyond the 14-day warning).
        async with session.get(f"{base}/api/v1/rules") as resp:
            groups = (await resp.json())["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 9
        await wait_evaluated(session, base)
        async with session.get(f"{base}/api/v1/rules") as resp:
            rules = [r for g in (await resp.json())["data"]["groups"] for r in g["rules"]]
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        firing = [(r["name"], a["labels"]) for r in rules for a in r.get("alerts", []) if a["state"] == "firing"]
        assert not firing

        # Every query of the Grafana dashboard is PromQL that Prometheus runs.
        dashboard = json.loads((ROOT / "ops" / "grafana" / "qkdnode.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$node", ".*").replace("$link", ".*").replace("$__rate_interval", "1m")
                await query(session, base, expr)
        rate_panel = next(p for p in dashboard["panels"] if p["title"] == "Secret key rate")
        shown = await query(session, base, rate_panel["targets"][0]["expr"].replace("$node", ".*")
                            .replace("$link", ".*"))
        assert {(r["metric"]["node"], r["metric"]["link"]) for r in shown} == expected


async def wait_evaluated(session: aiohttp.ClientSession, base: str) -> None:
    for _ in range(100):
        async with session.get(f"{base}/api/v1/rules") as resp:
            rules = [r for g in (await resp.json())["data"]["groups"] for r in g["rules"]]
        if all(r.get("lastEvaluation", "0001").startswith("20") for r in rules):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the rules were never evaluated")
