"""Helpers for the operations tests: what an operator's tools see of a running node."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from qkdnode import config
from qkdnode.config import LinkConfig, NodeConfig


def config_of(node: dict) -> Path:
    """The config file a running node (a manifest entry) was started with, from its command line,
    as an operator finds it with `ps`."""
    argv = Path(f"/proc/{node['pid']}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--config") + 1].decode())


@dataclass
class Seen:
    """A running node as an operator finds it: its manifest entry, its config file and what it
    says, its first link, and an SAE at each end of that link (master here, slave at the peer)."""

    name: str
    node: dict
    path: Path
    cfg: NodeConfig
    link: LinkConfig
    master: str
    slave: str


def first_node(m: dict) -> Seen:
    """The first node of a testbed manifest `m`, seen through its running process."""
    name, node = next(iter(m["nodes"].items()))
    path = config_of(node)
    cfg = config.load(path)
    link = cfg.links[0]
    return Seen(name, node, path, cfg, link, next(s for s, e in m["saes"].items() if e["node"] == name),
                next(s for s, e in m["saes"].items() if e["node"] == link.peer))


def samples(url: str) -> dict[tuple[str, frozenset], float]:
    """A metrics page as {(series name, frozenset of label pairs): value}."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def series(page: dict, name: str, **labels: str) -> dict[frozenset, float]:
    """The series of one name whose labels include `labels`."""
    want = set(labels.items())
    return {lab: v for (n, lab), v in page.items() if n == name and want <= lab}


def value(page: dict, name: str, **labels: str) -> float | None:
    found = series(page, name, **labels)
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
    return next(iter(found.values()), None)


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or numbers).
    Grafana's $variables inside label matchers and ranges are ignored with them."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        before, after = e[:m.start()], e[m.end():].lstrip()
        if after.startswith("(") or m.group().lower() in _PROMQL_WORDS:
            continue  # a function or an operator
        if before and (before[-1].isalnum() or before[-1] in ".$"):
            continue  # a number's exponent or unit (1e3, 5m) or a $variable
        names.add(m.group())
    return names
