"""Per-SAE limits ([limits], qkdnode/limits.py) hold across the node's three key APIs: an SAE
that spent its key-bit quota or its request rate over ETSI 014 cannot go on over SKIP or ETSI 004
instead. Two nodes in this process with their real HTTPS listeners, an emulated QKD link, and
applications that know only the manifest. Every refusal takes nothing from the pool.
"""

import uuid

from qkdnode.reload import reload_node
from tests.appnet import Client, running
from tests.campaign_support import record

# Best effort (min_bps 0): the stream is accepted whatever the pool holds.
QOS = {"key_chunk_size": 32, "max_bps": 2560, "min_bps": 0, "jitter": 0, "priority": 1, "timeout": 2000,
       "TTL": 60}
FULL = 64 * 256  # the KME's 64 initial keys of 256 bits, all in the pool; the link makes no more (rate 0)
QUOTA = "[limits.saes.sae-a1]\nkey_bits_per_day = 4096\n"
RATE = "[limits.saes.sae-a1]\nrequests_per_second = 0.05\nburst = 3\n"  # 3 at once, then one per 20 s


async def stored(client: Client, slave: str = "sae-b1") -> int:
    """Keys ready toward the slave's node, as an SAE without limits sees them in ETSI 014 status."""
    status, body = await client.status(slave)
    assert status == 200, body
    return body["stored_key_count"]


async def test_a_quota_spent_over_etsi014_refuses_skip_and_etsi004_and_they_take_nothing(tmp_path):
    async with running(tmp_path, ["A", "B"], FULL, extra={"A": QUOTA}) as n:
        m = n.manifest()
        async with Client(m, "sae-a1") as a1, Client(m, "sae-a2") as a2, Client(m, "sae-b1") as b1:
            assert await stored(a2) == 64
            # sae-a1 takes its whole day's quota over ETSI 014: 16 keys of 256 bits.
            status, body = await a1.enc_keys("sae-b1", 16, 256)
            assert status == 200 and len(body["keys"]) == 16, body
            spent = body["keys"]
            assert await stored(a2) == 48
            status, body = await a1.enc_keys("sae-b1", 1, 256)
            assert status == 429 and "quota of 4096 key bits per day" in body["message"], body

            # Over SKIP: 429 naming the quota, with Retry-After; no key taken.
            async with a1._session.get(f"{a1.urls['skip']}/key", params={"remoteSystemID": "sae-b1"}) as r:
                body = await r.json()
                assert r.status == 429, body
                assert "quota of 4096 key bits per day" in body["message"] and "4096 taken today" in body["message"]
                assert int(r.headers["Retry-After"]) >= 1
            assert await stored(a2) == 48

            # Over ETSI 004: the stream opens (that takes no key), but no index can be allocated for
            # sae-a1, at either end: INSUFFICIENT_KEY_AVAILABLE naming the quota, at once (no use waiting
            # for a new UTC day within a GET_KEY's timeout).
            status, ans = await a1.open_connect("sae-a1", "sae-b1", QOS)
            assert status == 200 and ans["status_name"] == "PEER_NOT_CONNECTED", ans
            ksid = ans["key_stream_ID"]
            status, ans = await b1.open_connect("sae-a1", "sae-b1", ksid=ksid)
            assert status == 200 and ans["status_name"] == "SUCCESSFUL", ans
            for end in (a1, b1):
                status, ans = await end.get_key(ksid)
                assert status == 200 and ans["status_name"] == "INSUFFICIENT_KEY_AVAILABLE", ans
                assert "quota of 4096 key bits per day" in ans["message"] and "key_buffer" not in ans
            assert await stored(a2) == 48
            assert n.nodes["A"].streams.streams[ksid].allocated == 0  # no index holds key for the stream
            assert n.nodes["A"].limits.used_today("sae-a1") == 4096  # the refusals counted nothing

            # The quota is sae-a1's alone: sae-a2 at the same node still gets keys.
            status, new = await a2.skip("/key", remoteSystemID="sae-b2")
            assert status == 200 and len(bytes.fromhex(new["key"])) == 32, new
            # And the slave of sae-a1's keys is never refused for its master's quota.
            status, got = await b1.dec_keys("sae-a1", [k["key_ID"] for k in spent])
            assert status == 200 and [k["key"] for k in got["keys"]] == [k["key"] for k in spent]
    record("tls", case="key-bit quota over [limits] spent over ETSI 014, then asked over another API",
           listener="SKIP", outcome="429 naming the quota, Retry-After; no key taken", passed=True)
    record("tls", case="key-bit quota over [limits] spent over ETSI 014, then asked over another API",
           listener="ETSI 004", outcome="INSUFFICIENT_KEY_AVAILABLE naming the quota at both ends, at once; "
                                        "no index allocated, no key taken", passed=True)


async def test_the_request_rate_is_one_bucket_for_all_three_apis(tmp_path):
    async with running(tmp_path, ["A", "B"], FULL, extra={"A": RATE}) as n:  # nothing refills during the test
        m = n.manifest()
        async with Client(m, "sae-a1") as a1, Client(m, "sae-a2") as a2:
            assert (await a1.status("sae-b1"))[0] == 200                       # ETSI 014
            assert (await a1.skip("/capabilities"))[0] == 200                  # SKIP
            status, ans = await a1.open_connect("sae-a1", "sae-b1", QOS)       # ETSI 004
            assert status == 200 and ans["status_name"] == "PEER_NOT_CONNECTED", ans
            opened = set(n.nodes["A"].streams.streams)

            # The bucket is empty now, whichever API asks next; nothing is done for the refused calls.
            status, body = await a1.skip("/key", remoteSystemID="sae-b1")
            assert status == 429 and "request rate" in body["message"], body
            status, body = await a1.open_connect("sae-a1", "sae-b1", QOS, ksid=str(uuid.uuid4()))
            assert status == 429 and "request rate" in body["message"], body
            status, body = await a1.enc_keys("sae-b1", 1, 256)
            assert status == 429 and "request rate" in body["message"], body
            assert set(n.nodes["A"].streams.streams) == opened                 # no stream opened
            assert await stored(a2) == 64                                      # no key taken
            # Another SAE of the node has its own bucket.
            status, new = await a2.skip("/key", remoteSystemID="sae-b1")
            assert status == 200, new
    record("tls", case="request rate over [limits]: one bucket per SAE across the three APIs",
           listener="ETSI 014, 004, SKIP", outcome="429 on every API once the bucket is empty; no stream opened, "
                                                  "no key taken; another SAE unaffected", passed=True)


async def test_a_reload_changes_the_limits_and_keeps_what_was_spent_today(tmp_path):
    async with running(tmp_path, ["A", "B"], FULL, extra={"A": QUOTA}) as n:
        m = n.manifest()
        async with Client(m, "sae-a1") as a1:
            status, body = await a1.enc_keys("sae-b1", 16, 256)
            assert status == 200, body
            assert (await a1.skip("/key", remoteSystemID="sae-b1"))[0] == 429
            # The operator raises sae-a1's quota to 5120 bits a day and reloads (SIGHUP).
            toml = n.dir / "A" / "node.toml"
            toml.write_text(toml.read_text().replace("key_bits_per_day = 4096", "key_bits_per_day = 5120"))
            assert await reload_node(n.nodes["A"])
            # What sae-a1 took today still counts: 1024 bits more, over any API, then no more.
            status, body = await a1.enc_keys("sae-b1", 2, 256)
            assert status == 200, body
            status, body = await a1.skip("/key", remoteSystemID="sae-b1", size="512")
            assert status == 200, body
            status, body = await a1.skip("/key", remoteSystemID="sae-b1")
            assert status == 429 and "quota of 5120 key bits per day: 5120 taken today" in body["message"], body
