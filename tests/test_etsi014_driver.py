"""The ETSI GS QKD 014 key client against an emulated vendor KME pair, over real mutual TLS on loopback.

The KMEs' certificates name only kme-a.lab / kme-b.lab while the config reaches them by IP, as in
the labs; the driver is built from a link's settings exactly as the daemon builds it.
"""

import asyncio
import base64
import time
import uuid
from collections import Counter

import pytest
from aiohttp import web

from drivers.etsi014 import Etsi014KeySource
from hil.kme import KmePair
from hil.pki import ThrowawayPKI
from qkdnode.errors import (ConfigError, DeviceProtocolError, DeviceRejected, DeviceUnauthorized, DeviceUnavailable,
                            DeviceUntrusted)
from qkdnode.tlsutil import server_context

SAE = {"A": "qkdnode-A", "B": "qkdnode-B"}
HOSTNAME = {"A": "kme-a.lab", "B": "kme-b.lab"}
CONFIG = "node.toml"
KEY = "links[0].settings"


class CountingKmePair(KmePair):
    """The emulator, counting the requests each end answers, faulty answers included."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.hits = Counter()   # (side, "status" | "enc_keys" | "dec_keys") -> requests

    def _faults_mw(self, side):
        faulty = super()._faults_mw(side)

        @web.middleware
        async def count(request, handler):
            self.hits[side, request.path.rsplit("/", 1)[-1]] += 1
            return await faulty(request, handler)
        return count


@pytest.fixture
def pki(tmp_path):
    ca = ThrowawayPKI(tmp_path / "pki")
    creds = {f"kme-{s}": ca.issue(f"kme-{s}", f"KME-{s}", hosts=(HOSTNAME[s],), server=True, client=False)
             for s in "AB"}
    creds.update({f"sae-{s}": ca.issue(f"sae-{s}", SAE[s]) for s in "AB"})
    return ca, creds


def server_ssl(pki, name):
    ca, creds = pki
    return server_context(ca.ca, creds[name].cert, creds[name].key)


@pytest.fixture
async def kme(pki):
    """Start the KME pair (one per test); stopped at the end of the test."""
    pairs = []

    async def start(**kw) -> CountingKmePair:
        pair = CountingKmePair(sae_a=SAE["A"], sae_b=SAE["B"], **kw)
        pairs.append(pair)
        await pair.start(server_ssl(pki, "kme-A"), server_ssl(pki, "kme-B"))
        return pair

    yield start
    for pair in pairs:
        await pair.stop()


@pytest.fixture
def settings(pki, tmp_path):
    """A link's [links.settings] for the SAE of one end, as a node config would hold them."""
    ca, creds = pki

    def make(side="A", url=None, cert_of=None, key_of=None, **overrides):
        cert_of = cert_of or side
        other = "B" if side == "A" else "A"
        s = {"profile": "idq", "url": url or "https://127.0.0.1:1", "server_hostname": HOSTNAME[side],
             "sae_id": SAE[side], "peer_sae_id": SAE[other], "ca": str(ca.ca),
             "cert": str(creds[f"sae-{cert_of}"].cert), "key": str(creds[f"sae-{key_of or cert_of}"].key),
             "timeout": 5.0, "retries": 2, "backoff": 0.01}
        s.update(overrides)
        return {k: v for k, v in s.items() if v is not None}
    return make


@pytest.fixture
async def driver(settings, tmp_path):
    """Build (and by default connect) a driver from settings; every one is closed at the end."""
    made = []

    async def open_(pair=None, side="A", *, connect=True, **kw) -> Etsi014KeySource:
        if pair is not None:
            kw.setdefault("url", pair.url(side))
        drv = Etsi014KeySource.from_settings(settings(side, **kw), file=tmp_path / CONFIG, key=KEY)
        made.append(drv)
        if connect:
            await drv.connect()
        return drv

    yield open_
    for drv in made:
        await drv.close()


def sizes(blocks):
    return [len(b.bits) * 8 for b in blocks]


# -- keys flow


async def test_master_fetches_within_kme_limits_and_slave_gets_the_same_bits_once(kme, driver):
    pair = await kme(profile="idq", rate_bps=0.0, initial_keys=20)
    master = await driver(pair, "A")
    assert master.last_status.max_key_per_request == 8 and master.last_status.stored_key_count == 20

    first = await master.fetch_new(600)                        # 600 bits make two 256-bit keys
    assert sizes(first) == [256, 256]
    second = await master.fetch_new(1 << 20)                   # clamped to 8 per request
    assert sizes(second) == [256] * 8
    assert (await master.status()).stored_key_count == 10
    third = await master.fetch_new(1 << 20)
    fourth = await master.fetch_new(1 << 20)                   # clamped to the 2 keys left
    assert (len(third), len(fourth)) == (8, 2)
    assert await master.fetch_new(1 << 20) == []
    assert pair.hits["A", "enc_keys"] == 4                     # the empty link cost no enc_keys call

    issued = {b.block_id: bytes(b.bits) for b in first + second + third + fourth}
    assert len(issued) == 20 and len(set(issued.values())) == 20

    slave = await driver(pair, "B")
    wanted = list(issued)[::-1][:11]                           # reversed, more than one request's worth
    got = await slave.fetch_by_ids(wanted)
    assert [b.block_id for b in got] == wanted
    assert [bytes(b.bits) for b in got] == [issued[k] for k in wanted]
    assert pair.hits["B", "dec_keys"] == 2                     # 8 + 3: chunked to the KME's limit

    with pytest.raises(DeviceRejected, match="not available"):
        await slave.fetch_by_ids(wanted[:1])


async def test_status_is_read_again_only_when_what_it_said_no_longer_covers_the_request(kme, driver):
    pair = await kme(profile="toshiba", rate_bps=0.0, initial_keys=64)   # 64 keys of 256 bits in store
    drv = await driver(pair, profile="toshiba", key_size=1024)
    assert pair.hits["A", "status"] == 1
    for _ in range(4):                                         # 4 x 4 x 1024 bits: what connect's status said
        assert sizes(await drv.fetch_new(4096)) == [1024] * 4
    assert pair.hits == {("A", "status"): 1, ("A", "enc_keys"): 4}
    assert await drv.fetch_new(4096) == []                     # nothing left by its count: asked, and empty
    assert pair.hits == {("A", "status"): 2, ("A", "enc_keys"): 4}


async def test_key_another_sae_took_meanwhile_costs_one_503_then_the_status(kme, driver):
    pair = await kme(profile="toshiba", rate_bps=0.0, initial_keys=64)
    drv = await driver(pair, profile="toshiba", key_size=1024, retries=3, backoff=5.0)
    assert pair.stream.take(56 * 256) is not None              # someone else's request: 8 keys of 256 bits left
    t0 = time.monotonic()
    assert sizes(await drv.fetch_new(8192)) == [1024, 1024]    # 503 for 8, then the status, then the 2 it has
    assert time.monotonic() - t0 < 1.0                         # the 503 of the first try was not retried
    assert pair.hits == {("A", "status"): 2, ("A", "enc_keys"): 2}
    assert drv.health.state != "down"


@pytest.mark.parametrize("asked, delivered", [(4096, 1024), (64, 128), (512, 512), (None, 256)])
async def test_key_size_setting_is_kept_inside_the_kmes_limits(kme, driver, asked, delivered):
    pair = await kme(profile="toshiba", rate_bps=None)
    drv = await driver(pair, profile="toshiba", key_size=asked)
    blocks = await drv.fetch_new(4096)
    assert sizes(blocks) == [delivered] * max(1, 4096 // delivered)


async def test_link_running_low_still_yields_blocks_larger_than_the_kmes_default(kme, driver):
    pair = await kme(profile="toshiba", rate_bps=0.0, initial_keys=6)  # 1536 bits in store
    drv = await driver(pair, profile="toshiba", key_size=1024)
    assert sizes(await drv.fetch_new(4096)) == [1024]
    assert (await drv.status()).stored_key_count == 2
    assert await drv.fetch_new(4096) == []                     # 512 bits make no 1024-bit block
    assert pair.hits["A", "enc_keys"] == 1


async def test_empty_link_gives_no_keys_and_no_error(kme, driver):
    pair = await kme(initial_keys=0, rate_bps=0.0)
    drv = await driver(pair)
    assert drv.last_status.stored_key_count == 0
    assert await drv.fetch_new(4096) == []
    assert pair.hits["A", "enc_keys"] == 0


# -- identities


async def test_kme_certificate_must_name_the_host_we_think_we_reach(kme, driver):
    pair = await kme(initial_keys=4, rate_bps=0.0)
    for name in (None, "kme-b.lab"):                           # by IP, or a name the cert does not carry
        drv = await driver(pair, connect=False, server_hostname=name, backoff=5.0)
        t0 = time.monotonic()
        with pytest.raises(DeviceUntrusted, match="certificate") as exc:
            await drv.connect()
        assert time.monotonic() - t0 < 1.0                     # not retried: waiting cannot fix it
        assert "127.0.0.1" in str(exc.value) or "kme-b.lab" in str(exc.value)
    assert sum(pair.hits.values()) == 0                        # never got as far as HTTP
    drv = await driver(pair, server_hostname="kme-a.lab")
    assert sizes(await drv.fetch_new(256)) == [256]


async def test_client_certificate_of_another_sae_is_unauthorized_at_once(kme, driver):
    pair = await kme(initial_keys=4, rate_bps=0.0)
    drv = await driver(pair, "A", connect=False, cert_of="B", backoff=5.0)
    t0 = time.monotonic()
    with pytest.raises(DeviceUnauthorized, match="401") as exc:
        await drv.connect()
    assert time.monotonic() - t0 < 1.0
    assert SAE["B"] in str(exc.value)
    assert pair.hits == {("A", "status"): 1}


# -- faults


async def test_kme_out_of_service_is_retried_then_unavailable(kme, driver):
    pair = await kme(initial_keys=4, rate_bps=0.0)
    drv = await driver(pair, retries=2, backoff=0.05)
    pair.ends["A"].faults.down = True
    t0 = time.monotonic()
    with pytest.raises(DeviceUnavailable, match="503"):
        await drv.fetch_new(256)
    assert time.monotonic() - t0 >= 0.05 + 0.1
    assert pair.hits["A", "status"] == 1 + 3                   # connect, then 1 try + 2 retries
    assert pair.hits["A", "enc_keys"] == 1                     # asked once on the status of connect; its 503 not retried
    pair.ends["A"].faults.down = False
    assert sizes(await drv.fetch_new(256)) == [256]            # back in service: the same driver recovers


async def test_hung_kme_is_given_up_on_after_the_timeout(kme, driver):
    pair = await kme(initial_keys=4, rate_bps=0.0)
    drv = await driver(pair, timeout=0.3, retries=1)
    pair.ends["A"].faults.hang = True
    t0 = time.monotonic()
    with pytest.raises(DeviceUnavailable, match="no answer within 0.3 s"):
        await drv.fetch_new(256)
    assert 0.6 <= time.monotonic() - t0 < 2.0
    # The status read at connect still covers the request: enc_keys is asked at once, 1 try + 1 retry.
    assert (pair.hits["A", "status"], pair.hits["A", "enc_keys"]) == (1, 2)


async def test_garbage_answer_is_a_protocol_error_and_not_retried(kme, driver):
    pair = await kme(initial_keys=4, rate_bps=0.0)
    drv = await driver(pair)
    pair.ends["A"].faults.garbage = True
    with pytest.raises(DeviceProtocolError, match="not JSON"):
        await drv.fetch_new(256)
    assert pair.hits["A", "status"] == 1 and pair.hits["A", "enc_keys"] == 1


async def test_slow_kme_within_the_timeout_still_delivers(kme, driver):
    pair = await kme(initial_keys=4, rate_bps=0.0)
    pair.ends["A"].faults.delay = 0.2
    drv = await driver(pair, timeout=2.0)
    t0 = time.monotonic()
    assert sizes(await drv.fetch_new(512)) == [256, 256]
    assert time.monotonic() - t0 >= 0.2                        # enc_keys delayed (the status of connect covers it)
    assert pair.hits == {("A", "status"): 1, ("A", "enc_keys"): 1}


# -- KMEs that behave unlike the emulator


@pytest.fixture
async def scripted_kme(pki):
    """A hand-written KME on real mutual TLS (client certificate required): the test supplies the
    handlers, by path suffix; yields a starter returning the base URL, and the paths asked."""
    runners, asked = [], []

    async def start(**handlers) -> str:
        app = web.Application()
        for name, fn in handlers.items():
            async def handle(request, fn=fn):
                asked.append(request.path)
                return await fn(request)
            app.router.add_route("*", f"/api/v1/keys/{{sae}}/{name}", handle)
        runner = web.AppRunner(app, access_log=None)
        runners.append(runner)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl(pki, "kme-A"))
        await site.start()
        return f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    yield start, asked
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("profile, error", [("toshiba", DeviceUnauthorized), ("idq", DeviceRejected)])
async def test_400_ssl_certificate_error_means_unauthorized_only_for_toshiba(scripted_kme, driver, profile, error):
    start, asked = scripted_kme

    async def status(request):                                 # a good handshake, then this
        return web.json_response({"message": "SSL certificate error"}, status=400)

    drv = await driver(url=await start(status=status), connect=False, profile=profile, backoff=5.0)
    with pytest.raises(error, match="400: SSL certificate error") as exc:
        await drv.connect()
    assert type(exc.value) is error
    assert asked == [f"/api/v1/keys/{SAE['B']}/status"]        # asked once, as the right SAE's peer


async def test_keys_come_back_in_the_order_asked_whatever_order_the_kme_answers(scripted_kme, driver):
    start, asked = scripted_kme
    held = {str(uuid.UUID(int=i)): bytes([i]) * 32 for i in range(1, 6)}

    async def status(request):
        return web.json_response({"key_size": 256, "stored_key_count": 0, "max_key_count": 100,
                                  "max_key_per_request": 8, "max_key_size": 256, "min_key_size": 256})

    async def dec_keys(request):                               # answers in its own (sorted, reversed) order
        ids = sorted((i["key_ID"] for i in (await request.json())["key_IDs"]), reverse=True)
        return web.json_response({"keys": [{"key_ID": k, "key": base64.b64encode(held[k]).decode()} for k in ids]})

    drv = await driver(url=await start(status=status, dec_keys=dec_keys))
    wanted = [list(held)[i] for i in (2, 0, 4, 1)]
    assert [(b.block_id, bytes(b.bits)) for b in await drv.fetch_by_ids(wanted)] == [(k, held[k]) for k in wanted]


# -- config


@pytest.mark.parametrize("change, dotted", [
    ({"timout": 3.0}, "timout"),
    ({"profile": "cerberis"}, "profile"),
    ({"url": "http://127.0.0.1:8443"}, "url"),
    ({"peer_sae_id": None}, "peer_sae_id"),
    ({"ca": "/nonexistent/ca.pem"}, "ca"),
    ({"cert": "/nonexistent/sae-a.pem"}, "cert"),
    ({"key": "/nonexistent/sae-a-key.pem"}, "key"),
    ({"key_of": "B"}, "cert"),                                 # a certificate and somebody else's key
    ({"retries": -1}, "retries"),
    ({"key_size": 100}, "key_size"),
])
def test_config_mistakes_name_the_file_and_the_key(settings, tmp_path, change, dotted):
    with pytest.raises(ConfigError) as exc:
        Etsi014KeySource.from_settings(settings("A", **change), file=tmp_path / CONFIG, key=KEY)
    assert exc.value.key == f"{KEY}.{dotted}"
    assert str(tmp_path / CONFIG) in str(exc.value) and f"{KEY}.{dotted}:" in str(exc.value)


# -- telemetry (issue 7): what the node's metrics show about a vendor link


async def test_telemetry_reports_the_qber_and_key_rate_the_kme_puts_in_its_status_extension(kme, driver):
    pair = await kme(profile="idq", rate_bps=20_000.0, initial_keys=10)
    drv = await driver(pair, "B")
    t = await drv.telemetry()
    assert 0.0 < t.qber < 0.05 and t.secret_key_rate_bps == 20_000.0 and t.state == "running"
    pair.qber.force(0.093)                                     # the link's QBER jumps: an alarm to raise
    assert (await drv.telemetry()).qber == 0.093


async def test_without_the_extension_qber_is_unknown_and_the_key_rate_is_estimated_from_arrival(kme, driver,
                                                                                                monkeypatch):
    """A vendor KME says nothing of QBER or rate over ETSI 014: the driver does not invent a QBER,
    and estimates the rate from the key that arrives, counting what this node itself took."""
    pair = await kme(profile="idq", rate_bps=40_000.0, initial_keys=0, max_key_count=100_000)
    monkeypatch.setattr(pair, "status_extension", lambda: {})
    drv = await driver(pair, "A")
    first = await drv.telemetry()
    assert first.qber is None and first.secret_key_rate_bps is None   # one sample: no rate yet
    await asyncio.sleep(0.6)
    assert len(await drv.fetch_new(8 * 256)) == 8                      # key taken meanwhile still counts
    await asyncio.sleep(0.6)
    t = await drv.telemetry()
    assert t.qber is None and t.secret_key_rate_bps == pytest.approx(40_000, rel=0.25)


async def test_a_full_kme_store_hides_the_key_rate_so_none_is_reported(kme, driver, monkeypatch):
    pair = await kme(profile="idq", rate_bps=0.0, initial_keys=16, max_key_count=16)
    monkeypatch.setattr(pair, "status_extension", lambda: {})
    drv = await driver(pair, "A")
    await drv.telemetry()
    t = await drv.telemetry()
    assert t.secret_key_rate_bps is None and t.state == "running"


async def test_health_follows_the_kme_down_and_up_again(kme, driver):
    pair = await kme(profile="idq", rate_bps=1000.0, initial_keys=4)
    drv = await driver(pair, "A", retries=0, backoff=0.01)
    assert drv.health.state == "up"
    pair.ends["A"].faults.down = True
    for _ in range(3):
        with pytest.raises(DeviceUnavailable):
            await drv.telemetry()
    assert drv.health.state == "down" and "503" in drv.health.last_error
    pair.ends["A"].faults.down = False
    await drv.telemetry()
    assert drv.health.state == "up"


async def test_a_status_answer_that_is_no_kme_status_counts_against_health(kme, driver):
    pair = await kme(profile="idq", rate_bps=1000.0, initial_keys=4)
    drv = await driver(pair, "A", retries=0)
    pair.ends["A"].faults.garbage = True
    with pytest.raises(DeviceProtocolError):
        await drv.telemetry()
    assert drv.health.state == "degraded"
