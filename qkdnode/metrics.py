"""The node's Prometheus metrics: one registry per node, no globals, no key bits or key IDs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class NodeMetrics:
    def __init__(self, node_id: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pool_ready_bits = Gauge("qkdnode_pool_ready_bits", "Link key ready to hand out at this node",
                                     ["link"], registry=r)
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
        Gauge("qkdnode_info", "This node", ["node"], registry=r).labels(node_id).set(1)
