"""The backbone, end to end: an emulated QKD link, two daemons, SAEs on both sides over ETSI 014.

Every test here runs real processes on loopback with real TLS; the SAEs know only testbed.json.
"""

import base64
import signal
import uuid

from tests.conftest import ready_keys, scrape, wait_for
from tests.sae_client import SaeClient, bits


async def test_master_and_slave_get_identical_keys_in_both_directions(network):
    tb = await network(rate_bps=0.0, initial_keys=64)
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b1") as b:
        await ready_keys(a, "sae-b1", 16)

        # Node A is the link's master end: it cuts the key and pushes the cut to B.
        status, answer = await a.enc_keys("sae-b1", number=3, size=256)
        assert status == 200, answer
        issued = bits(answer)
        assert len(issued) == 3 and all(len(v) == 32 for v in issued.values())
        status, got = await b.dec_keys("sae-a1", list(issued))
        assert status == 200, got
        assert bits(got) == issued

        # Node B is not: it asks A to cut. POST form, another size, the simple GET for the slave.
        status, answer = await b.enc_keys("sae-a1", number=1, size=1024, post=True)
        assert status == 200, answer
        (key_id, key), = bits(answer).items()
        assert len(key) == 128
        status, got = await a.dec_keys("sae-b1", [key_id], post=False)
        assert status == 200 and bits(got) == {key_id: key}

        # Keys are fresh: no two hand-outs share bits.
        assert len({*issued.values(), key}) == 4


async def test_second_dec_keys_for_a_key_id_is_refused(network):
    tb = await network(rate_bps=0.0, initial_keys=16)
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b1") as b:
        await ready_keys(a, "sae-b1", 1)
        _, answer = await a.enc_keys("sae-b1")
        key_id = answer["keys"][0]["key_ID"]
        assert (await b.dec_keys("sae-a1", [key_id]))[0] == 200
        status, err = await b.dec_keys("sae-a1", [key_id])
        assert status == 400 and key_id in err["message"]
        status, err = await b.dec_keys("sae-a1", [key_id], post=False)
        assert status == 400
        # An ID nobody issued, and one that is no UUID at all.
        status, err = await b.dec_keys("sae-a1", [str(uuid.uuid4())])
        assert status == 400 and "not known" in err["message"]
        status, err = await b.dec_keys("sae-a1", ["../../etc/passwd"])
        assert status == 400 and "UUID" in err["message"]


async def test_multicast_each_slave_gets_the_key_once(network):
    tb = await network(rate_bps=0.0, initial_keys=16)
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b1") as b1, SaeClient(m, "sae-b2") as b2:
        await ready_keys(a, "sae-b1", 2)
        status, answer = await a.enc_keys("sae-b1", 2, 256, post=True, additional_slave_SAE_IDs=["sae-b2"])
        assert status == 200, answer
        issued = bits(answer)
        for slave in (b1, b2):
            status, got = await slave.dec_keys("sae-a1", list(issued))
            assert status == 200 and bits(got) == issued
            assert (await slave.dec_keys("sae-a1", list(issued)))[0] == 400


async def test_certificates_decide_who_gets_a_key(network):
    tb = await network(rate_bps=0.0, initial_keys=16)
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b2") as b2, SaeClient(m, "sae-b1") as b1:
        await ready_keys(a, "sae-b1", 1)
        _, answer = await a.enc_keys("sae-b1")
        key_id = answer["keys"][0]["key_ID"]

        # Another SAE of the same node, with its own valid certificate: not a slave of this key.
        status, err = await b2.dec_keys("sae-a1", [key_id])
        assert status == 401, err
        # Naming another master in the path does not help either.
        status, err = await b1.dec_keys("sae-a2", [key_id])
        assert status == 401, err
        # An SAE calling a node it is not attached to.
        status, err = await SaeClient.at(b2, m["nodes"]["A"]["etsi014"]).enc_keys("sae-a1")
        assert status == 401 and "attached to node B" in err["message"]

        # A certificate from the right CA whose identity is no registered SAE.
        stranger = tb.pki.issue("stranger", "sae-x9")
        m2 = {**m, "saes": {**m["saes"], "sae-x9": {"node": "A", "cert": str(stranger.cert),
                                                      "key": str(stranger.key)}}}
        async with SaeClient(m2, "sae-x9") as x:
            status, err = await x.enc_keys("sae-b1")
            assert status == 401 and "sae-x9" in err["message"]
        # The rightful slave still gets its key: the refusals changed nothing.
        status, got = await b1.dec_keys("sae-a1", [key_id])
        assert status == 200 and bits(got) == bits(answer)


async def test_bad_requests_get_400_and_take_no_key(network):
    tb = await network(rate_bps=0.0, initial_keys=16)
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a:
        before = await ready_keys(a, "sae-b1", 16)
        bad = [
            a.enc_keys("sae-b1", size=7),
            a.enc_keys("sae-b1", size=260),              # not a multiple of 8
            a.enc_keys("sae-b1", size=0),
            a.enc_keys("sae-b1", size=16),               # below min_key_size
            a.enc_keys("sae-b1", size=1 << 20),          # above max_key_size
            a.enc_keys("sae-b1", number=0),
            a.enc_keys("sae-b1", number=before["max_key_per_request"] + 1),
            a.enc_keys("sae-b1", number="two"),
            a.enc_keys("sae-b1", size=256.0, post=True),
            a.enc_keys("sae-b1", number=True, post=True),
            a.enc_keys("sae-b1", post=True, extension_mandatory=[{"route_type": "direct"}]),
            a.enc_keys("sae-b1", post=True, colour="blue"),
            a.enc_keys("sae-b1", post=True, additional_slave_SAE_IDs=["sae-a2"]),   # same node as master
            a.enc_keys("sae-b1", post=True, additional_slave_SAE_IDs=["nobody"]),
            a.enc_keys("nobody"),
            a.raw("POST", "sae-b1/enc_keys", b"{not json"),
            a.raw("POST", "sae-b1/enc_keys", b"[1, 2]"),
            a.raw("POST", "sae-a1/dec_keys", b'{"key_IDs": "x"}'),
        ]
        for i, call in enumerate(bad):
            status, err = await call
            assert status == 400, (i, status, err)
            assert isinstance(err.get("message"), str) and err["message"], (i, err)
        after = (await a.status("sae-b1"))[1]
        assert after["stored_key_count"] == before["stored_key_count"]


async def test_empty_pool_gets_503_and_nothing_changes(network):
    tb = await network(rate_bps=0.0, initial_keys=4)  # 4 keys of 256 bits in the link, ever
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b1") as b:
        before = await ready_keys(a, "sae-b1", 4)
        status, err = await a.enc_keys("sae-b1", number=2, size=1024)     # 2048 bits > 1024 ready
        assert status == 503 and "not enough key" in err["message"]
        status, err = await b.enc_keys("sae-a1", number=5)                 # also from the other end
        assert status == 503, err
        assert (await a.status("sae-b1"))[1]["stored_key_count"] == before["stored_key_count"] == 4
        # Everything that was there is still there to hand out, exactly once.
        status, answer = await a.enc_keys("sae-b1", number=4)
        assert status == 200 and len(answer["keys"]) == 4
        assert (await a.enc_keys("sae-b1"))[0] == 503
        status, got = await b.dec_keys("sae-a1", list(bits(answer)))
        assert bits(got) == bits(answer)


async def test_sigkill_loses_no_ready_key_and_serves_none_twice(network):
    tb = await network(rate_bps=0.0, initial_keys=64)
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b1") as b:
        await ready_keys(a, "sae-b1", 64)
        _, first = await a.enc_keys("sae-b1", number=8)
        waiting = bits(first)

        # Kill the slave's node hard: the keys it holds for sae-b1 survive.
        tb.kill("B", signal.SIGKILL)
        await tb.restart("B")
        status, got = await b.dec_keys("sae-a1", list(waiting))
        assert status == 200 and bits(got) == waiting

        # Kill the master's node hard: its ready pool survives, count for count.
        stored = (await a.status("sae-b1"))[1]["stored_key_count"]
        tb.kill("A", signal.SIGKILL)
        await tb.restart("A")
        assert (await a.status("sae-b1"))[1]["stored_key_count"] == stored == 56

        # Drain the rest, alternately from both ends; every key matches and none repeats.
        seen = dict(waiting)
        for _ in range(7):
            for master, slave, slave_id, master_id in ((a, b, "sae-b1", "sae-a1"), (b, a, "sae-a1", "sae-b1")):
                status, answer = await master.enc_keys(slave_id, number=4)
                assert status == 200, answer
                status, got = await slave.dec_keys(master_id, list(bits(answer)))
                assert status == 200 and bits(got) == bits(answer)
                assert not set(bits(answer)) & set(seen)
                seen.update(bits(answer))
        assert len(seen) == 64 and len(set(seen.values())) == 64
        assert (await a.enc_keys("sae-b1"))[0] == 503
        assert (await b.dec_keys("sae-a1", list(waiting)))[0] == 400


async def test_blocks_that_differ_at_the_two_ends_are_discarded_at_both(network):
    tb = await network(rate_bps=0.0, initial_keys=0)
    m = tb.manifest()
    tb.kme.ends["B"].faults.corrupt = True           # B's device now delivers one wrong bit per key
    tb.kme.stream._bits = 8 * 256                     # 8 keys appear in the link
    metrics_a, metrics_b = m["nodes"]["A"]["metrics"], m["nodes"]["B"]["metrics"]

    async def discarded():
        a, b = scrape(metrics_a), scrape(metrics_b)
        key = 'qkdnode_blocks_discarded_total{link="A-B",reason="mismatch"}'
        return a.get(key, 0) >= 8 and b.get(key, 0) >= 8
    await wait_for(discarded)
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b1") as b:
        assert (await a.status("sae-b1"))[1]["stored_key_count"] == 0
        assert (await b.status("sae-a1"))[1]["stored_key_count"] == 0
        assert (await a.enc_keys("sae-b1"))[0] == 503
    assert scrape(metrics_a)['qkdnode_pool_ready_bits{link="A-B"}'] == 0


async def test_no_key_bits_in_metrics_or_logs(network):
    tb = await network(rate_bps=0.0, initial_keys=16)
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b1") as b:
        await ready_keys(a, "sae-b1", 4)
        _, answer = await a.enc_keys("sae-b1", number=4)
        await b.dec_keys("sae-a1", list(bits(answer)))
    text = "".join((tb.dir / n / "node.log").read_text() for n in ("A", "B"))
    for node in ("A", "B"):
        text += str(scrape(m["nodes"][node]["metrics"]))
    for key_id, key in bits(answer).items():
        assert base64.b64encode(key).decode() not in text
        assert key.hex() not in text
        assert key_id not in text
