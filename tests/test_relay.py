"""Trusted-node relay across the demo's five-node network (config/demo-topology.toml):

    A == B -- C -- E        A-B combined (idq + toshiba), B-C idq, C-E idq,
    |         |             A-D toshiba, D-C a CV-QKD pair (privacy amplification at both ends)
    +--- D ---+

Every node is a real process; links, relay messages and SAEs all cross real TLS sockets."""

import asyncio
import base64
import json
import signal
import ssl

import pytest
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from hil.testbed import DEFAULT_TOPOLOGY, HOST, Testbed, free_port, load_topology
from tests.conftest import scrape, wait_for
from tests.sae_client import SaeClient, bits


@pytest.fixture
async def net(tmp_path):
    tb = Testbed(tmp_path / "net", topology=load_topology(DEFAULT_TOPOLOGY))
    await tb.start()
    yield tb
    await tb.stop()


def metric(tb: Testbed, node: str, name: str) -> float:
    values = scrape(tb.manifest()["nodes"][node]["metrics"])
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


async def get_keys(client: SaeClient, slave: str, *, number: int = 2, size: int = 256, extra=None,
                   timeout: float = 30.0) -> dict:
    """enc_keys until it succeeds (pools fill in the first seconds of a network)."""
    async def attempt():
        if extra:
            status, answer = await client.enc_keys(slave, number, size, post=True, additional_slave_SAE_IDs=extra)
        else:
            status, answer = await client.enc_keys(slave, number, size)
        return status == 200 and answer
    return await wait_for(attempt, timeout=timeout, interval=0.3)


async def test_keys_between_saes_on_non_adjacent_nodes_are_identical_at_both_ends(net):
    m = net.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-e1") as e, SaeClient(m, "sae-b1") as b:
        pad_before = metric(net, "A", "qkdnode_relay_link_bits_total")
        answer = await get_keys(a, "sae-e1", number=3, size=512)  # E is three hops from A
        status, got = await e.dec_keys("sae-a1", [k["key_ID"] for k in answer["keys"]])
        assert status == 200 and bits(got) == bits(answer)
        assert all(len(v) == 64 for v in bits(got).values())
        # The first hop spent link key for the pads (3 x 512 bits) and the tag (256 bits).
        assert metric(net, "A", "qkdnode_relay_link_bits_total") - pad_before >= 3 * 512 + 256
        assert metric(net, "E", "qkdnode_keys_relayed_total") >= 3
        # A key is served once: the same key_ID again is refused.
        status, again = await e.dec_keys("sae-a1", [answer["keys"][0]["key_ID"]])
        assert status == 400, again

        # The other way: the master SAE on the edge node (E's only link is C-E, whose master is C).
        answer = await get_keys(e, "sae-a1")
        status, got = await a.dec_keys("sae-e1", [k["key_ID"] for k in answer["keys"]])
        assert status == 200 and bits(got) == bits(answer)

        # Multicast with slaves on different nodes: B is adjacent to A, E is not.
        answer = await get_keys(a, "sae-b1", extra=["sae-e1"])
        for client in (b, e):
            status, got = await client.dec_keys("sae-a1", [k["key_ID"] for k in answer["keys"]])
            assert status == 200 and bits(got) == bits(answer)

        # ETSI 014 status toward a relayed SAE names the far node and counts what the path can carry.
        status, st = await a.status("sae-e1")
        assert status == 200 and st["target_KME_ID"] == "E" and st["stored_key_count"] > 0


class TamperingProxy:
    """Sits between node C and node E on the peer channel as an attacker who broke TLS would:
    it holds E's certificate toward C and C's toward E, and can alter or replay relay messages."""

    def __init__(self, tb: Testbed, upstream: str):
        self.tb, self.upstream = tb, upstream
        self.tamper: str | None = None          # None, "ciphertext" or "slaves"
        self.relays: list[tuple[str, bytes]] = []
        self.answers: list[int] = []
        self.port = free_port()

    async def start(self) -> None:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.tb.pki.ca))
        server.load_cert_chain(*map(str, (self.tb.node_creds["E"].cert, self.tb.node_creds["E"].key)))
        client = ssl.create_default_context(cafile=str(self.tb.pki.ca))
        client.load_cert_chain(*map(str, (self.tb.node_creds["C"].cert, self.tb.node_creds["C"].key)))
        self.session = ClientSession(connector=TCPConnector(ssl=client))
        app = web.Application(client_max_size=1 << 22)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, self.port, ssl_context=server).start()

    async def send(self, path: str, body: bytes) -> tuple[int, dict]:
        async with self.session.post(self.upstream + path, data=body, server_hostname=Testbed.node_hostname("E"),
                                     headers={"Content-Type": "application/json"},
                                     timeout=ClientTimeout(total=30)) as resp:
            return resp.status, await resp.json(content_type=None)

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.path.endswith("/relay"):
            msg = json.loads(body)
            if self.tamper == "ciphertext":
                ct = bytearray(base64.b64decode(msg["ciphertext"]))
                ct[0] ^= 1
                msg["ciphertext"] = base64.b64encode(bytes(ct)).decode()
            elif self.tamper == "slaves":
                msg["slaves"] = ["sae-e2"]  # redirect the keys to another SAE of E
            body = json.dumps(msg).encode()
            self.relays.append((request.path, body))
        status, answer = await self.send(request.path, body)
        if request.path.endswith("/relay"):
            self.answers.append(status)
        return web.json_response(answer, status=status)

    async def stop(self) -> None:
        await self.session.close()
        await self.runner.cleanup()


async def test_a_relay_message_altered_or_replayed_in_flight_is_rejected_and_yields_no_key(net):
    m = net.manifest()
    c = net.nodes["C"]
    proxy = TamperingProxy(net, m["nodes"]["E"]["peer"])
    await proxy.start()
    try:
        # Node C now reaches node E through the proxy.
        net.kill("C", signal.SIGTERM)
        text = c.config.read_text()
        c.config.write_text(text.replace(m["nodes"]["E"]["peer"], f"https://{HOST}:{proxy.port}"))
        await net.restart("C")
        async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-e2") as e2:
            await get_keys(a, "sae-e1")  # the path works through the proxy untouched
            assert proxy.answers and proxy.answers[-1] == 200
            clean = proxy.relays[-1]

            for tamper, reason in (("ciphertext", "tag"), ("slaves", "tag")):
                proxy.tamper = tamper
                rejected = metric(net, "E", f'qkdnode_relay_rejected_total{{reason="{reason}"}}')
                stored = metric(net, "E", "qkdnode_keys_relayed_total")
                status, answer = await a.enc_keys("sae-e1", number=1, size=256)
                # E is reachable only over C-E: with every message altered, no path is left.
                assert status == 503, answer
                assert proxy.answers[-1] == 400
                assert metric(net, "E", f'qkdnode_relay_rejected_total{{reason="{reason}"}}') == rejected + 1
                assert metric(net, "E", "qkdnode_keys_relayed_total") == stored
            # The redirected keys did not reach sae-e2 either: nothing is stored for it.
            body = json.loads(proxy.relays[-1][1])
            status, _ = await e2.dec_keys("sae-a1", body["key_IDs"])
            assert status == 400

            # A replay of a message that was accepted before: its pad is used up at E.
            proxy.tamper = None
            status, answer = await proxy.send(*clean)
            assert status == 400 and "already used" in answer["message"]
            assert metric(net, "E", 'qkdnode_relay_rejected_total{reason="pad"}') >= 1
            await get_keys(a, "sae-e1")  # and service resumes once the path is clean
    finally:
        await proxy.stop()


async def test_killing_an_intermediate_node_moves_traffic_to_another_path(net):
    m = net.manifest()
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-c1") as c:
        await get_keys(a, "sae-c1")
        # Both A-C paths need key: wait until the D-C CV link has some after privacy amplification,
        # at both of its ends, and until A has heard so (link-state adverts go out every second).
        await wait_for(lambda: asyncio.sleep(0, min(metric(net, n, 'qkdnode_pool_ready_bits{link="D-C"}')
                                                    for n in ("D", "C")) > 4096), timeout=60, interval=0.5)
        await asyncio.sleep(2.5)
        for victim, other in (("B", "D"), ("D", "B")):
            net.kill(victim)  # SIGKILL: no goodbye to its neighbours
            through = metric(net, other, 'qkdnode_relay_messages_total{direction="received"}')
            for _ in range(5):
                status, answer = await a.enc_keys("sae-c1", number=1, size=256)
                assert status == 200, answer  # no request is lost while another path exists
                status, got = await c.dec_keys("sae-a1", [k["key_ID"] for k in answer["keys"]])
                assert status == 200 and bits(got) == bits(answer)
            assert metric(net, other, 'qkdnode_relay_messages_total{direction="received"}') >= through + 5
            await net.restart(victim)
            # Routing takes it back once both of its neighbours hear from it again (adverts every second).
            await wait_for(lambda: asyncio.sleep(0, all(
                metric(net, n, f'qkdnode_peer_up{{peer="{victim}"}}') == 1 for n in ("A", "C")) and all(
                metric(net, victim, f'qkdnode_peer_up{{peer="{n}"}}') == 1 for n in ("A", "C"))), timeout=30)


async def test_an_exhausted_link_gives_503_only_when_no_path_has_key(net):
    m = net.manifest()
    (kme,) = net.devices["C-E"]
    async with SaeClient(m, "sae-a1") as a, SaeClient(m, "sae-c1") as c, SaeClient(m, "sae-e1") as e:
        await get_keys(a, "sae-e1")
        kme.stream.rate_bps, kme.stream._bits = 0.0, 0.0  # the C-E devices stop making key
        for number, size in ((16, 1024), (1, 256), (1, 64)):  # drain C-E, the only link to E, from C's side
            for _ in range(200):
                status, answer = await c.enc_keys("sae-e1", number=number, size=size)
                if status == 503:
                    break
                assert status == 200
        status, answer = await a.enc_keys("sae-e1", number=1, size=256)
        assert status == 503 and "no path" in answer["message"], answer
        answer = await get_keys(a, "sae-c1", timeout=5)  # other destinations are still served
        kme.stream.rate_bps = 50_000.0  # the link comes back
        answer = await get_keys(a, "sae-e1", timeout=60)
        status, got = await e.dec_keys("sae-a1", [k["key_ID"] for k in answer["keys"]])
        assert status == 200 and bits(got) == bits(answer)
