"""The tools of the benchmarks (docs/performance.md): an emulated network whose links make key
as fast as they are asked for, and the load generator's figures. No timing is asserted here."""

import asyncio

from hil.kme import KeyStream
from hil.testbed import UNLIMITED_CV_TIME_SCALE, Testbed
from qkdnode import eventloop
from qkdnode.cli import build_parser

from bench.api import metrics_of
from bench.loadgen import _summary


def test_demo_with_unlimited_key_rate_makes_key_as_fast_as_it_is_asked_for(tmp_path):
    args = build_parser().parse_args(["demo", "--unlimited-key-rate", "--workdir", str(tmp_path)])
    assert args.unlimited_key_rate
    tb = Testbed(tmp_path / "net", rate_bps=50_000.0, cv_time_scale=4.0, unlimited_key_rate=True)
    assert tb.rate_bps is None and tb.cv_time_scale == UNLIMITED_CV_TIME_SCALE
    stream = KeyStream(256, 16, tb.rate_bps)
    for _ in range(100):                                   # never runs dry, never waits
        assert len(stream.take(256 * 16)) == 512
    assert Testbed(tmp_path / "other").rate_bps == 50_000.0


def test_the_load_generator_reports_percentiles_of_what_it_timed():
    out = _summary([i / 1000 for i in range(1000, 0, -1)], 2.0, {"enc_keys 503": 3})
    assert out["requests"] == 1000 and out["requests_per_s"] == 500.0
    assert (out["p50_ms"], out["p99_ms"], out["p999_ms"], out["max_ms"]) == (501.0, 991.0, 1000.0, 1000.0)
    assert out["errors"] == {"enc_keys 503": 3}


def test_metrics_text_is_read_into_numbers():
    text = '# HELP x\nqkdnode_pool_ready_bits{link="A-B"} 4096.0\nqkdnode_keys_served_total{call="enc_keys"} 7\n'
    assert metrics_of(text) == {'qkdnode_pool_ready_bits{link="A-B"}': 4096.0,
                                'qkdnode_keys_served_total{call="enc_keys"}': 7.0}


def test_the_event_loop_is_asyncio_unless_uvloop_is_asked_for(monkeypatch):
    async def which():
        return type(asyncio.get_running_loop()).__module__
    monkeypatch.delenv("QKDNODE_EVENT_LOOP", raising=False)
    assert eventloop.run(which()).startswith("asyncio")
    monkeypatch.setenv("QKDNODE_EVENT_LOOP", "uvloop")
    try:
        import uvloop  # noqa: F401
    except ImportError:
        assert eventloop.run(which()).startswith("asyncio")
    else:
        assert eventloop.run(which()).startswith("uvloop")
