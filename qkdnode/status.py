"""`qkdnode status`: the operator's view of one running node, from its own metrics endpoint.

Reads the node's config (for its name, links, peers and SAEs, and where `[metrics] listen`
is), scrapes `/metrics` over HTTP, and reports links (device figures and pools), devices,
peers, SAEs, ETSI 014 traffic and certificate expiry, as tables or as JSON. Links the SDN
agent switched in (docs/sdn.md) are listed after the configured ones, from their metrics, with
their peer and module from `sdn-links.json` beside the vault where the user may read it. It
needs no key, no TLS material and no access to the vault's database: any user who can read
the config can run it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import socket
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from qkdnode.config import NodeConfig
from qkdnode.errors import QkdnodeError
from qkdnode.sdn import STATE_FILE as SDN_STATE_FILE   # switched links beside the vault (no key in it)

TIMEOUT = 5.0


class NodeNotRunning(QkdnodeError):
    """Nothing (or not this node) answers at the node's metrics endpoint."""


def metrics_url(cfg: NodeConfig) -> str:
    if cfg.metrics is None:
        raise QkdnodeError(f"{cfg.file}: [metrics] listen is not set; `qkdnode status` reads the node's metrics "
                           "endpoint, so the node must serve one")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.metrics.host, cfg.metrics.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.metrics.port}/metrics"


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(cfg: NodeConfig, timeout: float = TIMEOUT) -> Samples:
    """Every sample of the node's metrics page, by series name; NodeNotRunning if it is not
    there, or if another program (or node) answers."""
    url = metrics_url(cfg)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise NodeNotRunning(f"node {cfg.node_id}: {url} answers HTTP {exc.code}, not a qkdnode metrics page") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        why = "connection refused" if isinstance(reason, ConnectionRefusedError) else \
            f"no answer within {timeout:g} s" if isinstance(reason, (socket.timeout, TimeoutError)) else str(reason)
        raise NodeNotRunning(f"node {cfg.node_id} is not running: nothing answers at {url} ({why}). "
                             "Is the daemon started? systemctl status qkdnode") from None
    out: Samples = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
    except ValueError:
        raise NodeNotRunning(f"node {cfg.node_id}: {url} does not answer with Prometheus metrics") from None
    nodes = [labels.get("node") for labels, _ in out.get("qkdnode_info", [])]
    if nodes != [cfg.node_id]:
        raise NodeNotRunning(f"node {cfg.node_id}: {url} is the metrics endpoint of "
                             f"{'node ' + str(nodes[0]) if nodes else 'something that is not a qkdnode'}; "
                             "check [metrics] listen")
    return out


def _one(samples: Samples, name: str, **labels: str) -> float | None:
    for have, value in samples.get(name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            return value
    return None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def report(cfg: NodeConfig, samples: Samples, now: float | None = None) -> dict[str, Any]:
    """The node's status as plain data (what `--json` prints). Absent figures are null;
    `time_to_empty_seconds` is null also when the pool is not shrinking (+Inf in the metrics)."""
    now = dt.datetime.now(dt.timezone.utc).timestamp() if now is None else now
    links = [_link(samples, link.id, link.peer, link.role, link.driver, link.id, link.pool_target_bits, False)
             for link in cfg.links]
    configured = {link.id for link in cfg.links}
    made = _switched_links(cfg)
    in_metrics = {lab["link"] for lab, _ in samples.get("qkdnode_pool_ready_bits", []) if "link" in lab}
    drivers = {d.id: d.driver for d in cfg.devices}
    for link_id in sorted((in_metrics | set(made)) - configured):
        sw = made.get(link_id, {})
        role = {"transmitter": "master", "receiver": "slave"}.get(sw.get("role"))
        links.append(_link(samples, link_id, sw.get("peer"), role, drivers.get(sw.get("device")), sw.get("device"),
                           cfg.sdn.pool_target_bits if cfg.sdn else None, True))
    devices = [{"device": lab["device"], "kind": lab.get("kind"), "up": v == 1,
                "state": next((s["state"] for s, x in samples.get("qkdnode_device_state", [])
                               if s.get("device") == lab["device"] and x == 1), None)}
               for lab, v in sorted(samples.get("qkdnode_device_up", []), key=lambda i: i[0]["device"])]
    peers = [{"id": p.node_id, "url": p.url,
              "up": None if (up := _one(samples, "qkdnode_peer_up", peer=p.node_id)) is None else up == 1}
             for p in cfg.peers.values()]
    saes = [{"id": sae, "node": node, "here": node == cfg.node_id} for sae, node in sorted(cfg.saes.items())]
    requests: dict[str, dict[str, int]] = {}
    for lab, v in samples.get("qkdnode_etsi014_requests_total", []):
        requests.setdefault(lab["call"], {})[lab["status"]] = int(v)
    served = {lab["call"]: int(v) for lab, v in samples.get("qkdnode_keys_served_total", [])}
    certs = []
    for lab, ts in sorted(samples.get("qkdnode_certificate_expiry_timestamp_seconds", []), key=lambda i: i[1]):
        certs.append({"cert": lab["cert"], "expires": _iso(ts), "expires_timestamp": ts,
                      "days_left": round((ts - now) / 86400, 1)})
    loaded = _one(samples, "qkdnode_config_last_reload_timestamp_seconds")
    return {"node": cfg.node_id, "config": str(cfg.file), "metrics": metrics_url(cfg), "links": links,
            "devices": devices, "peers": peers, "saes": saes, "etsi014_requests": requests, "keys_served": served,
            "certificates": certs, "config_loaded": _iso(loaded) if loaded else None}


def _link(samples: Samples, link_id: str, peer: str | None, role: str | None, driver: str | None,
          device_name: str | None, target: int | None, switched: bool) -> dict[str, Any]:
    state = next((lab["state"] for lab, v in samples.get("qkdnode_link_state", []) if lab.get("link") == link_id
                  and v == 1), None)
    device = next((lab["state"] for lab, v in samples.get("qkdnode_device_state", [])
                   if device_name is not None and lab.get("device") == device_name and v == 1), None)
    tte = _one(samples, "qkdnode_pool_time_to_empty_seconds", link=link_id)
    return {
        "id": link_id, "switched": switched, "peer": peer, "role": role, "driver": driver,
        "device": device, "state": state,
        "qber": _one(samples, "qkdnode_link_qber_ratio", link=link_id),
        "excess_noise_snu": _one(samples, "qkdnode_link_excess_noise_snu", link=link_id),
        "secret_key_rate_bps": _one(samples, "qkdnode_link_secret_key_rate_bits_per_second", link=link_id),
        "pool": {"ready_bits": _one(samples, "qkdnode_pool_ready_bits", link=link_id),
                 "pending_bits": _one(samples, "qkdnode_pool_bits", link=link_id, state="pending"),
                 "stock_bits": _one(samples, "qkdnode_pool_bits", link=link_id, state="stock"),
                 "target_bits": target,
                 "time_to_empty_seconds": _finite(tte), "shrinking": tte is not None and math.isfinite(tte)},
    }


def _switched_links(cfg: NodeConfig) -> dict[str, dict[str, Any]]:
    """The switched links the SDN agent keeps beside the vault, by link ID; {} when there are
    none, or the file cannot be read by this user (the links then show from metrics alone)."""
    if cfg.sdn is None:
        return {}
    try:
        entries = json.loads((cfg.vault.path.parent / SDN_STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, list):
        return {}
    return {e["qkdl_id"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("qkdl_id"), str)}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------ the table


def _bits(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} bit"


def _rate(bps: float | None) -> str:
    return "-" if bps is None else _bits(bps).replace("bit", "bit/s")


def _duration(seconds: float | None, shrinking: bool) -> str:
    if not shrinking:
        return "never (not shrinking)"
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} d"


def _expiry_note(days_left: float) -> str:
    return "  EXPIRED" if days_left <= 0 else "  EXPIRES SOON" if days_left < 14 else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def render(r: dict[str, Any]) -> str:
    out = [f"node {r['node']}  (config {r['config']}, metrics {r['metrics']})", ""]
    out.append(_table(
        ["LINK", "PEER", "ROLE", "DRIVER", "DEVICE", "STATE", "QBER", "EXCESS NOISE", "KEY RATE", "READY", "TARGET",
         "TIME TO EMPTY"],
        [[ln["id"] + (" (SDN)" if ln["switched"] else ""), ln["peer"] or "-", ln["role"] or "-", ln["driver"] or "-",
          ln["device"] or "-", ln["state"] or "-",
          "-" if ln["qber"] is None else f"{ln['qber'] * 100:.2f} %",
          "-" if ln["excess_noise_snu"] is None else f"{ln['excess_noise_snu']:.3f} SNU",
          _rate(ln["secret_key_rate_bps"]), _bits(ln["pool"]["ready_bits"]), _bits(ln["pool"]["target_bits"]),
          _duration(ln["pool"]["time_to_empty_seconds"], ln["pool"]["shrinking"])] for ln in r["links"]]
        or [["(no links)"] + [""] * 11]))
    out += ["", _table(["DEVICE", "KIND", "UP", "STATE"],
                       [[d["device"], d["kind"] or "-", "yes" if d["up"] else "NO", d["state"] or "-"]
                        for d in r["devices"]] or [["(none)", "", "", ""]])]
    out += ["", _table(["PEER", "URL", "UP"],
                       [[p["id"], p["url"], "-" if p["up"] is None else "yes" if p["up"] else "NO"]
                        for p in r["peers"]] or [["(none)", "", ""]])]
    out += ["", _table(["SAE", "NODE"], [[s["id"], s["node"] + (" (this node)" if s["here"] else "")]
                                         for s in r["saes"]] or [["(none)", ""]])]
    calls = "; ".join(f"{call} " + ", ".join(f"{st}: {n}" for st, n in sorted(by.items()))
                      for call, by in sorted(r["etsi014_requests"].items())) or "none yet"
    served = ", ".join(f"{call} {n}" for call, n in sorted(r["keys_served"].items())) or "none yet"
    out += ["", f"ETSI 014 requests: {calls}", f"keys served: {served}"]
    out += ["", _table(["CERTIFICATE", "EXPIRES", "DAYS LEFT"],
                       [[c["cert"], c["expires"], f"{c['days_left']:.1f}" + _expiry_note(c["days_left"])]
                        for c in r["certificates"]] or [["(none read)", "", ""]])]
    if r["config_loaded"]:
        out += ["", f"config in force loaded {r['config_loaded']}"]
    return "\n".join(out)


def status(cfg: NodeConfig, as_json: bool = False) -> str:
    r = report(cfg, scrape(cfg))
    return json.dumps(r, indent=2) if as_json else render(r)
