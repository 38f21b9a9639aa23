"""SKIP for routers, end to end: two nodes in this process with their real HTTPS listeners, an
emulated QKD link, and routers (SAEs) that know only the manifest.

The story: router R1 at node A asks its node for a new key for R2, sends the keyId to R2 in its
IKEv2 exchange, and R2 asks its own node for the key with that ID. The same pools, vault and
rules serve ETSI 014 and 004, so a key fetched one way cannot be fetched again another way.
"""

import base64
import logging
import uuid

import pytest
from prometheus_client import generate_latest

from tests.appnet import AppNet, Client


@pytest.fixture
async def net(tmp_path):
    n = AppNet(tmp_path / "net", ["A", "B"])
    await n.start()
    try:
        await n.wait_ready(8192)
        yield n
    finally:
        await n.stop()


async def test_a_router_at_each_end_gets_the_same_key_by_id(net, caplog):
    caplog.set_level(logging.DEBUG)
    m = net.manifest()
    async with Client(m, "sae-a1") as r1, Client(m, "sae-b1") as r2:
        status, caps = await r1.skip("/capabilities")
        assert status == 200, caps
        assert caps["localSystemID"] == "sae-a1" and caps["remoteSystemID"] == ["sae-b1", "sae-b2"]
        assert "qkdnode" in caps["entityInfo"] and caps["key"] is True
        assert (await r2.skip("/capabilities"))[1]["remoteSystemID"] == ["sae-a1", "sae-a2"]

        seen = {}
        # R1 starts (its node is the link's master end), then R2 starts (its node asks node A to cut).
        for maker, taker, size in ((r1, r2, None), (r2, r1, 512)):
            params = {"remoteSystemID": taker.sae} | ({"size": str(size)} if size else {})
            status, new = await maker.skip("/key", **params)
            assert status == 200, new
            assert len(new["keyId"]) == 32 and int(new["keyId"], 16) >= 0
            assert len(new["key"]) == (size or 256) // 4  # hexadecimal: two digits a byte
            status, got = await taker.skip(f"/key/{new['keyId']}", remoteSystemID=maker.sae)
            assert status == 200 and got == new, got
            seen[new["keyId"]] = new["key"]
            # A key is handed to the other router once.
            status, err = await taker.skip(f"/key/{new['keyId']}", remoteSystemID=maker.sae)
            assert status == 404 and "already fetched" in err["message"], err
        assert len(set(seen.values())) == 2

    scraped = "".join(generate_latest(node.metrics.registry).decode() for node in net.nodes.values())
    for key in seen.values():
        assert key not in caplog.text and key not in scraped
    assert 'qkdnode_skip_requests_total{call="key_by_id",status="404"} 1.0' in scraped


async def test_wrong_system_ids_unknown_keys_and_other_routers_keys_get_clear_errors(net):
    m = net.manifest()
    async with Client(m, "sae-a1") as r1, Client(m, "sae-b1") as r2, Client(m, "sae-b2") as r3:
        pool = net.nodes["A"].pools["A-B"]
        await pool.refresh_gauge()
        ready = pool.ready_bits
        for params, words in [
            ({"remoteSystemID": "sae-x9"}, "not a registered system"),
            ({"remoteSystemID": "sae-a2"}, "attached to this node"),
            ({"remoteSystemID": "sae-a1"}, "the caller itself"),
            ({}, "missing"),
            ({"remoteSystemID": "sae-b1", "size": "7"}, "multiple of 8"),
            ({"remoteSystemID": "sae-b1", "size": "0"}, "multiple of 8"),
            ({"remoteSystemID": "sae-b1", "size": "260"}, "multiple of 8"),
            ({"remoteSystemID": "sae-b1", "size": "1048576"}, "multiple of 8"),
            ({"remoteSystemID": "sae-b1", "size": "-8"}, "decimal"),
            ({"remoteSystemID": "sae-b1", "size": "2.5e2"}, "decimal"),
            ({"remoteSystemID": "sae-b1", "number": "2"}, "unknown query parameter"),
        ]:
            status, err = await r1.skip("/key", **params)
            assert status == 400 and words in err["message"], (params, err)
        status, err = await r1._json("GET", f"{r1.urls['skip']}/key?remoteSystemID=sae-b1&remoteSystemID=sae-b2")
        assert status == 400 and "more than once" in err["message"], err
        await pool.refresh_gauge()
        assert pool.ready_bits == ready  # no refused request took key

        status, new = await r1.skip("/key", remoteSystemID="sae-b1")
        assert status == 200
        key_id = new["keyId"]
        # Another router at the slave's node, or the right router naming the wrong partner: refused.
        status, err = await r3.skip(f"/key/{key_id}", remoteSystemID="sae-a1")
        assert status == 403 and key_id in err["message"], err
        status, err = await r2.skip(f"/key/{key_id}", remoteSystemID="sae-a2")
        assert status == 403 and "sae-a2" in err["message"], err
        # IDs that are no key here, or no key ID at all.
        status, err = await r2.skip(f"/key/{uuid.uuid4().hex}", remoteSystemID="sae-a1")
        assert status == 404 and "not known" in err["message"], err
        for bad in ("xyz", key_id[:-1], key_id + "0", str(uuid.UUID(hex=key_id))):
            status, err = await r2.skip(f"/key/{bad}", remoteSystemID="sae-a1")
            assert status == 400 and "32 hexadecimal digits" in err["message"], (bad, err)
        status, err = await r2.skip(f"/key/{key_id}")
        assert status == 400 and "missing" in err["message"], err
        # After all that, the rightful router still gets the key, once.
        status, got = await r2.skip(f"/key/{key_id.upper()}", remoteSystemID="sae-a1")
        assert status == 200 and got["key"] == new["key"] and got["keyId"] == key_id, got

        # Identity comes from the certificate: a router at the wrong node, or a stranger.
        status, err = await Client(m, "sae-b1").at("A", m).skip("/capabilities")
        assert status == 401 and "attached to node B" in err["message"], err
        stranger = net.pki.issue("stranger", "sae-x9")
        async with Client(m, "sae-x9", str(stranger.cert), str(stranger.key)) as x:
            status, err = await x.skip("/key", remoteSystemID="sae-b1")
            assert status == 401 and "sae-x9" in err["message"], err
        # What SKIP does not offer here is a JSON error too.
        status, err = await r1.skip("/entropy", minentropy="256")
        assert status == 404 and err["message"]
        status, err = await r1._json("POST", f"{r1.urls['skip']}/key?remoteSystemID=sae-b1")
        assert status == 405 and err["message"]


async def test_the_three_apis_share_keys_and_the_once_per_router_rule(net):
    m = net.manifest()
    async with Client(m, "sae-a1") as r1, Client(m, "sae-b1") as r2:
        # A key made over SKIP and fetched over SKIP cannot be fetched again over ETSI 014.
        _, new = await r1.skip("/key", remoteSystemID="sae-b1")
        assert (await r2.skip(f"/key/{new['keyId']}", remoteSystemID="sae-a1"))[0] == 200
        status, err = await r2.dec_keys("sae-a1", [str(uuid.UUID(hex=new["keyId"]))])
        assert status == 400 and "already fetched" in err["message"], err

        # A key made over ETSI 014 can be fetched over SKIP (its key_ID as 32 hex digits), once.
        status, answer = await r1.enc_keys("sae-b1", 1, 256)
        assert status == 200, answer
        (k,) = answer["keys"]
        status, got = await r2.skip(f"/key/{uuid.UUID(k['key_ID']).hex}", remoteSystemID="sae-a1")
        assert status == 200 and bytes.fromhex(got["key"]) == base64.b64decode(k["key"])
        assert (await r2.dec_keys("sae-a1", [k["key_ID"]]))[0] == 400
        assert (await r2.skip(f"/key/{uuid.UUID(k['key_ID']).hex}", remoteSystemID="sae-a1"))[0] == 404

        # And the other way round: made over SKIP, fetched over ETSI 014, then gone for SKIP.
        _, new = await r1.skip("/key", remoteSystemID="sae-b1")
        status, got = await r2.dec_keys("sae-a1", [str(uuid.UUID(hex=new["keyId"]))])
        assert status == 200 and base64.b64decode(got["keys"][0]["key"]).hex() == new["key"]
        assert (await r2.skip(f"/key/{new['keyId']}", remoteSystemID="sae-a1"))[0] == 404
