"""The metrics catalogue as an operator reads it: every metric documented, the optical layer as
the instruments report it, the pool's time to empty, and a running node's page."""

import asyncio
import math
import re
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import generate_latest

from types import SimpleNamespace

from drivers.aq6370 import Aq6370, quantum_band_power
from drivers.etsi014 import Etsi014KeySource
from drivers.polatis import PolatisSwitch
from hil.kme import KmePair
from hil.osa import Aq6370Emulator, CBandSpectrum, Leak
from hil.pki import ThrowawayPKI
from hil.switch import PolatisEmulator
from qkdnode import config
from qkdnode.errors import DriverError
from qkdnode.metrics import NodeMetrics
from qkdnode.telemetry import Telemetry, TimeToEmpty
from qkdnode.tlsutil import server_context
from tests.conftest import wait_for
from tests.ops_support import config_of, first_node, samples, series, value
from tests.sae_client import SaeClient

ROOT = Path(__file__).resolve().parent.parent
NOTCH = [34, 35, 36, 37, 38]


def page(m: NodeMetrics) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(m.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


# ---------------------------------------------------------------- the catalogue


def test_every_metric_is_documented_and_every_documented_metric_exists():
    documented = set(re.findall(r"^\| `(qkdnode_[a-z0-9_]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), re.M))
    exposed = NodeMetrics("n").metric_names()
    families = {n for n in exposed if not n.endswith(("_created", "_bucket", "_sum", "_count"))} | \
               {n[:-len("_bucket")] for n in exposed if n.endswith("_bucket")}
    assert documented == families, (f"undocumented: {sorted(families - documented)}; "
                                    f"documented but not exposed: {sorted(documented - families)}")


def test_names_follow_prometheus_conventions():
    for name in NodeMetrics("n").metric_names():
        assert re.fullmatch(r"qkdnode_[a-z0-9_]+", name), name
        assert not name.endswith("_total_total")
    m = NodeMetrics("n")
    for fam in m.registry.collect():
        if fam.type == "gauge" and fam.name not in ("qkdnode_info",):
            assert not fam.name.endswith("_total"), f"{fam.name}: a gauge named like a counter"


# ---------------------------------------------------------------- time to empty


def test_time_to_empty_projects_the_net_draw():
    tte = TimeToEmpty(window=60)
    assert tte.add(0, 100_000) == math.inf                 # one sample: no evidence of a draw
    assert tte.add(10, 90_000) == pytest.approx(90)        # 1000 bit/s net: 90 s left
    assert tte.add(20, 80_000) == pytest.approx(80)


def test_a_pool_refilled_as_fast_as_it_is_drawn_will_not_empty():
    tte = TimeToEmpty(window=60)
    for t, ready in ((0, 50_000), (5, 20_000), (10, 50_000), (15, 20_000), (20, 50_000)):
        last = tte.add(t, ready)
    assert last == math.inf
    assert TimeToEmpty().add(0, 0) == 0.0                  # an empty pool is empty now


def test_an_old_draw_slides_out_of_the_window():
    tte = TimeToEmpty(window=60)
    tte.add(0, 1_000_000)
    tte.add(30, 500_000)                                   # a burst half a minute ago
    for t in range(40, 200, 10):
        last = tte.add(t, 500_000)                         # then nothing for two minutes
    assert last == math.inf


# ---------------------------------------------------------------- a link's device stops answering


async def test_when_the_kme_stops_answering_its_figures_vanish_and_the_device_shows_down(tmp_path):
    pki = ThrowawayPKI(tmp_path / "pki")
    kme = pki.issue("kme-a", "KME-A", hosts=("kme-a.lab",), server=True, client=False)
    node = pki.issue("sae-a", "qkdnode-A")
    pair = KmePair(sae_a="qkdnode-A", sae_b="qkdnode-B", rate_bps=10_000.0, initial_keys=8)
    await pair.start(server_context(pki.ca, kme.cert, kme.key), server_context(pki.ca, kme.cert, kme.key))
    source = Etsi014KeySource.from_settings(
        {"url": pair.url("A"), "server_hostname": "kme-a.lab", "peer_sae_id": "qkdnode-B", "ca": str(pki.ca),
         "cert": str(node.cert), "key": str(node.key), "retries": 0, "timeout": 1.0},
        file="node.toml", key="links[0].settings")
    m = NodeMetrics("A")
    m.pool_ready_bits.labels("A-B").set(4096)
    pool = SimpleNamespace(cfg=SimpleNamespace(pool_target_bits=8192, driver="etsi014"), source=source,
                           device_ok=True)
    telemetry = Telemetry(m, {"A-B": pool})
    try:
        await source.connect()
        await telemetry.poll_once()
        p = page(m)
        assert value(p, "qkdnode_link_qber_ratio", link="A-B") > 0
        assert value(p, "qkdnode_link_secret_key_rate_bits_per_second", link="A-B") == 10_000
        assert value(p, "qkdnode_device_up", device="A-B", kind="etsi014") == 1
        assert value(p, "qkdnode_pool_target_bits", link="A-B") == 8192

        pair.ends["A"].faults.down = True
        for _ in range(3):
            await telemetry.poll_once()
        p = page(m)
        assert value(p, "qkdnode_link_qber_ratio", link="A-B") is None          # no stale figure
        assert value(p, "qkdnode_link_secret_key_rate_bits_per_second", link="A-B") is None
        assert value(p, "qkdnode_device_up", device="A-B", kind="etsi014") == 0
        assert value(p, "qkdnode_device_state", device="A-B", state="down") == 1

        pair.ends["A"].faults.down = False
        await telemetry.poll_once()
        p = page(m)
        assert value(p, "qkdnode_link_qber_ratio", link="A-B") > 0
        assert value(p, "qkdnode_device_up", device="A-B", kind="etsi014") == 1
    finally:
        await source.close()
        await pair.stop()


# ---------------------------------------------------------------- the optical layer, from real instruments


@pytest.fixture
async def osa():
    emu = Aq6370Emulator(CBandSpectrum(), sweep_time=0.05)
    await emu.start()
    drv = Aq6370.from_settings({"resource": emu.resource, "name": "osa-1", "timeout": 1.0, "poll_interval": 0.02},
                               file="node.toml", key="osa")
    yield emu, drv
    await drv.close()
    await emu.stop()


async def observe(m: NodeMetrics, drv: Aq6370) -> None:
    trace = await drv.sweep(1525.0, 1565.0)
    m.set_spectrum(drv.name, await drv.channels(), quantum_band_power(trace, NOTCH, 25))


async def test_channel_powers_osnr_and_a_leak_into_the_quantum_band_show_as_the_osa_sees_them(osa):
    emu, drv = osa
    m = NodeMetrics("n")
    await observe(m, drv)
    p = page(m)
    powers = series(p, "qkdnode_optical_channel_power_dbm", osa="osa-1")
    assert {dict(k)["channel"] for k in powers} == {"40", "44", "48", "52", "56"}   # the classical carriers
    assert value(p, "qkdnode_optical_channel_power_dbm", osa="osa-1", channel="52") == pytest.approx(3.0, abs=1)
    assert value(p, "qkdnode_optical_channel_osnr_db", osa="osa-1", channel="52") > 20
    dark = series(p, "qkdnode_quantum_band_power_dbm", osa="osa-1")
    assert len(dark) == len(NOTCH) and max(dark.values()) < -50                    # no alert

    emu.fault(leak=Leak(channel=36, power_dbm=-20.0))
    await observe(m, drv)
    p = page(m)
    assert value(p, "qkdnode_quantum_band_power_dbm", osa="osa-1", channel="36") == pytest.approx(-20, abs=1)
    assert value(p, "qkdnode_quantum_band_power_dbm", osa="osa-1", channel="34") < -50


async def test_a_channel_gone_from_the_sweep_is_gone_from_the_metrics(osa):
    emu, drv = osa
    m = NodeMetrics("n")
    await observe(m, drv)
    assert value(page(m), "qkdnode_optical_channel_power_dbm", osa="osa-1", channel="56") is not None
    del emu.spectrum.classical[56]                          # a transponder switched off
    await observe(m, drv)
    assert value(page(m), "qkdnode_optical_channel_power_dbm", osa="osa-1", channel="56") is None
    assert value(page(m), "qkdnode_optical_channel_osnr_db", osa="osa-1", channel="56") is None


async def test_switch_map_and_health_as_the_switch_reports_them():
    emu = PolatisEmulator(ingress=8, egress=8)
    await emu.start()
    sw = PolatisSwitch.from_settings({"resource": emu.resource, "name": "sw-1", "timeout": 0.5, "backoff": 0.01,
                                      "backoff_max": 0.02}, file="node.toml", key="switch")
    m = NodeMetrics("n")
    try:
        await sw.connect_ports({1: 9, 2: 10})
        m.set_switch_map(sw.name, await sw.cross_connects())
        m.set_device_health(sw.name, "polatis-scpi", sw.health.state)
        p = page(m)
        assert set(series(p, "qkdnode_switch_cross_connect", switch="sw-1")) == {
            frozenset({"switch": "sw-1", "ingress": "1", "egress": "9"}.items()),
            frozenset({"switch": "sw-1", "ingress": "2", "egress": "10"}.items())}
        assert value(p, "qkdnode_device_up", device="sw-1", kind="polatis-scpi") == 1

        await sw.replace_map({1: 11})                         # the path was re-routed
        m.set_switch_map(sw.name, await sw.cross_connects())
        assert set(series(page(m), "qkdnode_switch_cross_connect", switch="sw-1")) == {
            frozenset({"switch": "sw-1", "ingress": "1", "egress": "11"}.items())}

        emu.faults.drop = True                               # the unit goes away
        for _ in range(3):
            with pytest.raises(DriverError):
                await sw.cross_connects()
            await asyncio.sleep(0.03)
        m.set_device_health(sw.name, "polatis-scpi", sw.health.state)
        p = page(m)
        assert value(p, "qkdnode_device_up", device="sw-1", kind="polatis-scpi") == 0
        assert value(p, "qkdnode_device_state", device="sw-1", state="down") == 1
        assert value(p, "qkdnode_device_state", device="sw-1", state="up") == 0
    finally:
        await sw.close()
        await emu.stop()


# ---------------------------------------------------------------- a running node


async def test_a_running_node_shows_its_links_pools_devices_and_certificates(network):
    tb = await network()
    m = tb.manifest()
    name, node = next(iter(m["nodes"].items()))
    cfg = config.load(config_of(node))
    links = [link.id for link in cfg.links]
    assert links

    async def telemetry_in():
        p = samples(node["metrics"])
        return all(value(p, "qkdnode_link_secret_key_rate_bits_per_second", link=link) is not None and
                   value(p, "qkdnode_pool_time_to_empty_seconds", link=link) is not None for link in links) and p

    p = await wait_for(telemetry_in, timeout=30)
    for link in links:
        qber = value(p, "qkdnode_link_qber_ratio", link=link)
        noise = value(p, "qkdnode_link_excess_noise_snu", link=link)
        assert (0 < qber < 0.11) if noise is None else (qber is None and 0 < noise < 0.1)   # DV or CV
        assert value(p, "qkdnode_link_secret_key_rate_bits_per_second", link=link) > 0
        assert value(p, "qkdnode_pool_target_bits", link=link) == cfg.links[links.index(link)].pool_target_bits
        assert value(p, "qkdnode_device_up", device=link) == 1
        assert value(p, "qkdnode_device_state", device=link, state="up") == 1
        assert value(p, "qkdnode_pool_time_to_empty_seconds", link=link) == math.inf   # nothing drawn yet
    cert = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes())
    assert value(p, "qkdnode_certificate_expiry_timestamp_seconds", cert="tls") == \
        cert.not_valid_after_utc.timestamp()
    assert value(p, "qkdnode_certificate_expiry_timestamp_seconds", cert="tls_ca") is not None


async def test_time_to_empty_falls_when_saes_draw_faster_than_the_link_delivers(network):
    tb = await network()
    m = tb.manifest()
    seen = first_node(m)
    node, link, master, slave = seen.node, seen.link, seen.master, seen.slave

    async def pool_full():
        ready = value(samples(node["metrics"]), "qkdnode_pool_ready_bits", link=link.id)
        return ready is not None and ready >= link.pool_target_bits // 2

    await wait_for(pool_full, timeout=30)
    async with SaeClient(m, master) as sae:
        async def draining():
            await sae.enc_keys(slave, number=4, size=8192)
            tte = value(samples(node["metrics"]), "qkdnode_pool_time_to_empty_seconds", link=link.id)
            return tte is not None and tte < 3600

        await wait_for(draining, timeout=30, interval=0.05)
