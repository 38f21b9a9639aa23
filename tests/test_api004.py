"""ETSI GS QKD 004 key streams, end to end: two (or three) nodes in this process with their real
HTTPS listeners, an emulated QKD link, and applications that know only the manifest.

The story of a stream: the source application opens it at its node and gets a key_stream_ID,
the destination application opens the same ID at its own node, and from then on both read the
same key at the same index, each index once, no faster than the QoS allows.
"""

import asyncio
import base64
import json
import logging
import ssl
import time
import uuid

import aiohttp
import pytest
from prometheus_client import generate_latest

from tests.appnet import AppNet, Client

QOS = {"key_chunk_size": 32, "max_bps": 2560, "min_bps": 256, "jitter": 0, "priority": 1, "timeout": 2000,
       "TTL": 60}


@pytest.fixture
async def net(tmp_path):
    started: list[AppNet] = []

    async def start(names=("A", "B"), ready_bits=8192, **kw) -> AppNet:
        n = AppNet(tmp_path / f"net{len(started)}", list(names), **kw)
        started.append(n)
        await n.start()
        await n.wait_ready(ready_bits)
        return n

    yield start
    for n in started:
        await n.stop()


async def opened(a: Client, b: Client, qos=QOS, source="sae-a1", destination="sae-b1") -> str:
    status, ans = await a.open_connect(source, destination, qos)
    assert status == 200 and ans["status"] == 1 and ans["status_name"] == "PEER_NOT_CONNECTED", ans
    ksid = ans["key_stream_ID"]
    status, ans = await b.open_connect(source, destination, ksid=ksid)
    assert status == 200 and ans["status"] == 0, ans
    assert ans["qos"] == dict(qos, metadata_mimetype="application/json")
    return ksid


def key_of(ans: dict) -> bytes:
    assert ans["status"] == 0, ans
    return base64.b64decode(ans["key_buffer"])


async def test_both_ends_read_the_same_key_at_each_index_within_the_qos(net, caplog):
    caplog.set_level(logging.DEBUG)
    n = await net()
    m = n.manifest()
    async with Client(m, "sae-a1") as a, Client(m, "sae-b1") as b:
        status, ans = await a.open_connect("sae-a1", "sae-b1", QOS)
        assert status == 200 and ans["status"] == 1, ans
        ksid = ans["key_stream_ID"]
        assert str(uuid.UUID(ksid)) == ksid
        # Until the destination has opened, the source cannot read, and the destination's node knows nothing.
        assert (await a.get_key(ksid))[1]["status_name"] == "PEER_NOT_CONNECTED_GET_KEY"
        assert (await b.get_key(ksid))[1]["status_name"] == "NO_QKD_CONNECTION_AVAILABLE"
        status, ans = await b.open_connect("sae-a1", "sae-b1", ksid=ksid)
        assert status == 200 and ans["status_name"] == "SUCCESSFUL", ans
        # A second destination open of the same stream is refused: the ID is in use.
        status, ans = await b.open_connect("sae-a1", "sae-b1", ksid=ksid)
        assert status == 200 and ans["status_name"] == "KSID_ALREADY_IN_USE", ans

        # The source reads eight keys in a row; max_bps (10 keys of 256 bits a second) paces it.
        t0 = time.monotonic()
        at_a = {}
        for i in range(8):
            status, ans = await a.get_key(ksid)
            assert status == 200 and ans["index"] == i, ans
            at_a[i] = key_of(ans)
        assert time.monotonic() - t0 >= 7 * 0.1 * 0.9
        # The destination reads the same indices, and gets the same keys.
        for i in range(8):
            status, ans = await b.get_key(ksid)
            assert status == 200 and ans["index"] == i and key_of(ans) == at_a[i], ans
        # Now the destination goes first, naming indices, the second half in reverse.
        at_b = {}
        for i in (8, 9, 12, 11, 10):
            status, ans = await b.get_key(ksid, index=i)
            at_b[i] = key_of(ans)
        for i in (12, 8, 10, 9, 11):
            status, ans = await a.get_key(ksid, index=i)
            assert key_of(ans) == at_b[i]
            at_a[i] = at_b[i]
        keys = list(at_a.values())
        assert all(len(k) == 32 for k in keys) and len(set(keys)) == len(keys)

        # An index is served once per end.
        status, ans = await a.get_key(ksid, index=3)
        assert status == 400 and "already served" in ans["message"]
        status, ans = await b.get_key(ksid, index=12)
        assert status == 400 and "already served" in ans["message"]

        # Metadata: what it holds, and a buffer too small for it changes nothing.
        status, ans = await a.get_key(ksid, metadata_size=10)
        assert ans["status_name"] == "METADATA_SIZE_INSUFFICIENT" and ans["metadata_size"] > 10, ans
        status, ans = await a.get_key(ksid, metadata_size=1000)
        assert ans["index"] == 13 and json.loads(ans["metadata"]["buffer"])["index"] == 13
        assert ans["metadata"]["mimetype"] == "application/json"
        at_a[13] = key_of(ans)
        assert key_of((await b.get_key(ksid, index=13))[1]) == at_a[13]

        # The source closes after reading index 14; the destination may still read 14, not 15.
        at_a[14] = key_of((await a.get_key(ksid))[1])
        status, ans = await a.close(ksid)
        assert status == 200 and ans["status_name"] == "SUCCESSFUL"
        assert (await a.get_key(ksid))[1]["status_name"] == "NO_QKD_CONNECTION_AVAILABLE"
        for _ in range(50):  # the close travels to node B on the peer channel
            if n.nodes["B"].streams.streams[ksid].peer_closed:
                break
            await asyncio.sleep(0.05)
        assert key_of((await b.get_key(ksid, index=14))[1]) == at_a[14]
        assert (await b.get_key(ksid, index=15))[1]["status_name"] == "PEER_NOT_CONNECTED_GET_KEY"
        assert (await b.close(ksid))[1]["status_name"] == "SUCCESSFUL"

    # No key bits in the logs or the metrics of either node.
    seen = caplog.text + "".join(generate_latest(node.metrics.registry).decode() for node in n.nodes.values())
    for k in at_a.values():
        assert k.hex() not in seen and base64.b64encode(k).decode() not in seen
    assert 'qkdnode_keys_served_total{call="etsi004_get_key"} 15.0' in \
        generate_latest(n.nodes["A"].metrics.registry).decode()


async def test_a_qos_the_path_cannot_meet_is_refused_with_a_counter_proposal(net):
    n = await net()
    m = n.manifest()
    async with Client(m, "sae-a1") as a, Client(m, "sae-b1") as b:
        ready_before = n.nodes["A"].pools["A-B"].ready_bits
        greedy = dict(QOS, min_bps=10**9, max_bps=10**9)
        status, ans = await a.open_connect("sae-a1", "sae-b1", greedy, ksid=str(uuid.uuid4()))
        assert status == 200 and ans["status_name"] == "QOS_NOT_MET", ans
        offer = ans["qos"]
        assert 0 < offer["min_bps"] < 10**9 and "min_bps" in ans["message"]
        assert not n.nodes["A"].streams.streams  # nothing was opened
        assert n.nodes["A"].pools["A-B"].ready_bits == ready_before  # and no key was taken
        # The counter-proposal is accepted as it stands.
        status, ans = await a.open_connect("sae-a1", "sae-b1", offer)
        assert ans["status_name"] == "PEER_NOT_CONNECTED", ans
        ksid = ans["key_stream_ID"]
        # The destination must open with the same QoS (or none); another is refused, with the stream's own.
        status, ans = await b.open_connect("sae-a1", "sae-b1", dict(offer, max_bps=offer["max_bps"] + 1), ksid)
        assert ans["status_name"] == "QOS_NOT_MET" and ans["qos"] == offer, ans
        assert ksid not in n.nodes["B"].streams.streams
        status, ans = await b.open_connect("sae-a1", "sae-b1", offer, ksid)
        assert ans["status_name"] == "SUCCESSFUL", ans
        # Streams already promised count: a second stream asking for the rest and more is refused.
        status, ans = await a.open_connect("sae-a1", "sae-b1", offer)
        assert ans["status_name"] == "QOS_NOT_MET", ans


async def test_get_key_gives_up_after_the_timeout_and_the_ttl_ends_the_stream(net):
    n = await net()
    m = n.manifest()
    async with Client(m, "sae-a1") as a, Client(m, "sae-b1") as b:
        # One key a second, and no caller waits longer than 300 ms.
        slow = dict(QOS, max_bps=256, min_bps=0, timeout=300, TTL=3)
        ksid = await opened(a, b, slow)
        first = key_of((await a.get_key(ksid))[1])
        t0 = time.monotonic()
        status, ans = await a.get_key(ksid)
        assert ans["status_name"] == "TIMEOUT_ERROR" and "max_bps" in ans["message"], ans
        assert time.monotonic() - t0 < 0.3  # pacing that cannot fit the timeout answers at once
        await asyncio.sleep(1.0)
        assert key_of((await a.get_key(ksid))[1]) != first  # index 1: the refused call consumed nothing
        assert key_of((await b.get_key(ksid, index=0))[1]) == first
        # After TTL seconds the stream is gone at both ends.
        await asyncio.sleep(3.0)
        for c in (a, b):
            status, ans = await c.get_key(ksid)
            assert ans["status_name"] == "NO_QKD_CONNECTION_AVAILABLE", ans
        assert not n.nodes["A"].streams.streams and not n.nodes["B"].streams.streams


async def test_without_key_a_reader_waits_for_its_timeout_then_gives_up(net):
    n = await net()
    m = n.manifest()
    async with Client(m, "sae-a1") as a, Client(m, "sae-b1") as b:
        # Two chunks of 1024 bits reserved (max_bps 2048 bit/s), with a burst allowance of two seconds.
        qos = dict(QOS, key_chunk_size=128, max_bps=2048, min_bps=0, jitter=2000, timeout=400)
        ksid = await opened(a, b, qos)
        for _ in range(100):
            if len(n.nodes["A"].streams.streams[ksid].held) == 2:
                break
            await asyncio.sleep(0.05)
        # Another application takes all the rest of the link's key over ETSI 014, once the link's
        # devices have none left to give (the emulated KMEs make no new key in this test).
        for _ in range(200):
            if n.kmes[0].stream.available_bits() < 256:
                break
            await asyncio.sleep(0.05)
        async with Client(m, "sae-a2") as other:
            for number in (16, 4, 1):
                while (await other.enc_keys("sae-b2", number=number, size=256))[0] == 200:
                    pass
        # The reservation still serves both ends ...
        for i in (0, 1):
            assert key_of((await a.get_key(ksid))[1]) == key_of((await b.get_key(ksid, index=i))[1])
        # ... and then there is no key: each end waits for its timeout, then says so.
        for c in (a, b):
            t0 = time.monotonic()
            status, ans = await c.get_key(ksid, index=2)
            assert ans["status_name"] == "TIMEOUT_ERROR", ans
            assert 0.35 < time.monotonic() - t0 < 3.0
        # A stream that does not wait (timeout 0) hears at once that there is not enough key.
        ksid0 = await opened(a, b, dict(qos, timeout=0))
        status, ans = await a.get_key(ksid0)
        assert ans["status_name"] == "INSUFFICIENT_KEY_AVAILABLE", ans


async def test_bad_requests_are_refused_and_change_nothing(net):
    n = await net()
    m = n.manifest()
    async with Client(m, "sae-a1") as a, Client(m, "sae-a2") as a2, Client(m, "sae-b1") as b:
        ksid = await opened(a, b)
        pool = n.nodes["A"].pools["A-B"]
        await pool.refresh_gauge()
        streams_before = set(n.nodes["A"].streams.streams)
        cases = [
            (a, "open_connect", None, b"{half"),
            (a, "open_connect", [1, 2], None),
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1", "qos": QOS, "colour": "red"}, None),
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1"}, None),           # no qos at the source
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-x9", "qos": QOS}, None),
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-a1", "qos": QOS}, None),
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1", "qos": dict(QOS, key_chunk_size=7)},
             None),                                                                              # 56 bits < min
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1", "qos": dict(QOS, min_bps=5000)},
             None),                                                                              # min > max
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1", "qos": dict(QOS, TTL=0)}, None),
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1", "qos": dict(QOS, timeout=-1)}, None),
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1", "qos": dict(QOS, jitter=True)}, None),
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1",
                                 "qos": {k: v for k, v in QOS.items() if k != "TTL"}}, None),
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1", "qos": QOS,
                                 "key_stream_ID": "not-a-uuid"}, None),
            (a, "open_connect", {"source": "sae-a1", "destination": "sae-b1",
                                 "qos": dict(QOS, metadata_mimetype="text/xml")}, None),
            (b, "open_connect", {"source": "sae-a1", "destination": "sae-b1"}, None),           # destination: no ID
            (a, "get_key", {"key_stream_ID": ksid, "index": -1}, None),
            (a, "get_key", {"key_stream_ID": ksid, "index": "0"}, None),
            (a, "get_key", {"key_stream_ID": ksid.upper()}, None),
            (a, "get_key", {"key_stream_ID": ksid, "metadata_size": 1.5}, None),
            (a, "close", {"key_stream_ID": ksid, "now": True}, None),
        ]
        for client, verb, body, raw in cases:
            status, ans = await client.call004(verb, body, raw)
            assert status == 400 and ans["message"], (verb, body, status, ans)
        # Who may call: only a party of the stream, at its own node.
        status, ans = await a2.open_connect("sae-a1", "sae-b1", QOS)
        assert status == 401 and "neither" in ans["message"], ans
        status, ans = await a2.get_key(ksid)
        assert status == 401 and "sae-a1" in ans["message"], ans
        status, ans = await a2.close(ksid)
        assert status == 401, ans
        status, ans = await Client(m, "sae-b1").at("A", m).open_connect("sae-a1", "sae-b1", QOS)
        assert status == 401 and "attached to node B" in ans["message"], ans
        # Two SAEs of one node share no QKD link; an ID in use is refused.
        assert (await a.open_connect("sae-a1", "sae-a2", QOS))[1]["status_name"] == "NO_QKD_CONNECTION_AVAILABLE"
        assert (await a.open_connect("sae-a1", "sae-b1", QOS, ksid))[1]["status_name"] == "KSID_ALREADY_IN_USE"
        assert (await a.get_key(str(uuid.uuid4())))[1]["status_name"] == "NO_QKD_CONNECTION_AVAILABLE"
        assert (await a.close(str(uuid.uuid4())))[1]["status_name"] == "NO_QKD_CONNECTION_AVAILABLE"
        # Nothing changed: no stream was added, the stream still serves index 0 at both ends.
        assert set(n.nodes["A"].streams.streams) == streams_before
        assert key_of((await a.get_key(ksid))[1]) == key_of((await b.get_key(ksid))[1])


async def test_a_stream_between_nodes_without_a_link_is_relayed(net):
    n = await net(names=("A", "B", "C"), ready_bits=4096)
    m = n.manifest()
    async with Client(m, "sae-a1") as a, Client(m, "sae-c1") as c:
        ksid = await opened(a, c, dict(QOS, max_bps=1024), destination="sae-c1")
        for i in range(3):
            assert key_of((await c.get_key(ksid))[1]) == key_of((await a.get_key(ksid, index=i))[1])
        assert (await c.close(ksid))[1]["status_name"] == "SUCCESSFUL"


async def test_the_peer_verb_refuses_malformed_or_misdirected_messages(net):
    n = await net()
    m = n.manifest()
    pki = n.pki.dir
    ctx = ssl.create_default_context(cafile=m["ca"])
    ctx.load_cert_chain(str(pki / "node-A.pem"), str(pki / "node-A-key.pem"))
    url = f"https://127.0.0.1:{n.ports['B']['peer']}/peer/v1/links/A-B/etsi004"
    async with Client(m, "sae-a1") as a, Client(m, "sae-b1") as b, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        ksid = await opened(a, b)

        async def post(body):
            async with s.post(url, json=body, server_hostname=n.hostname("B")) as r:
                return r.status, await r.json(content_type=None)

        base = {"to": "B", "origin": "A", "hops": 0, "op": "close", "key_stream_ID": ksid, "served": []}
        for bad in [{k: v for k, v in base.items() if k != "origin"}, dict(base, hops=-1), dict(base, hops=99),
                    dict(base, origin="C"), dict(base, op="steal"), dict(base, served=["0"]),
                    dict(base, to="Z")]:
            status, ans = await post(bad)
            assert status == 400 and ans["message"], (bad, status, ans)
        # Well-formed, but for streams node B does not have: nothing happens.
        status, ans = await post(dict(base, key_stream_ID=str(uuid.uuid4())))
        assert status == 200 and ans["known"] is False
        status, ans = await post(dict(base, op="keys", index=0))
        assert status == 200 and ans["status"] == 4, ans  # B is the destination end: it allocates nothing
        assert not n.nodes["B"].streams.streams[ksid].peer_closed
        assert key_of((await a.get_key(ksid))[1]) == key_of((await b.get_key(ksid))[1])


def test_long_streams_keep_bounded_bookkeeping(monkeypatch):
    from qkdnode import api004
    monkeypatch.setattr(api004, "MAP_KEEP", 8)
    s = api004.Stream(str(uuid.uuid4()), "source", "x", "y", api004.QoS(32, 256, 0, 0, 0, 0, 1), "B", 0.0)
    s.held = {i: bytearray(b"\xff" * 4) for i in range(3)}
    kept = s.held[0]
    for i in range(3, 40):
        api004._note_served(s, i)
    assert len(s.served) <= 16 and s.floor >= 40 - 2 * 8 and min(s.served) >= s.floor
    assert not s.held and kept == bytearray(4)  # skipped indices far behind are wiped, not kept forever


def test_pacing_allows_one_chunk_plus_jitter_then_the_rate():
    from qkdnode.api004 import Pacer
    p = Pacer(rate_bps=1000, chunk_bits=100, jitter_ms=200)  # burst: 100 + 200 bits
    assert p.wait_for(100) == 0
    p.take(100), p.take(100), p.take(100)
    assert 0.09 < p.wait_for(100) <= 0.1
