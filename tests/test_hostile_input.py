"""Hostile input (issue 9): the ETSI 014 API against its OpenAPI description and property-based
fuzzing (schemathesis and hypothesis), the peer channel with a node's certificate, the ETSI 004
and SKIP listeners, and every driver's reply parser. A request that is refused gets a 4xx with
an error object, never a 500, never a hang, and changes nothing: the vaults of both nodes
(blocks, keys waiting, audit, outbox) are the same before and after.

The network runs in a thread of its own (nodes as processes, the KME pair on that thread's
event loop), so that schemathesis and hypothesis drive it with plain blocking calls.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hil.testbed import Testbed
from qkdnode.peer import PEER_MAX_BODY
from tests.campaign_support import LONG, record

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "openapi" / "etsi014.yaml"


def examples_for(long: bool) -> int:
    """Hypothesis examples per hostile-input test in the campaign's long or bounded mode."""
    return 400 if long else 40


EXAMPLES = examples_for(LONG)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
                suppress_health_check=list(HealthCheck))
TIMEOUT = 15.0          # a refused request is answered well within this; more is a hang


# ---------------------------------------------------------------- the network, on its own thread


class LiveNet:
    def __init__(self, workdir: Path):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="testbed loop", daemon=True)
        self.thread.start()
        # Every key the KME pair will ever make fits the pools: after the first fill, the vaults
        # change only through the requests of the tests.
        self.tb = Testbed(workdir, rate_bps=0.0, initial_keys=1024, pool_target_bits=1024 * 256, profile="toshiba")
        self.run(self.tb.start())
        self.m = self.tb.manifest()
        self.counts = {"examples": 0, "refused": 0, "served": 0}

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def stop():
            for n in self.tb.nodes.values():
                n.proc.terminate()
            while any(n.proc.poll() is None for n in self.tb.nodes.values()):
                await asyncio.sleep(0.05)
            await self.tb.stop()
        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    # -- clients

    def sae(self, sae: str) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace our CA
        entry = self.m["saes"][sae]
        s.cert, s.verify = (entry["cert"], entry["key"]), self.m["ca"]
        return s

    def node_session(self, node: str) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        cred = self.tb.node_creds[node]
        s.cert, s.verify = (str(cred.cert), str(cred.key)), self.m["ca"]
        return s

    def api(self, node: str, which: str = "etsi014") -> str:
        return self.m["nodes"][node][which]

    # -- what must not change

    def state(self) -> dict:
        """Bookkeeping of both vaults (no key bits: free bytes, counts)."""
        out = {}
        for name in self.tb.nodes:
            db = self.tb.dir / name / "vault.db"
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                out[name] = (
                    conn.execute("SELECT link, state, COUNT(*), SUM(free), GROUP_CONCAT(carved) FROM blocks "
                                 "GROUP BY link, state ORDER BY link, state").fetchall(),
                    conn.execute("SELECT COUNT(*), GROUP_CONCAT(pending) FROM keys").fetchone(),
                    conn.execute("SELECT COUNT(*) FROM audit").fetchone(),
                    conn.execute("SELECT COUNT(*) FROM outbox").fetchone())
            finally:
                conn.close()
        return out

    def pool_ready(self) -> None:
        """Wait until both ends hold every key the KME pair made (nothing more will come)."""
        deadline = time.monotonic() + 60
        with self.sae("sae-a1") as a:
            while time.monotonic() < deadline:
                r = a.get(self.api("A") + "/api/v1/keys/sae-b1/status", timeout=10)
                if r.status_code == 200 and r.json()["stored_key_count"] >= 1024 and not self.pending():
                    return
                time.sleep(0.2)
        raise AssertionError("the pools did not fill")

    def pending(self) -> bool:
        db = self.tb.dir / "A" / "vault.db"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return bool(conn.execute("SELECT COUNT(*) FROM blocks WHERE state='pending'").fetchone()[0])
        finally:
            conn.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    n = LiveNet(tmp_path_factory.mktemp("hostile") / "net")
    try:
        n.pool_ready()
        yield n
    finally:
        n.close()
        record("fuzz", target="totals", **n.counts)


JSON_TYPE = {"Content-Type": "application/json"}


def as_json(body) -> bytes:
    """JSON as a careless client writes it: Infinity and NaN included (requests' json= refuses them)."""
    return json.dumps(body, allow_nan=True).encode()


def refused_changes_nothing(net: LiveNet, send, *, allow_success: bool = False) -> requests.Response:
    """Send one request; a refusal must be a 4xx error object (or 503 for lack of key) and leave
    both vaults as they were."""
    before = net.state()
    started = time.monotonic()
    resp = send()
    assert time.monotonic() - started < TIMEOUT
    net.counts["examples"] += 1
    assert resp.status_code < 500 or resp.status_code == 503, (resp.status_code, resp.text[:300])
    if resp.status_code == 200:
        net.counts["served"] += 1
        assert allow_success, resp.text[:200]
        return resp
    net.counts["refused"] += 1
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"], resp.text[:200]
    assert net.state() == before, f"a refused request ({resp.status_code}) changed a vault"
    return resp


# ---------------------------------------------------------------- the OpenAPI description


def test_the_openapi_description_matches_the_served_api():
    """docs/openapi/etsi014.yaml names exactly the routes, parameters and body fields of
    qkdnode/api014.py."""
    from qkdnode import api014
    from qkdnode.limits import SaeLimits

    spec = yaml.safe_load(SPEC.read_text())
    assert spec["openapi"].startswith("3.")

    class FakeNode:  # what make_api_app reads at build time (the config only per request)
        cfg, metrics, limits = None, None, SaeLimits()

    app = api014.make_api_app(FakeNode())
    served = {(r.method, r.resource.canonical.replace("{sae}", "{}")) for r in app.router.routes()
              if r.method != "HEAD"}  # aiohttp answers HEAD wherever GET is served
    described = {(m.upper(), p.replace("{slave_SAE_ID}", "{}").replace("{master_SAE_ID}", "{}"))
                 for p, ops in spec["paths"].items() for m in ops}
    assert served == described
    ops = spec["paths"]
    comp = spec["components"]["schemas"]
    assert set(comp["KeyRequest"]["properties"]) == api014.ENC_FIELDS
    assert set(comp["KeyIDs"]["properties"]) == api014.DEC_FIELDS
    assert {p["name"] for p in ops["/api/v1/keys/{slave_SAE_ID}/enc_keys"]["get"]["parameters"]
            if "name" in p} == {"number", "size"}
    assert {p["name"] for p in ops["/api/v1/keys/{master_SAE_ID}/dec_keys"]["get"]["parameters"]
            if "name" in p} == {"key_ID"}
    # The status object lists what the status handler answers.
    src = (ROOT / "qkdnode" / "api014.py").read_text()
    for name in comp["Status"]["properties"]:
        assert f'"{name}"' in src, name
    # Every status code the handlers raise is described for the calls that raise it.
    for code in ("400", "401", "429", "503"):
        assert code in json.dumps(ops), code


# ---------------------------------------------------------------- ETSI 014: targeted hostile requests


SAE_IDS = st.one_of(st.sampled_from(["sae-b1", "sae-a1", "sae-b2", "nobody", "", "SAE-B1", "sae-b1 ",
                                     "node:B", "B", "../b1", "sae\u00e9", "\u2603", "sae-b1\x00"]),
                    st.text(min_size=0, max_size=40))
SLAVES_OF_A = {"sae-b1", "sae-b2"}   # the SAEs an SAE of node A may name as its slave
HOSTILE_NUMBERS = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True),
                            st.booleans(), st.text(max_size=20), st.none(), st.lists(st.integers(), max_size=3),
                            st.sampled_from([10**400, -0, 129, 0, 1.0, "1", 2**63, 2**64 + 1]))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=12), c, max_size=5),
                    max_leaves=25)


@FUZZ
@given(slave=SAE_IDS, number=HOSTILE_NUMBERS, size=HOSTILE_NUMBERS,
       extra=st.one_of(st.none(), st.lists(SAE_IDS, max_size=10), JSON),
       junk=st.dictionaries(st.text(max_size=10), JSON, max_size=2))
def test_enc_keys_with_hostile_bodies(net, slave, number, size, extra, junk):
    body = {**junk, "number": number, "size": size}
    if extra is not None:
        body["additional_slave_SAE_IDs"] = extra
    ok = (slave in SLAVES_OF_A and not junk and isinstance(number, int) and not isinstance(number, bool)
          and isinstance(size, int) and not isinstance(size, bool) and 1 <= number <= 128
          and size % 8 == 0 and 64 <= size <= 8192 and extra in (None, []))
    with net.sae("sae-a1") as s:
        url = f"{net.api('A')}/api/v1/keys/{requests.utils.quote(slave, safe='')}/enc_keys"
        data = json.dumps(body, allow_nan=True).encode()
        refused_changes_nothing(net, lambda: s.post(url, data=data, timeout=TIMEOUT,
                                                     headers={"Content-Type": "application/json"}),
                                allow_success=ok)


@FUZZ
@given(master=SAE_IDS, ids=st.one_of(st.lists(st.one_of(st.uuids().map(str), st.text(max_size=40),
                                                      st.integers(), st.none(), JSON), max_size=8), JSON),
       wrap=st.booleans())
def test_dec_keys_with_hostile_key_ids(net, master, ids, wrap):
    body = {"key_IDs": [{"key_ID": i} for i in ids] if wrap and isinstance(ids, list) else ids}
    with net.sae("sae-b1") as s:
        url = f"{net.api('B')}/api/v1/keys/{requests.utils.quote(master, safe='')}/dec_keys"
        refused_changes_nothing(net, lambda: s.post(url, data=as_json(body), headers=JSON_TYPE, timeout=TIMEOUT))


@FUZZ
@given(number=st.text(max_size=30), size=st.text(max_size=30), key_id=st.text(max_size=60),
       slave=SAE_IDS)
def test_query_strings_with_hostile_values(net, number, size, key_id, slave):
    quoted = requests.utils.quote(slave, safe="")
    with net.sae("sae-a1") as a, net.sae("sae-b1") as b:
        ok = slave in SLAVES_OF_A and number.isascii() and number.isdigit() and size.isascii() and size.isdigit() \
            and 1 <= int(number) <= 128 and int(size) % 8 == 0 and 64 <= int(size) <= 8192
        refused_changes_nothing(net, lambda: a.get(f"{net.api('A')}/api/v1/keys/{quoted}/enc_keys",
                                                   params={"number": number, "size": size}, timeout=TIMEOUT),
                                allow_success=ok)
        refused_changes_nothing(net, lambda: b.get(f"{net.api('B')}/api/v1/keys/{quoted}/dec_keys",
                                                   params={"key_ID": key_id}, timeout=TIMEOUT))
        refused_changes_nothing(net, lambda: a.get(f"{net.api('A')}/api/v1/keys/{quoted}/status",
                                                   timeout=TIMEOUT), allow_success=slave in SLAVES_OF_A)


RAW_CASES = {
    "oversized body (65 KiB)": ("POST", "sae-b1/enc_keys", b'{"number": 1, "x": "' + b"a" * 66000 + b'"}'),
    "deep JSON (20000 levels)": ("POST", "sae-b1/enc_keys", b"[" * 20000 + b"]" * 20000),
    "deep JSON in a field": ("POST", "sae-b1/enc_keys", b'{"number": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    "deep JSON at dec_keys": ("POST", "sae-a1/dec_keys", b'{"key_IDs": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    "huge number (5000 digits)": ("POST", "sae-b1/enc_keys", b'{"number": ' + b"9" * 5000 + b"}"),
    "huge number in the query": ("GET", "sae-b1/enc_keys?number=" + "9" * 5000, None),
    "superscript digit in the query": ("GET", "sae-b1/enc_keys?number=%C2%B2", None),
    "size 1e400": ("POST", "sae-b1/enc_keys", b'{"size": 1e400}'),
    "NaN": ("POST", "sae-b1/enc_keys", b'{"number": NaN}'),
    "not UTF-8": ("POST", "sae-b1/enc_keys", b'{"number": "\xff\xfe"}'),
    "a JSON string": ("POST", "sae-b1/enc_keys", b'"number"'),
    "unicode SAE ID": ("GET", "%E2%98%83%F0%9F%94%91/status", None),
    "NUL in the SAE ID": ("GET", "sae-b1%00/status", None),
    "path traversal": ("GET", "..%2F..%2Fmetrics/status", None),
    "non-UUID key_ID": ("GET", "sae-a1/dec_keys?key_ID=../../etc/passwd", None),
    "upper-case UUID": ("GET", f"sae-a1/dec_keys?key_ID={str(uuid.uuid4()).upper()}", None),
    "10000 key_IDs": ("POST", "sae-a1/dec_keys",
                      json.dumps({"key_IDs": [{"key_ID": str(uuid.uuid4())} for _ in range(1500)]}).encode()),
    "unknown method": ("DELETE", "sae-b1/enc_keys", None),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_raw_hostile_requests_get_an_error_object_and_change_nothing(net, case):
    method, path, data = RAW_CASES[case]
    node, sae = ("B", "sae-b1") if "dec_keys" in path else ("A", "sae-a1")
    with net.sae(sae) as s:
        resp = refused_changes_nothing(net, lambda: s.request(
            method, f"{net.api(node)}/api/v1/keys/{path}", data=data, timeout=TIMEOUT,
            headers={"Content-Type": "application/json"}))
    assert 400 <= resp.status_code < 500, (case, resp.status_code, resp.text[:200])
    record("fuzz", target=f"ETSI 014 raw: {case}", status=resp.status_code, passed=True)


# ---------------------------------------------------------------- ETSI 014: schemathesis from the description


def test_schemathesis_finds_no_server_error_and_no_state_change_on_refusals(net):
    """Every operation of docs/openapi/etsi014.yaml, with schemathesis generating valid and
    invalid requests (negative testing), over mutual TLS with an SAE's certificate."""
    import schemathesis
    from hypothesis import given as h_given
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_path(str(SPEC))
    schema.config.update(base_url=net.api("A"))
    counted = {"cases": 0, "operations": 0}
    for result, mode in ((r, m) for r in schema.get_all_operations()
                         for m in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)):
        op = result.ok()
        counted["operations"] += mode is schemathesis.GenerationMode.POSITIVE

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
                  suppress_health_check=list(HealthCheck))
        @h_given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            counted["cases"] += 1
            before = net.state()
            with net.sae("sae-a1") as session:
                resp = case.call(session=session, timeout=TIMEOUT, verify=session.verify, cert=session.cert)
            assert resp.status_code < 500 or resp.status_code == 503, (case.path, resp.status_code, resp.text[:200])
            if resp.status_code != 200:
                body = resp.json()
                assert isinstance(body, dict) and body.get("message"), resp.text[:200]
                assert net.state() == before
            elif mode is schemathesis.GenerationMode.POSITIVE:
                case.validate_response(resp)

        try:
            check()
        except Unsatisfiable:  # nothing invalid to make (status: any string is a valid SAE ID in the schema)
            assert mode is schemathesis.GenerationMode.NEGATIVE
    net.counts["examples"] += counted["cases"]
    record("fuzz", target="ETSI 014 (schemathesis, every operation of docs/openapi/etsi014.yaml)",
           examples=counted["cases"], operations=counted["operations"], passed=True)


# ---------------------------------------------------------------- the peer channel


PEER_VERBS = ["offer", "keys", "allocate", "discard", "relay", "lsa", "etsi004"]


@FUZZ
@given(verb=st.sampled_from(PEER_VERBS), body=st.one_of(JSON, st.fixed_dictionaries({}, optional={
    "master": SAE_IDS, "slaves": st.lists(SAE_IDS, max_size=3), "size": HOSTILE_NUMBERS, "number": HOSTILE_NUMBERS,
    "salt": st.text(max_size=40), "blocks": JSON, "keys": st.lists(JSON, max_size=3), "reason": st.text(max_size=20),
    "adverts": st.lists(JSON, max_size=3), "path": st.lists(st.sampled_from(["A", "B", "C", "X"]), max_size=4),
    "relay_ID": st.text(max_size=10), "key_IDs": st.lists(st.text(max_size=40), max_size=3),
    "pad_key_ID": st.text(max_size=40), "key_from_pad": JSON, "ciphertext": st.text(max_size=40),
    "tag": st.text(max_size=40), "op": st.sampled_from(["open", "keys", "close", "x"]), "to": st.text(max_size=3),
    "origin": st.text(max_size=3), "hops": HOSTILE_NUMBERS, "key_stream_ID": st.text(max_size=40)})))
def test_peer_messages_from_the_right_node_with_hostile_content(net, verb, body):
    """Node A's own certificate (the link's peer, so past the identity check) sending B nonsense."""
    with net.node_session("A") as s:
        url = f"{net.m['nodes']['B']['peer']}/peer/v1/links/A-B/{verb}"
        resp = refused_changes_nothing(net, lambda: s.post(url, data=as_json(body), headers=JSON_TYPE, timeout=TIMEOUT),
                                       allow_success=verb in ("lsa", "discard", "etsi004"))
        if resp.status_code == 200 and verb == "discard":
            assert resp.json().get("discarded") == 0


@pytest.mark.parametrize("verb", PEER_VERBS)
def test_peer_messages_deep_or_huge_are_refused(net, verb):
    with net.node_session("A") as s:
        url = f"{net.m['nodes']['B']['peer']}/peer/v1/links/A-B/{verb}"
        for data in (b"[" * 50000 + b"]" * 50000, b'{"size": ' + b"9" * 5000 + b"}", b"\xff" * 100,
                     b'{"x": "' + b"a" * PEER_MAX_BODY + b'"}'):
            resp = refused_changes_nothing(net, lambda: s.post(url, data=data, timeout=TIMEOUT,
                                                               headers={"Content-Type": "application/json"}))
            assert 400 <= resp.status_code < 500, (verb, resp.status_code, resp.text[:200])
    record("fuzz", target=f"peer verb {verb}: deep JSON, 5000-digit number, not UTF-8, a body over "
                          f"{PEER_MAX_BODY >> 20} MiB",
           passed=True)


# ---------------------------------------------------------------- ETSI 004 and SKIP listeners


@FUZZ
@given(call=st.sampled_from(["open_connect", "get_key", "close"]), body=st.one_of(JSON, st.fixed_dictionaries({}, optional={
    "source": SAE_IDS, "destination": SAE_IDS, "key_stream_ID": st.text(max_size=40), "index": HOSTILE_NUMBERS,
    "metadata_size": HOSTILE_NUMBERS, "qos": st.one_of(JSON, st.fixed_dictionaries({}, optional={
        k: HOSTILE_NUMBERS for k in ("key_chunk_size", "max_bps", "min_bps", "jitter", "priority", "timeout",
                                     "TTL")}))})))
def test_etsi004_calls_with_hostile_bodies(net, call, body):
    with net.sae("sae-a1") as s:
        url = f"{net.api('A', 'etsi004')}/etsi004/v1/{call}"
        before = net.state()
        resp = s.post(url, data=as_json(body), headers=JSON_TYPE, timeout=TIMEOUT)
        net.counts["examples"] += 1
        assert resp.status_code < 500, (resp.status_code, resp.text[:300])
        if resp.status_code != 200 or resp.json().get("status") not in (0, 1):
            assert net.state() == before


@FUZZ
@given(remote=SAE_IDS, size=st.text(max_size=12), key_id=st.text(max_size=40))
def test_skip_calls_with_hostile_parameters(net, remote, size, key_id):
    with net.sae("sae-a1") as s:
        base = net.api("A", "skip")
        for send in (lambda: s.get(f"{base}/key", params={"remoteSystemID": remote, "size": size}, timeout=TIMEOUT),
                     lambda: s.get(f"{base}/key/{requests.utils.quote(key_id, safe='')}",
                                   params={"remoteSystemID": remote}, timeout=TIMEOUT)):
            before = net.state()
            resp = send()
            net.counts["examples"] += 1
            assert resp.status_code < 500 or resp.status_code == 503, (resp.status_code, resp.text[:300])
            if resp.status_code != 200:
                assert net.state() == before


def test_deep_json_and_huge_numbers_at_etsi004_and_skip(net):
    with net.sae("sae-a1") as s:
        for data in (b"[" * 20000 + b"]" * 20000, b'{"index": ' + b"9" * 5000 + b"}"):
            resp = refused_changes_nothing(net, lambda: s.post(f"{net.api('A', 'etsi004')}/etsi004/v1/get_key",
                                                               data=data, timeout=TIMEOUT,
                                                               headers={"Content-Type": "application/json"}))
            assert resp.status_code == 400
        for size in ("\u00b2", "9" * 5000, "1e3", "-8"):
            resp = refused_changes_nothing(net, lambda: s.get(f"{net.api('A', 'skip')}/key",
                                                              params={"remoteSystemID": "sae-b1", "size": size},
                                                              timeout=TIMEOUT))
            assert resp.status_code == 400, (size, resp.status_code)
