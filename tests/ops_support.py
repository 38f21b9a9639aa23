"""Helpers for the operations tests: what an operator's tools see of a running node."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def config_of(node: dict) -> Path:
    """The config file a running node (a manifest entry) was started with, from its command line,
    as an operator finds it with `ps`."""
    argv = Path(f"/proc/{node['pid']}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--config") + 1].decode())


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
