"""The node's Prometheus metrics: one registry per node, no globals, no key bits or key IDs.

Every metric, with its type, labels, unit and meaning, is listed in docs/metrics.md (a test keeps
the two in step). Label values are names from the config (links, peers, devices, certificates),
device figures (ITU channel and port numbers) or fixed words; never a key_ID, a block_ID or bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qkdnode.interfaces import DeviceHealth, LinkTelemetry, WdmChannel


class NodeMetrics:
    def __init__(self, node_id: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pool_ready_bits = Gauge("qkdnode_pool_ready_bits", "Link key ready to hand out at this node",
                                     ["link"], registry=r)
        self.pool_bits = Gauge("qkdnode_pool_bits", "Link key held at this node, by block state (pending, "
                               "ready) and in stock (keys agreed ahead of demand)", ["link", "state"], registry=r)
        self.vault_commits = Counter("qkdnode_vault_commits_total", "Vault transactions committed (one fsync each)",
                                     registry=r)
        self.vault_ops = Counter("qkdnode_vault_operations_total", "Vault operations committed", registry=r)
        self.vault_commit = Histogram("qkdnode_vault_commit_seconds", "Time from BEGIN to durable COMMIT of a group",
                                      registry=r, buckets=(.0005, .001, .0025, .005, .01, .02, .05, .1, .25, 1))
        self.blocks_ready = Counter("qkdnode_blocks_ready_total", "Link key blocks agreed with the peer",
                                    ["link"], registry=r)
        self.blocks_discarded = Counter("qkdnode_blocks_discarded_total",
                                        "Link key blocks thrown away at both ends", ["link", "reason"], registry=r)
        self.keys_served = Counter("qkdnode_keys_served_total", "Keys handed to SAEs over ETSI 014",
                                   ["call"], registry=r)
        self.requests = Counter("qkdnode_etsi014_requests_total", "ETSI 014 requests by call and HTTP status",
                                ["call", "status"], registry=r)
        self.latency = Histogram("qkdnode_etsi014_request_seconds", "ETSI 014 request latency", ["call"],
                                 registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.driver_up = Gauge("qkdnode_driver_up", "1 if the link's device answered its last call", ["link"],
                               registry=r)
        self.peer_up = Gauge("qkdnode_peer_up", "1 if the peer node answered its last call", ["peer"], registry=r)
        self.keys_expired = Counter("qkdnode_vault_keys_expired_total",
                                    "Keys stored for slave SAEs and deleted unfetched after vault.key_ttl_hours",
                                    registry=r)
        self.audit_pruned = Counter("qkdnode_vault_audit_pruned_total", "Audit records dropped by retention",
                                    registry=r)
        self.relay_link_bits = Counter("qkdnode_relay_link_bits_total",
                                       "Link key spent on relaying keys: one-time pad and authentication",
                                       ["link", "use"], registry=r)
        self.relay_messages = Counter("qkdnode_relay_messages_total", "Relay messages sent or accepted",
                                      ["direction"], registry=r)
        self.relay_rejected = Counter("qkdnode_relay_rejected_total",
                                      "Relay messages refused (bad tag, used pad, replay, malformed)", ["reason"],
                                      registry=r)
        self.keys_relayed = Counter("qkdnode_keys_relayed_total", "Keys that reached this node through relay",
                                    registry=r)
        self.route_keys = Counter("qkdnode_relay_route_keys_total", "Keys this node made for SAEs on another node, "
                                  "by the path they took (A>C a direct link, A>B>C relayed)", ["dest", "path"],
                                  registry=r)
        self.sdn_requests = Counter("qkdnode_sdn_requests_total", "SDN controller requests by operation and result "
                                    "(done, refused, failed)", ["operation", "result"], registry=r)
        # -- operations (issue 7): the link as its device reports it, the pool's outlook, the
        # optical layer, device health, certificates and reloads
        self.link_qber = Gauge("qkdnode_link_qber_ratio", "Quantum bit error rate the link's device reports "
                               "(DV-QKD; 0.02 = 2 %)", ["link"], registry=r)
        self.link_excess_noise = Gauge("qkdnode_link_excess_noise_snu", "Excess noise the link's device reports "
                                       "(CV-QKD), in shot-noise units", ["link"], registry=r)
        self.link_skr = Gauge("qkdnode_link_secret_key_rate_bits_per_second",
                              "Secret key rate of the link as its device reports or this node estimates it",
                              ["link"], registry=r)
        self.link_state = Gauge("qkdnode_link_state", "1 for the state the link's device reports "
                                "(running, stopped, calibrating, no-key, ...)", ["link", "state"], registry=r)
        self.pool_target_bits = Gauge("qkdnode_pool_target_bits", "Link key this node keeps ready (pool_target_bits "
                                      "of the link's config)", ["link"], registry=r)
        self.pool_time_to_empty = Gauge("qkdnode_pool_time_to_empty_seconds",
                                        "Time until the pool is empty at its net draw over the last minute; +Inf "
                                        "when it is not shrinking", ["link"], registry=r)
        self.device_up = Gauge("qkdnode_device_up", "1 if the device answers (state up or degraded)",
                               ["device", "kind"], registry=r)
        self.device_state = Gauge("qkdnode_device_state", "1 for the device's health state "
                                  "(unknown, up, degraded, down)", ["device", "state"], registry=r)
        self.optical_power = Gauge("qkdnode_optical_channel_power_dbm", "Power of a DWDM channel in the last "
                                   "sweep of a spectrum analyser", ["osa", "channel"], registry=r)
        self.optical_osnr = Gauge("qkdnode_optical_channel_osnr_db", "Optical signal-to-noise ratio of a DWDM "
                                  "channel in the last sweep (0.1 nm reference bandwidth)", ["osa", "channel"],
                                  registry=r)
        self.quantum_band_power = Gauge("qkdnode_quantum_band_power_dbm", "Power in a quantum channel's band in "
                                        "the last sweep: classical light where there should be none",
                                        ["osa", "channel"], registry=r)
        self.switch_cross_connect = Gauge("qkdnode_switch_cross_connect", "1 for each cross-connect of an "
                                          "optical switch, ingress port to egress port",
                                          ["switch", "ingress", "egress"], registry=r)
        self.cert_expiry = Gauge("qkdnode_certificate_expiry_timestamp_seconds",
                                 "Unix time at which a certificate the node uses expires", ["cert"], registry=r)
        self.config_reloads = Counter("qkdnode_config_reloads_total", "Reloads asked for by SIGHUP, by result "
                                      "(applied, refused)", ["result"], registry=r)
        self.config_loaded = Gauge("qkdnode_config_last_reload_timestamp_seconds",
                                   "Unix time at which the config in force was loaded (start or reload)",
                                   registry=r)
        self._labels: dict[tuple[int, str], set[tuple[str, ...]]] = {}  # series per (metric, owner): drop stale ones
        Gauge("qkdnode_info", "This node", ["node"], registry=r).labels(node_id).set(1)

    def on_vault_commit(self, n_ops: int, seconds: float) -> None:
        """Called by the vault's writer thread after each commit (prometheus-client is thread-safe)."""
        self.vault_commits.inc()
        self.vault_ops.inc(n_ops)
        self.vault_commit.observe(seconds)

    # ------------------------------------------------------------ setters that keep label sets exact

    def _replace(self, gauge: Gauge, owner: str, values: Mapping[tuple[str, ...], float]) -> None:
        """Make the series of `gauge` whose labels begin with `owner` exactly `values`: a channel
        gone from a sweep, or a cross-connect removed, must vanish, not linger with its last value."""
        slot = (id(gauge), owner)
        old = self._labels.get(slot, set())
        for labels in old - set(values):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        self._labels[slot] = set(values)

    def set_link_telemetry(self, link: str, t: LinkTelemetry | None) -> None:
        """What the link's device reports; a figure it does not report (or no answer at all:
        `t` None) leaves no series, so a stale value never looks current."""
        t = t or LinkTelemetry(state="")
        for gauge, value in ((self.link_qber, t.qber), (self.link_excess_noise, t.excess_noise),
                             (self.link_skr, t.secret_key_rate_bps)):
            self._replace(gauge, link, {} if value is None or not math.isfinite(value) else {(link,): value})
        self._replace(self.link_state, link, {(link, t.state): 1} if t.state else {})

    def set_device_health(self, device: str, kind: str, state: str) -> None:
        """A device's DeviceHealth state: `up` and `degraded` count as answering."""
        self._replace(self.device_up, device, {(device, kind): 1 if state in ("up", "degraded") else 0})
        self._replace(self.device_state, device, {(device, s): 1 if s == state else 0 for s in DeviceHealth.STATES})

    def set_spectrum(self, osa: str, channels: Iterable[WdmChannel], quantum: Mapping[int, float]) -> None:
        """A sweep's WDM analysis (power and OSNR per channel) and the power in each quantum
        channel's band (`drivers.aq6370.quantum_band_power`), keyed by ITU channel number."""
        power: dict[tuple[str, ...], float] = {}
        osnr: dict[tuple[str, ...], float] = {}
        for ch in channels:
            label = (osa, channel_label(ch))
            power[label] = ch.power_dbm
            if ch.osnr_db is not None:
                osnr[label] = ch.osnr_db
        self._replace(self.optical_power, osa, power)
        self._replace(self.optical_osnr, osa, osnr)
        self._replace(self.quantum_band_power, osa, {(osa, str(n)): p for n, p in quantum.items()})

    def set_switch_map(self, switch: str, pairs: Mapping[int, int]) -> None:
        self._replace(self.switch_cross_connect, switch, {(switch, str(i), str(e)): 1 for i, e in pairs.items()})

    def forget_link(self, link: str) -> None:
        """A link removed while the node runs (a switched link deleted): its series go with it."""
        for metric in (self.pool_ready_bits, self.pool_bits, self.blocks_ready, self.blocks_discarded,
                       self.driver_up, self.relay_link_bits, self.link_qber, self.link_excess_noise, self.link_skr,
                       self.link_state, self.pool_target_bits, self.pool_time_to_empty):
            for labels in [k for k in list(metric._metrics) if k and k[0] == link]:
                metric.remove(*labels)
        for gauge in (self.link_qber, self.link_excess_noise, self.link_skr, self.link_state):
            self._labels.pop((id(gauge), link), None)
        for gauge in (self.device_up, self.device_state):
            self._replace(gauge, link, {})

    def set_certificate_expiry(self, expiries: Mapping[str, float]) -> None:
        self._replace(self.cert_expiry, "", {(name,): ts for name, ts in expiries.items()})

    def metric_names(self) -> set[str]:
        """Every series name this registry can expose (counters with `_total`, histograms with
        `_bucket`, `_sum` and `_count`), whether or not a series has been set yet."""
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "gauge": ("",), "info": ("_info",), "summary": ("_sum", "_count", "_created", "")}
        return {fam.name + s for fam in self.registry.collect() for s in suffixes.get(fam.type, ("",))}


def channel_label(ch: WdmChannel) -> str:
    """ITU-T G.694.1 100 GHz channel number ("36" is 193.6 THz); a carrier off the grid by its
    wavelength to 0.1 nm ("1549.9nm")."""
    return str(ch.itu_channel) if ch.itu_channel is not None else f"{ch.centre_nm:.1f}nm"
