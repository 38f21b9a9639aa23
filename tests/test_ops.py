"""The operator's kit in ops/: alert rules checked and unit-tested by Prometheus' own promtool,
and every metric they (and the dashboard) use is one a node exports."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from qkdnode.metrics import NodeMetrics
from tests.ops_support import promql_metric_names

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "ops" / "prometheus"
RULES = PROMETHEUS / "qkdnode-alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "qkdnode.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt install prometheus)")

# What Prometheus itself adds to every scrape
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

ALERTS = {
    "QkdnodeDown", "QkdLinkQberHigh", "QkdLinkExcessNoiseHigh", "QkdPoolLow", "QkdPoolEmptySoon", "QkdDeviceDown",
    "QkdClassicalLightInQuantumBand", "QkdCertificateExpiresSoon", "QkdCertificateExpired",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


@needs_promtool
def test_promtool_accepts_the_rules_file():
    out = promtool("check", "rules", RULES.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


@needs_promtool
def test_alerts_fire_when_they_should_and_not_before():
    out = promtool("test", "rules", "qkdnode-alerts.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in yaml.safe_load((PROMETHEUS / "qkdnode-alerts.test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == ALERTS, f"alerts without a unit test: {ALERTS - tested}"


@needs_promtool
def test_promtool_finds_a_broken_rule(tmp_path):
    """The check above is worth something: a typo in an expression fails it."""
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("qkdnode_link_qber_ratio > 0.05", "qkdnode_link_qber_ratio >> 0.05"))
    out = subprocess.run([PROMTOOL, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "QkdLinkQberHigh" in out.stdout + out.stderr


@needs_promtool
def test_the_example_scrape_config_loads_the_rules():
    out = promtool("check", "config", "prometheus.example.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_rules_cover_every_condition_the_operators_asked_for_and_use_only_exported_metrics():
    found = {r["alert"]: r for r in rules()}
    assert set(found) == ALERTS
    exported = NodeMetrics("n").metric_names() | PROMETHEUS_OWN
    for name, rule in found.items():
        used = promql_metric_names(rule["expr"])
        assert used and used <= exported, f"{name}: {used - exported} is not a metric a node exports"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_metric_names_are_read_out_of_promql_correctly():
    assert promql_metric_names('sum by (link) (rate(qkdnode_keys_served_total{node=~"$node"}[$__rate_interval]))') \
        == {"qkdnode_keys_served_total"}
    assert promql_metric_names("histogram_quantile(0.99, sum by (le) (rate(qkdnode_vault_commit_seconds_bucket[5m])))"
                               ) == {"qkdnode_vault_commit_seconds_bucket"}
    assert promql_metric_names("qkdnode_certificate_expiry_timestamp_seconds - time() < 14 * 86400") == \
        {"qkdnode_certificate_expiry_timestamp_seconds"}
    assert promql_metric_names("qkdnode_pool_ready_bits < 0.1 * on (node, link) qkdnode_pool_target_bits offset 5m"
                               ) == {"qkdnode_pool_ready_bits", "qkdnode_pool_target_bits"}


# ---------------------------------------------------------------- the Grafana dashboard


def dashboard_panels() -> list[dict]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels of collapsed rows
    return out


def dashboard_exprs() -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard_panels() if p["type"] != "row"}


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]


def test_dashboard_panels_do_not_overlap():
    cells = {}
    for p in dashboard_panels():
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = p["title"]


def test_every_dashboard_query_names_only_metrics_a_node_exports():
    exported = NodeMetrics("n").metric_names() | PROMETHEUS_OWN
    for title, exprs in dashboard_exprs().items():
        for expr in exprs:
            used = promql_metric_names(expr)
            assert used and used <= exported, f"panel {title!r}: {sorted(used - exported)} not exported"
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if var["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+)(\{.*\})?, *(\w+)\)", var["query"]["query"]).group(1)
            assert metric in exported, f"variable {var['name']}: {metric}"


def test_dashboard_shows_what_operators_watch():
    used = set().union(*(promql_metric_names(e) for exprs in dashboard_exprs().values() for e in exprs))
    for metric in ("qkdnode_link_qber_ratio", "qkdnode_link_secret_key_rate_bits_per_second",
                   "qkdnode_link_excess_noise_snu", "qkdnode_pool_ready_bits", "qkdnode_pool_time_to_empty_seconds",
                   "qkdnode_optical_channel_power_dbm", "qkdnode_optical_channel_osnr_db",
                   "qkdnode_quantum_band_power_dbm", "qkdnode_switch_cross_connect", "qkdnode_device_up",
                   "qkdnode_etsi014_requests_total", "qkdnode_etsi014_request_seconds_bucket",
                   "qkdnode_vault_commit_seconds_bucket", "qkdnode_certificate_expiry_timestamp_seconds",
                   "qkdnode_relay_link_bits_total", "qkdnode_keys_served_total", "up"):
        assert metric in used, f"no panel shows {metric}"
