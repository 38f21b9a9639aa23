"""The node's Prometheus metrics: one registry per node, no globals, no key bits or key IDs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class NodeMetrics:
    def __init__(self, node_id: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pool_ready_bits = Gauge("qkdnode_pool_ready_bits", "Link key ready to hand out at this node",
                                     ["link"], registry=r)
        self.pool_bits = Gauge("qkdnode_pool_bits", "Link key held at this node, by block state",
                               ["link", "state"], registry=r)
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
        Gauge("qkdnode_info", "This node", ["node"], registry=r).labels(node_id).set(1)

    def on_vault_commit(self, n_ops: int, seconds: float) -> None:
        """Called by the vault's writer thread after each commit (prometheus-client is thread-safe)."""
        self.vault_commits.inc()
        self.vault_ops.inc(n_ops)
        self.vault_commit.observe(seconds)
