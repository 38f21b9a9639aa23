"""The peer channel under hostile or mistaken input: who may speak for a node, and what a
malformed or impossible message changes (nothing)."""

import ssl
import uuid

import aiohttp
import pytest

from qkdnode.config import PeerConfig
from qkdnode.errors import PeerUnavailable
from qkdnode.peer import PeerClient
from qkdnode.tlsutil import client_context
from tests.conftest import ready_keys
from tests.sae_client import SaeClient


def creds(tb, name):
    return tb.pki.dir / f"{name}.pem", tb.pki.dir / f"{name}-key.pem"


async def post(tb, as_cert: str, node: str, path: str, body=None, raw: bytes | None = None):
    ctx = ssl.create_default_context(cafile=str(tb.pki.ca))
    ctx.load_cert_chain(*map(str, creds(tb, as_cert)))
    url = tb.manifest()["nodes"][node]["peer"] + path
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        kwargs = {"data": raw, "headers": {"Content-Type": "application/json"}} if raw is not None else {"json": body}
        async with s.post(url, server_hostname=tb.node_hostname(node), **kwargs) as r:
            return r.status, await r.json(content_type=None)


async def test_only_the_links_peer_may_speak_on_it_and_bad_messages_change_nothing(network):
    tb = await network(rate_bps=0.0, initial_keys=16)
    m = tb.manifest()
    async with SaeClient(m, "sae-b1") as b:
        before = (await ready_keys(b, "sae-a1", 16))["stored_key_count"]

        # An SAE's certificate (same CA) is not node A.
        status, err = await post(tb, "sae-a1", "B", "/peer/v1/links/A-B/keys", {})
        assert status == 403 and "sae-a1" in err["message"]
        # Node A's own certificate, but messages that make no sense:
        block = str(uuid.uuid4())
        cases = [
            ("/peer/v1/links/A-B/keys", None, b"{half"),                                  # not JSON
            ("/peer/v1/links/A-B/keys", {"master": "sae-a1", "slaves": ["sae-b1"], "size": 7, "keys": []}, None),
            ("/peer/v1/links/A-B/allocate", {"master": "sae-a1", "slaves": ["sae-b1"], "number": 1, "size": 256},
             None),                                                                     # B is not the master end
            ("/peer/v1/links/A-B/offer", {"salt": "zz", "blocks": []}, None),
            # Parties that do not fit the link: a slave at A, a master at B.
            ("/peer/v1/links/A-B/keys", {"master": "sae-a1", "slaves": ["sae-a2"], "size": 256, "keys": []}, None),
            ("/peer/v1/links/A-B/keys", {"master": "sae-b2", "slaves": ["sae-b1"], "size": 256, "keys": []}, None),
            ("/peer/v1/links/A-B/keys", {"master": "sae-a1", "slaves": ["sae-b1"], "size": 256,
                                         "keys": [{"key_ID": str(uuid.uuid4()), "ranges": [[block, 0, -5]]}]}, None),
        ]
        for path, body, raw in cases:
            status, err = await post(tb, "node-A", "B", path, body, raw)
            assert status == 400, (path, status, err)
        # Bits B does not hold, or holds no longer: refused as a conflict between the two ends.
        status, err = await post(tb, "node-A", "B", "/peer/v1/links/A-B/keys", {
            "master": "sae-a1", "slaves": ["sae-b1"], "size": 256,
            "keys": [{"key_ID": str(uuid.uuid4()), "ranges": [[block, 0, 32]]}]})
        assert status == 409 and block in err["message"]
        status, err = await post(tb, "node-A", "B", "/peer/v1/links/X-Y/keys", {})
        assert status == 404
        assert (await b.status("sae-a1"))[1]["stored_key_count"] == before


async def test_a_node_is_recognised_by_its_own_certificate_only(network, tmp_path):
    """Node A's client expects node B's name; node A's own certificate (same CA, same address)
    does not pass for B."""
    tb = await network(rate_bps=0.0, initial_keys=0)
    m = tb.manifest()
    ctx = client_context(tb.pki.ca, *creds(tb, "node-A"))
    wrong = PeerClient(PeerConfig("B", m["nodes"]["A"]["peer"], tb.node_hostname("B")), ctx)  # A's server
    right = PeerClient(PeerConfig("B", m["nodes"]["B"]["peer"], tb.node_hostname("B")), ctx)
    await wrong.start()
    await right.start()
    try:
        with pytest.raises(PeerUnavailable, match="certificate"):
            await wrong.call("A-B", "discard", {"keys": []})
        assert await right.call("A-B", "discard", {"keys": []}) == {"discarded": 0}
    finally:
        await wrong.close()
        await right.close()
