"""Every driver's reply parser under property-based fuzzing (issue 9): whatever a device answers,
the driver raises one of its DriverError types (which the node counts as a device fault) or
returns well-formed values; never another exception, never a hang. The ETSI 014 client is
also driven over the wire by an emulated KME that answers hostile bodies."""

from __future__ import annotations

import asyncio
import json
import string
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import aq6370, cvqkd, polatis
from drivers.cvqkd import CvQkdSerial, LineRejected, frame, unframe
from drivers.etsi014 import Etsi014KeySource, _error_message
from qkdnode.errors import DriverError
from tests.campaign_support import LONG, record

EXAMPLES = 3000 if LONG else 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
                suppress_health_check=list(HealthCheck))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
                    lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=12), c, max_size=6),
                    max_leaves=30)
RUNS: dict[str, int] = {}


def counted(name: str) -> None:
    RUNS[name] = RUNS.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    for name, n in RUNS.items():
        record("fuzz", target=f"driver parser: {name}", examples=n, passed=True)


# ---------------------------------------------------------------- ETSI 014 key client


def etsi014() -> Etsi014KeySource:
    return Etsi014KeySource(url="https://kme.invalid", peer_sae_id="sae-b", ca=None, cert=None, key=None,
                            timeout=1, retries=0, backoff=0, backoff_max=0, ssl_context=object())


KEY_ITEM = st.fixed_dictionaries({}, optional={
    "key_ID": st.one_of(st.uuids().map(str), st.text(max_size=40), JSON),
    "key": st.one_of(st.binary(max_size=64).map(lambda b: __import__("base64").b64encode(b).decode()),
                     st.text(max_size=60), JSON),
    "key_ID_extension": JSON})


@FUZZ
@given(body=st.one_of(JSON, st.fixed_dictionaries({"keys": st.one_of(st.lists(KEY_ITEM, max_size=5), JSON)})),
       size=st.one_of(st.none(), st.sampled_from([8, 256, 1024])),
       expect=st.one_of(st.none(), st.lists(st.uuids().map(str), max_size=3)))
def test_etsi014_key_containers(body, size, expect):
    counted("etsi014 key container")
    try:
        blocks = etsi014()._parse_keys(body, size, expect)
    except DriverError:
        return
    assert all(b.bits for b in blocks)
    if expect is None:
        assert blocks
    else:
        assert [b.block_id for b in blocks] == expect


@FUZZ
@given(text=st.one_of(st.text(max_size=200), JSON.map(json.dumps),
                      st.integers(1, 50000).map(lambda n: "[" * n + "]" * n)))
def test_etsi014_error_bodies(text):
    counted("etsi014 error body")
    message = _error_message(text)
    assert isinstance(message, str) and len(message) <= 300


STATUS_FIELDS = ("key_size", "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
                 "min_key_size")


class HostileKme:
    """An ETSI 014 'KME' on a real TLS socket that answers whatever the test says."""

    def __init__(self, pki):
        self.pki, self.reply = pki, b"{}"

    async def __aenter__(self):
        from aiohttp import web

        async def any_call(request):
            return web.Response(status=200, body=self.reply, content_type="application/json")

        import ssl
        ca, creds = self.pki
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.ca))
        ctx.load_cert_chain(str(creds["kme"].cert), str(creds["kme"].key))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_call)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


@pytest.fixture
def pki(tmp_path):
    from hil.pki import ThrowawayPKI
    ca = ThrowawayPKI(tmp_path / "pki")
    return ca, {"kme": ca.issue("kme", "kme", hosts=("127.0.0.1",), server=True, client=False),
                "sae": ca.issue("sae", "sae-a")}


HOSTILE_BODIES = [b"[" * 100000 + b"]" * 100000, b'{"keys": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                  b'{"key_size": ' + b"9" * 5000 + b"}", b"\xff\xfe\x00", b"", b"null", b"1e999",
                  json.dumps({n: -1 for n in STATUS_FIELDS}).encode(),
                  json.dumps({n: 2**70 for n in STATUS_FIELDS}).encode(),
                  json.dumps({**{n: 8 for n in STATUS_FIELDS}, "max_key_per_request": 0}).encode(),
                  json.dumps({"keys": [{"key_ID": "not-a-uuid", "key": "AA=="}]}).encode()]


async def test_etsi014_client_against_a_kme_answering_hostile_bodies_over_tls(pki):
    ca, creds = pki
    async with HostileKme(pki) as kme:
        drv = Etsi014KeySource(url=f"https://127.0.0.1:{kme.port}", peer_sae_id="sae-b", ca=ca.ca,
                               cert=creds["sae"].cert, key=creds["sae"].key, timeout=5, retries=0, backoff=0,
                               backoff_max=0)
        import aiohttp
        drv._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=drv._ssl))
        try:
            for body in HOSTILE_BODIES:
                kme.reply = body
                for call in (drv.status, lambda: drv.fetch_new(1024),
                             lambda: drv.fetch_by_ids(["2c3f3f1e-0000-4000-8000-000000000000"])):
                    try:   # a plausible status (huge limits) may pass; anything else is a DriverError
                        await asyncio.wait_for(call(), 10)
                    except DriverError:
                        pass
                    counted("etsi014 over TLS, hostile KME")
        finally:
            await drv.close()


# ---------------------------------------------------------------- CV-QKD line protocol


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), st.text(string.printable, max_size=200).map(str.encode),
                     st.text(max_size=100).map(lambda t: frame(t.encode("ascii", "replace").decode())[:-2]
                                               if t.isascii() else t.encode("utf-8"))))
def test_cv_lines_unframe_or_are_rejected(raw):
    counted("CV-QKD framing")
    try:
        payload = unframe(raw)
    except LineRejected:
        return
    assert payload.isascii() and f"{zlib.crc32(payload.encode()):08x}" == raw.rstrip(b"\r")[-8:].decode().lower()


WORDS = st.sampled_from(["*", "-", "1a", "OK", "ERR", "BLOCK", "STATE", "ALARM", "READY", "raised", "cleared",
                         "running", "no-key", "noise", "NOISE", "404", "500", "abc", "=", "nan", "inf", "-1",
                         "state=running", "skr=1e9", "snr=nan", "xnoise=", "stored=99999999", "channel=34",
                         "AAAA", "8", "0", "65536", "9" * 30, "x" * 70])


@FUZZ
@given(payloads=st.lists(st.one_of(st.lists(WORDS, max_size=8).map(" ".join),
                                   st.text(string.ascii_letters + string.digits + " *-=.:", max_size=120)),
                         min_size=1, max_size=6))
def test_cv_driver_takes_any_framed_line_without_raising(payloads):
    """Replies and events as the module might send them (right checksum, any content)."""
    counted("CV-QKD replies and events")
    drv = CvQkdSerial(port="/dev/null", role="receiver")
    line = object()
    drv._line = line
    drv._fresh = False

    async def feed():
        drv._on_lines(line, [frame(p)[:-2] for p in payloads if p.isascii()])
    asyncio.run(feed())
    assert drv.rejected_lines >= 0


@FUZZ
@given(fields=st.lists(WORDS, max_size=10))
def test_cv_status_and_block_fields(fields):
    counted("CV-QKD STATUS? and BLOCK fields")
    drv = CvQkdSerial(port="/dev/null", role="receiver")
    for parse in (drv._take_status, drv._parse_block):
        try:
            parse(fields)
        except DriverError:
            pass


# ---------------------------------------------------------------- SCPI: Polatis switch and AQ6370 OSA


SCPI = st.one_of(st.text(max_size=80), st.sampled_from([
    "", "8,8", "0,0", "99999999,1", "(@1,2),(@9,10)", "(@1:3),(@9:11)", "(@1:99999),(@2)", "(@),(@)",
    "(@3,1),(@9,9)", "(@a),(@b)", "E,D,E", "(" + ",".join("E" * 16) + ")", "1", "0", " 12 ", "1_0",
    "-1.5,-2,NaN", "0,\"No error\"", "-222,\"Data out of range\"", "+1", "1e999", "nan", "inf",
    "1,2,3", "1550e-9,1551e-9", "1e-9," * 10]))


@FUZZ
@given(replies=st.lists(SCPI, min_size=1, max_size=12))
def test_polatis_replies(replies):
    counted("Polatis SCPI replies")
    sw = polatis.PolatisSwitch(resource="TCPIP::127.0.0.1::1::SOCKET")
    feed = iter(replies * 20)
    sw._ask = lambda command, timeout=None: next(feed)
    sw._close_session = lambda: None
    sw._size = (8, 8)
    for read in (sw._read_size, sw._read_map, lambda: sw._read_partner(3), sw._read_port_states, sw._read_powers,
                 lambda: sw._drain_errors(None)):
        try:
            read()
        except (DriverError, StopIteration):
            pass


@FUZZ
@given(replies=st.lists(SCPI, min_size=3, max_size=12))
def test_aq6370_replies(replies):
    counted("AQ6370 SCPI replies")
    osa = aq6370.Aq6370(resource="TCPIP::127.0.0.1::1::SOCKET")
    feed = iter(replies * 20)
    osa._query = lambda command, **kw: next(feed)
    osa._write_all = lambda commands, **kw: None

    async def io(fn):
        return fn()
    osa._io = io

    async def run():
        for read in (lambda: osa._read_trace(None), lambda: osa._read_trace((1540.0, 1560.0)),
                     lambda: osa._check_errors("a test")):
            try:
                await read()
            except (DriverError, StopIteration):
                pass
        for text in replies:
            for parse in (lambda: aq6370._int(text, "osa", "Q?"), lambda: aq6370._floats(text, "osa", "Q?")):
                try:
                    parse()
                except DriverError:
                    pass
    asyncio.run(run())
