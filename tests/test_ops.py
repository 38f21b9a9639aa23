"""The operator's kit in ops/: alert rules checked and unit-tested by Prometheus' own promtool,
and every metric they (and the dashboard) use is one a node exports."""

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
