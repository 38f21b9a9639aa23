"""TLS and access (issue 9): who may talk to a node, on each of its four TLS listeners (ETSI 014,
ETSI 004, SKIP, peer channel). No certificate, a certificate of another CA, an expired one, TLS
below 1.2: refused in the handshake. A valid certificate whose identity is not allowed here
(another node's SAE, no commonName, a node's name on the SAE API, an SAE on the peer channel):
refused by the application with 401/403 and an error object. Every refusal leaves the vaults
as they were."""

from __future__ import annotations

import asyncio
import ssl
import warnings

import aiohttp
import pytest

from hil.pki import ThrowawayPKI
from tests.campaign_support import record
from tests.conftest import ready_keys
from tests.sae_client import SaeClient, bits

LISTENERS = {"ETSI 014": ("etsi014", "GET", "/api/v1/keys/sae-b1/status"),
             "ETSI 004": ("etsi004", "POST", "/etsi004/v1/close"),
             "SKIP": ("skip", "GET", "/capabilities"),
             "peer channel": ("peer", "GET", "/peer/v1/health")}


def client_ctx(ca, cert=None, key=None, *, tls11: bool = False, upto: ssl.TLSVersion = ssl.TLSVersion.TLSv1_1
               ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    if tls11:
        with warnings.catch_warnings():   # deprecated indeed: that is what the node must refuse
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = upto
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")   # let this client offer what the node must refuse
    return ctx


async def handshake(url: str, ctx: ssl.SSLContext) -> tuple[bool, str]:
    """(True, status line) if an HTTP request over this TLS context got an answer, else (False,
    the error): under TLS 1.3 a refused client certificate shows at the first read."""
    host, port = url.removeprefix("https://").split("/")[0].split(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port), ssl=ctx), 10)
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return (bool(line), line.decode(errors="replace").strip() or "connection closed without an answer")
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return False, f"{exc.__class__.__name__}: {getattr(exc, 'reason', None) or exc}"


async def attempt(url: str, method: str, ctx: ssl.SSLContext) -> tuple[int | None, str]:
    """(HTTP status, None) if the call got an answer, else (None, the TLS error)."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.request(method, url, json={}, timeout=aiohttp.ClientTimeout(total=10)) as r:
                body = await r.json(content_type=None)
                return r.status, (body or {}).get("message", "") if isinstance(body, dict) else str(body)
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as exc:
        return None, f"{exc.__class__.__name__}: {exc}"


async def test_each_listener_refuses_bad_tls_and_foreign_identities(network, tmp_path):
    tb = await network(rate_bps=0.0, initial_keys=64)
    m = tb.manifest()
    ca = tb.pki.ca
    other_ca = ThrowawayPKI(tmp_path / "other-ca", name="someone else's CA")
    creds = {
        "no client certificate": None,
        "a certificate of an untrusted CA": other_ca.issue("sae-a1", "sae-a1"),
        "an expired certificate": tb.pki.issue("sae-a1-expired", "sae-a1", days=30, expired=True),
    }
    async with SaeClient(m, "sae-a1") as a:
        await ready_keys(a, "sae-b1", 64)
        before = (await a.status("sae-b1"))[1]["stored_key_count"]

        for case, cred in creds.items():
            for listener, (key, method, path) in LISTENERS.items():
                cert = (cred.cert, cred.key) if cred else (None, None)
                answered, why = await handshake(m["nodes"]["A"][key], client_ctx(ca, *cert))
                assert not answered, (case, listener, why)
                record("tls", case=case, listener=listener, outcome=f"refused in the TLS handshake ({why[:90]})",
                       passed=True)
        sae = tb.sae_creds["sae-a1"]
        for listener, (key, method, path) in LISTENERS.items():
            answered, why = await handshake(m["nodes"]["A"][key], client_ctx(ca, sae.cert, sae.key, tls11=True))
            assert not answered, (listener, why)
            # The same client allowed TLS 1.2 is answered: the version alone was refused.
            control, line = await handshake(m["nodes"]["A"][key], client_ctx(ca, sae.cert, sae.key, tls11=True,
                                                                             upto=ssl.TLSVersion.TLSv1_2))
            assert control and line.startswith("HTTP/1.1"), (listener, line)
            record("tls", case="TLS 1.1 (below 1.2)", listener=listener,
                   outcome=f"refused in the TLS handshake ({why[:90]})", passed=True)

        # Valid certificates of the network CA, with identities this node does not serve.
        no_cn = tb.pki.issue("no-cn", "", hosts=("sae-a1.example",))
        node_b = tb.node_creds["B"]
        sae_b1 = tb.sae_creds["sae-b1"]
        cases = [
            ("a valid certificate of another node's SAE (sae-b1 at node A)", sae_b1, "etsi014",
             "GET", "/api/v1/keys/sae-a2/status", 401, "attached to node B"),
            ("a valid certificate of another node's SAE (sae-b1 at node A)", sae_b1, "etsi004",
             "POST", "/etsi004/v1/close", 401, "attached to node B"),
            ("a valid certificate of another node's SAE (sae-b1 at node A)", sae_b1, "skip",
             "GET", "/capabilities", 401, "sae-b1"),
            ("a certificate without a commonName", no_cn, "etsi014", "GET", "/api/v1/keys/sae-b1/status", 401,
             "None"),
            ("a certificate without a commonName", no_cn, "peer", "POST", "/peer/v1/links/A-B/discard", 403, "None"),
            ("a node's certificate (node B) on the SAE API", node_b, "etsi014", "GET",
             "/api/v1/keys/sae-b1/status", 401, "'B'"),
            ("an SAE's certificate on the peer channel", tb.sae_creds["sae-b1"], "peer", "POST",
             "/peer/v1/links/A-B/discard", 403, "sae-b1"),
            ("another node's certificate on a link it is not on (B speaking for a link A-D)", node_b, "peer", "POST",
             "/peer/v1/links/A-D/discard", 404, "A-D"),
        ]
        for case, cred, key, method, path, want, says in cases:
            status, message = await attempt(m["nodes"]["A"][key] + path, method, client_ctx(ca, cred.cert, cred.key))
            assert status == want and says in message, (case, key, status, message)
            record("tls", case=case, listener={v[0]: k for k, v in LISTENERS.items()}[key],
                   outcome=f"HTTP {status}: {message[:80]}", passed=True)

        # The rightful SAE is still served, and nothing above changed the pool.
        assert (await a.status("sae-b1"))[1]["stored_key_count"] == before
        status, answer = await a.enc_keys("sae-b1", 1)
        assert status == 200 and bits(answer)


async def test_another_saes_valid_certificate_gets_no_key_of_an_association_it_is_not_in(network):
    tb = await network(rate_bps=0.0, initial_keys=16)
    m = tb.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-b2") as b2, SaeClient(m, "sae-b1") as b1:
        await ready_keys(a, "sae-b1", 2)
        _, answer = await a.enc_keys("sae-b1", 1)
        key_id = answer["keys"][0]["key_ID"]
        status, err = await b2.dec_keys("sae-a1", [key_id])
        assert status == 401, err
        status, got = await b1.dec_keys("sae-a1", [key_id])
        assert status == 200 and bits(got) == bits(answer)
        record("tls", case="a valid certificate of another SAE of the same node asks for a key not made for it",
               listener="ETSI 014", outcome=f"HTTP 401: {err['message'][:80]}; the rightful slave still gets it",
               passed=True)
