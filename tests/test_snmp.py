"""The SNMP drivers against their emulators, over real UDP on loopback: an in-process pysnmp agent
(hil/snmp.py) answers the drivers' pysnmp manager, in SNMP v2c (communities) and v3 (USM user,
HMAC-SHA + AES), with faults on command.

Drivers are built from settings as the daemon builds them. Timeouts are 0.3 s with no retries,
so the faults cost little time.
"""

import asyncio
import logging
import re
import tomllib
from pathlib import Path

import pytest
from pysnmp.proto import rfc1902

from drivers.snmp_switch import ClassicalPortRefused, PolatisSnmpSwitch, PortOutOfRange, SwitchMismatch
from drivers.snmp_telemetry import PolledTelemetry, SnmpTelemetrySource
from hil.snmp import (OPM_POWER, OXC_SIZE, PORT_PATCH, QKD_QBER, QKD_SKR, IdqSnmpEmulator, PolatisSnmpEmulator,
                      V3User)
from qkdnode.errors import ConfigError, DeviceProtocolError, DeviceRejected, DeviceUnauthorized, DeviceUnavailable
from qkdnode.interfaces import LinkTelemetry, OpticalSwitch, TelemetrySource, driver_class

CONFIG = "node.toml"
KEY = "switches[0].settings"
AUTH_PW, PRIV_PW = "auth-pass-phrase", "priv-pass-phrase"
V2C = {"version": "2c", "community": "public", "write_community": "private"}
V3 = {"version": "3", "user": "qkdnode", "auth_password": AUTH_PW, "priv_password": PRIV_PW}
FAST = {"timeout": 0.3, "retries": 0}


@pytest.fixture(params=["v2c", "v3"])
def security(request) -> dict:
    return dict(V2C if request.param == "v2c" else V3)


@pytest.fixture
async def emu():
    e = PolatisSnmpEmulator(ingress=16, egress=16)
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def switch(emu):
    made: list[PolatisSnmpSwitch] = []

    def make(security: dict | None = None, agent: PolatisSnmpEmulator | None = None, **over) -> PolatisSnmpSwitch:
        a = agent or emu
        settings = {"host": a.host, "port": a.port, "name": "sw1", **FAST, **(security or V2C), **over}
        sw = PolatisSnmpSwitch.from_settings(settings, file=CONFIG, key=KEY)
        made.append(sw)
        return sw

    yield make
    for sw in made:
        await sw.close()


def patch_sets(emu: PolatisSnmpEmulator, since: int = 0) -> list[dict[int, int]]:
    """The SET requests the agent received on polatisOxcPortPatch, as {port: value} each."""
    return [{oid[-1]: int(v) for oid, v in req if oid[:-1] == PORT_PATCH} for req in emu.sets[since:]]


async def recovers(sw: PolatisSnmpSwitch, emu: PolatisSnmpEmulator) -> None:
    """Clear every fault: the very next call must work and health be up again."""
    emu.clear_faults()
    assert await sw.cross_connects() == emu.model.map
    assert sw.health.state == "up" and sw.health.failures == 0


# ---------------------------------------------------------------- settings


def test_switch_settings_take_defaults_and_name_what_is_wrong():
    base = {"host": "192.0.2.10", **V2C}
    m = PolatisSnmpSwitch.check_settings(base, file=CONFIG, key=KEY)
    assert (m["port"], m["timeout"], m["retries"], m["power_scale"]) == (161, 2.0, 1, 0.01)
    sw = PolatisSnmpSwitch.from_settings({**base, "classical_ports": [3]}, file=CONFIG, key=KEY)
    assert sw.name == "192.0.2.10:161" and sw.classical_ports == {3}
    assert isinstance(sw, OpticalSwitch) and sw.health.state == "unknown"
    assert driver_class("polatis-snmp", file=CONFIG, key="switches[0].driver") is PolatisSnmpSwitch
    PolatisSnmpSwitch.check_settings({"host": "sw.lab", **V3, "auth_protocol": "SHA-256", "priv_protocol": "AES-256"},
                                     file=CONFIG, key=KEY)

    bad = [({**base, "colour": "red"}, "colour"),
           ({**V2C}, "host"),
           ({**base, "port": 70000}, "port"),
           ({**base, "version": "1"}, "version"),
           ({**base, "version": 3}, "version"),
           ({**base, "timeout": 0}, "timeout"),
           ({**base, "retries": -1}, "retries"),
           ({"host": "h", "community": "public"}, "write_community"),
           ({**base, "classical_ports": [0]}, "classical_ports"),
           ({**base, "classical_ports": [3, 3]}, "classical_ports"),
           ({**base, "monitor_ports": [True]}, "monitor_ports"),
           ({**base, "power_scale": 0}, "power_scale"),
           ({**base, "down_after": 0}, "down_after"),
           ({**base, "name": ""}, "name"),
           ({"host": "h", **V3, "auth_protocol": "MD5"}, "auth_protocol"),
           ({"host": "h", **V3, "priv_protocol": "DES"}, "priv_protocol"),
           ({"host": "h", "version": "3", "auth_password": AUTH_PW, "priv_password": PRIV_PW}, "user"),
           ({"host": "h", **{k: v for k, v in V3.items() if k != "priv_password"}}, "priv_password")]
    for settings, name in bad:
        with pytest.raises(ConfigError) as e:
            PolatisSnmpSwitch.check_settings(settings, file=CONFIG, key=KEY)
        assert e.value.key == f"{KEY}.{name}", settings
        assert str(e.value).startswith(f"{CONFIG}: {KEY}.{name}: expected")


def test_secrets_in_settings_are_never_echoed():
    secrets = [({"host": "h", **V3, "auth_password": "short12"}, "auth_password", "short12"),
               ({"host": "h", **V3, "priv_password": "tab\there-secret"}, "priv_password", "tab\there-secret"),
               ({"host": "h", **V2C, "write_community": ""}, "write_community", None),
               ({"host": "h", **V2C, "user": "u", "auth_password": "s3cret-pass"}, "user", "s3cret-pass"),
               ({"host": "h", **V3, "community": "c0mmunity-s3cret"}, "community", "c0mmunity-s3cret"),
               ({"host": "h", **V2C, "api_password": "hunter2-long"}, "api_password", "hunter2-long")]
    for settings, name, secret in secrets:
        with pytest.raises(ConfigError) as e:
            PolatisSnmpSwitch.check_settings(settings, file=CONFIG, key=KEY)
        assert e.value.key == f"{KEY}.{name}"
        if secret:
            assert secret not in str(e.value)
    sw = PolatisSnmpSwitch.from_settings({"host": "h", **V3}, file=CONFIG, key=KEY)
    assert AUTH_PW not in repr(sw) and PRIV_PW not in repr(sw) and "qkdnode" in repr(sw)
    sw = PolatisSnmpSwitch.from_settings({"host": "h", **V2C}, file=CONFIG, key=KEY)
    assert "private" not in repr(sw)


# ---------------------------------------------------------------- map operations, v2c and v3


async def test_identity_size_and_map_read_back(emu, switch, security):
    sw = switch(security)
    await sw.connect()
    assert sw.idn == "Polatis N-OST-16x16-LU1-DMHNS EMU0001 6.5.2.18 (emulated)"
    assert sw.health.state == "up"
    assert await sw.size() == (16, 16)
    assert await sw.cross_connects() == {}
    emu.model.map = {3: 20, 4: 17}
    assert await sw.cross_connects() == {3: 20, 4: 17}
    assert await sw.partner(20) == 3 and await sw.partner(3) == 20 and await sw.partner(5) is None


async def test_connect_keeps_others_and_sets_only_what_changes(emu, switch, security):
    sw = switch(security)
    emu.model.map = {1: 17}
    await sw.connect_ports({2: 18, 3: 19})
    assert emu.model.map == {1: 17, 2: 18, 3: 19}
    assert patch_sets(emu) == [{2: 18, 3: 19}]

    mark = len(emu.sets)
    await sw.connect_ports({1: 17, 4: 20})                   # 1->17 is there already: not touched
    assert patch_sets(emu, mark) == [{4: 20}]

    mark = len(emu.sets)
    await sw.connect_ports({1: 21})                          # ingress 1 moves from 17 to 21
    assert patch_sets(emu, mark) == [{1: 0}, {1: 21}]
    await sw.connect_ports({5: 18})                          # egress 18 moves from ingress 2 to 5
    assert emu.model.map == {1: 21, 3: 19, 4: 20, 5: 18}
    assert await sw.cross_connects() == emu.model.map
    assert sw.health.state == "up"


async def test_replace_map_and_disconnect_touch_only_ports_that_change(emu, switch):
    sw = switch()
    emu.model.map = {1: 17, 2: 18, 3: 19}
    await sw.replace_map({1: 17, 2: 20, 4: 21})
    assert emu.model.map == {1: 17, 2: 20, 4: 21}
    assert patch_sets(emu) == [{2: 0, 3: 0}, {2: 20, 4: 21}]
    mark = len(emu.sets)
    await sw.replace_map({1: 17, 2: 20, 4: 21})               # already so: nothing to send
    assert emu.sets[mark:] == []
    await sw.disconnect_ports([2, 5])                         # 5 is not connected: nothing to do for it
    assert emu.model.map == {1: 17, 4: 21} and patch_sets(emu, mark) == [{2: 0}]
    await sw.replace_map({})
    assert emu.model.map == {} and await sw.cross_connects() == {}


async def test_many_changes_go_in_several_set_requests_on_a_large_switch(switch):
    big = PolatisSnmpEmulator(ingress=96, egress=96)
    await big.start()
    try:
        sw = switch(agent=big)
        want = {i: 96 + i for i in range(1, 81)}
        await sw.replace_map(want)
        assert big.model.map == want and await sw.cross_connects() == want
        assert [len(s) for s in patch_sets(big)] == [32, 32, 16]
        powers = await sw.port_powers()
        assert len(powers) == 192 and all(v == pytest.approx(-60.0) for v in powers.values())
    finally:
        await big.stop()


async def test_ports_the_switch_does_not_have_are_refused_before_any_change(switch):
    small = PolatisSnmpEmulator(ingress=8, egress=4)
    await small.start()
    try:
        sw = switch(agent=small)
        assert await sw.size() == (8, 4)
        for call in (sw.connect_ports({9: 10}), sw.connect_ports({1: 13}), sw.disconnect_ports([12]),
                     sw.connect_ports({1: 9, 2: 9}), sw.partner(13)):
            with pytest.raises(PortOutOfRange, match="nothing was sent"):
                await call
        assert small.sets == [] and small.model.map == {}
        assert sw.health.state == "up"                        # the caller's mistake, not the unit's
        await sw.connect_ports({8: 12})
        assert small.model.map == {8: 12}
    finally:
        await small.stop()


# ---------------------------------------------------------------- classical ports


async def test_a_change_naming_a_classical_port_is_refused_with_nothing_sent(emu, switch, security):
    sw = switch(security, classical_ports=[5, 21])
    emu.model.map = {5: 21, 1: 17}
    for call, port in ((sw.connect_ports({5: 22}), "5"), (sw.connect_ports({6: 21}), "21"),
                       (sw.disconnect_ports([5]), "5")):
        with pytest.raises(ClassicalPortRefused, match=rf"port {port} carries classical traffic.*no change was sent"):
            await call
    assert emu.requests == 0                                  # not even a read
    assert await sw.cross_connects() == {5: 21, 1: 17}        # read back: unchanged
    assert sw.health.state == "up"


async def test_a_change_that_would_touch_a_classical_port_indirectly_is_refused(emu, switch, security):
    sw = switch(security, classical_ports=[5, 21])
    emu.model.map = {5: 22, 6: 21, 1: 17}
    before = dict(emu.model.map)
    with pytest.raises(ClassicalPortRefused, match="port 21 carries") as e:
        await sw.connect_ports({6: 23})                       # moving 6 would cut its path to 21
    assert e.value.ports == (21,)
    with pytest.raises(ClassicalPortRefused, match="port 21 carries"):
        await sw.disconnect_ports([6])
    with pytest.raises(ClassicalPortRefused, match="ports 5, 21 carry"):
        await sw.replace_map({1: 17})                         # would disconnect 5->22 and 6->21
    with pytest.raises(ClassicalPortRefused, match="port 5 carries"):
        await sw.connect_ports({7: 22})                       # would take 22 away from 5
    assert emu.sets == []
    assert await sw.cross_connects() == before                # read back over SNMP: unchanged
    await sw.replace_map({5: 22, 6: 21, 2: 18})               # classical paths kept as they are: allowed
    assert await sw.cross_connects() == {5: 22, 6: 21, 2: 18}
    assert patch_sets(emu) == [{1: 0}, {2: 18}]


# ---------------------------------------------------------------- refusals, states, powers


async def test_a_refused_set_names_the_status_and_the_map_is_unchanged(emu, switch):
    sw = switch()
    emu.model.disabled = {4}
    emu.model.map = {1: 17}
    with pytest.raises(DeviceRejected, match=r"rejected connect \(patch 4->20\): inconsistentValue at "
                                             r"1\.3\.6\.1\.4\.1\.26592\.2\.2\.2\.1\.2\.1\.2\.4; map now \{1->17\}"):
        await sw.connect_ports({4: 20})
    assert sw.health.state == "up"                            # the unit answered and said no: not a fault
    assert await sw.cross_connects() == {1: 17}
    await sw.connect_ports({3: 20})
    assert emu.model.map == {1: 17, 3: 20}


async def test_a_read_only_community_cannot_change_the_map(emu, switch):
    sw = switch(write_community="public")                     # the agent's read-only community
    emu.model.map = {1: 17}
    with pytest.raises(DeviceUnauthorized, match="refused access .*noAccess.*check the write community"):
        await sw.connect_ports({2: 18})
    assert sw.health.state == "degraded"
    assert await sw.cross_connects() == {1: 17} and emu.model.map == {1: 17}


async def test_port_states_and_power_monitors(emu, switch, security):
    sw = switch(security)
    emu.model.light = {1: 0.0, 2: -3.0}
    emu.model.disabled = {7}
    emu.model.map = {1: 17}
    states = await sw.port_states()
    assert len(states) == 32 and states[7] == "disabled" and states[1] == states[32] == "enabled"
    powers = await sw.port_powers()
    assert sorted(powers) == list(range(1, 33))
    assert powers[1] == pytest.approx(0.0, abs=0.01) and powers[17] == pytest.approx(-1.0, abs=0.01)
    assert powers[2] == pytest.approx(-3.0, abs=0.01) and powers[18] == pytest.approx(-60.0, abs=0.01)
    await sw.connect_ports({2: 18})
    assert (await sw.port_powers())[18] == pytest.approx(-4.0, abs=0.01)
    only = switch(security, monitor_ports=[18, 17])
    assert await only.port_powers() == {17: pytest.approx(-1.0, abs=0.01), 18: pytest.approx(-4.0, abs=0.01)}


# ---------------------------------------------------------------- credentials


@pytest.mark.parametrize("wrong, message", [
    ({"auth_password": "not-the-auth-pass"}, "authentication failed .*check auth_password"),
    ({"priv_password": "not-the-priv-pass"}, "could not decrypt .*check priv_password"),
    ({"user": "mallory"}, "does not know v3 user 'mallory'"),
    ({"auth_protocol": "SHA-256"}, "authentication failed"),
])
async def test_wrong_v3_credentials_are_a_clear_error_without_the_password(emu, switch, wrong, message, caplog):
    caplog.set_level(logging.DEBUG)
    sw = switch({**V3, **wrong})
    with pytest.raises(DeviceUnauthorized, match=message) as e:
        await sw.cross_connects()
    for secret in (AUTH_PW, PRIV_PW, "not-the-auth-pass", "not-the-priv-pass"):
        assert secret not in str(e.value) and secret not in sw.health.last_error and secret not in caplog.text
    assert sw.health.state == "degraded" and "v3 user" in sw.health.last_error
    assert "health unknown -> degraded" in caplog.text         # the log says it, without the secret
    assert await switch(V3).cross_connects() == {}           # the right user still gets in


async def test_stronger_v3_protocols_work_when_both_ends_use_them(switch):
    strong = PolatisSnmpEmulator(ingress=4, egress=4, users=[V3User("ops", "auth-pass-256", "priv-pass-256",
                                                                     "SHA-256", "AES-256")])
    await strong.start()
    try:
        sw = switch({"version": "3", "user": "ops", "auth_password": "auth-pass-256", "priv_password": "priv-pass-256",
                     "auth_protocol": "SHA-256", "priv_protocol": "AES-256"}, agent=strong)
        await sw.connect_ports({1: 5})
        assert strong.model.map == {1: 5}
    finally:
        await strong.stop()


async def test_a_wrong_community_looks_like_silence_and_says_so(emu, switch):
    sw = switch(community="not-the-community")
    with pytest.raises(DeviceUnavailable, match="no answer within 0.3 s.*community is wrong") as e:
        await sw.size()
    assert "not-the-community" not in str(e.value)


# ---------------------------------------------------------------- faults


async def test_a_silent_unit_degrades_then_goes_down_and_recovery_is_automatic(emu, switch, security):
    sw = switch(security)
    await sw.connect()
    emu.faults.hang = True
    for state in ("degraded", "degraded", "down"):
        with pytest.raises(DeviceUnavailable, match="no answer within 0.3 s"):
            await sw.cross_connects()
        assert sw.health.state == state and "no answer" in sw.health.last_error
    with pytest.raises(DeviceUnavailable):
        await sw.connect_ports({1: 17})
    assert emu.model.map == {}
    await recovers(sw, emu)
    await sw.connect_ports({1: 17})
    assert emu.model.map == {1: 17}


async def test_switch_slow_answers_within_the_timeout_work_and_beyond_it_fail(emu, switch):
    sw = switch()
    emu.model.map = {2: 18}
    emu.faults.delay = 0.1
    assert await sw.cross_connects() == {2: 18}
    assert sw.health.state == "up"
    emu.faults.delay = 0.5
    with pytest.raises(DeviceUnavailable, match="no answer within 0.3 s"):
        await sw.connect_ports({3: 19})
    assert sw.health.state == "degraded"
    emu.faults.clear()
    await asyncio.sleep(0.3)                                  # the late answers arrive now: they must be ignored
    await recovers(sw, emu)
    assert await sw.size() == (16, 16)


@pytest.mark.parametrize("mode, error, message", [
    ("type", DeviceProtocolError, r"1\.3\.6\.1\.4\.1\.26592\.2\.2\.2\.1\.1\.0 answered OctetString b'\\xffjunk\\x00', "
                                  r'expected polatisOxcSize as "NxM"'),
    ("value", DeviceProtocolError, r'answered OctetString .*expected polatisOxcSize as "NxM"'),
    ("bytes", DeviceUnavailable, "no answer within 0.3 s"),
])
async def test_garbage_is_reported_and_changes_nothing(emu, switch, security, mode, error, message):
    sw = switch(security)
    emu.faults.garbage = mode
    with pytest.raises(error, match=message):
        await sw.connect_ports({1: 17})
    assert emu.model.map == {} and emu.sets == []
    assert sw.health.state == "degraded"
    await recovers(sw, emu)


async def test_wrong_typed_or_impossible_map_rows_are_a_protocol_error(emu, switch):
    sw = switch()
    assert await sw.size() == (16, 16)                        # size known; now the rows turn bad
    emu.faults.garbage = "type"
    with pytest.raises(DeviceProtocolError, match=r"2\.1\.2\.1 answered OctetString .*expected Unsigned32 partner"):
        await sw.cross_connects()
    emu.faults.garbage = "value"
    with pytest.raises(DeviceProtocolError, match="answered Gauge32 4294967295, expected Unsigned32 partner port, 0..32"):
        await sw.cross_connects()
    emu.faults.garbage = None
    emu.model.map = {1: 17}
    original = emu.mib.value
    emu.mib.value = lambda oid: rfc1902.Unsigned32(0) if oid == PORT_PATCH + (17,) else original(oid)
    with pytest.raises(DeviceProtocolError, match="rows disagree: port 1 -> 17, but port 17 -> 0"):
        await sw.cross_connects()
    emu.mib.value = original
    assert sw.health.state == "down" and "rows disagree" in sw.health.last_error   # three failures in a row
    await recovers(sw, emu)


async def test_oids_gone_are_named_not_taken_for_an_empty_map(emu, switch):
    sw = switch()
    emu.model.map = {1: 17}
    emu.faults.gone = {PORT_PATCH}                            # e.g. a firmware update moved the table
    with pytest.raises(DeviceProtocolError, match=r"polatisOxcPortPatch has no row for ports 1, 2, .*\(\+24 more\).*"
                                                  r"OIDs gone"):
        await sw.cross_connects()
    emu.faults.gone = {OXC_SIZE}
    with pytest.raises(DeviceProtocolError, match=r"26592\.2\.2\.2\.1\.1\.0 answered noSuchObject"):
        await sw.size()
    assert sw.health.state == "degraded"
    await recovers(sw, emu)
    assert emu.model.map == {1: 17}


async def test_one_silent_subtree_fails_only_the_calls_that_need_it(emu, switch):
    sw = switch()
    emu.faults.silent = {OPM_POWER}
    with pytest.raises(DeviceUnavailable, match=r"GETBULK 1\.3\.6\.1\.4\.1\.26592\.2\.3\.2\.2\.2\.1\.1: no answer"):
        await sw.port_powers()
    assert sw.health.state == "degraded"
    await sw.connect_ports({1: 17})                           # the cross-connect table still answers
    assert emu.model.map == {1: 17} and sw.health.state == "up"
    emu.clear_faults()
    assert len(await sw.port_powers()) == 32


async def test_a_set_that_does_not_take_is_caught_by_the_read_back(emu, switch):
    sw = switch()
    emu.model.map = {1: 17}
    emu.faults.stuck = True
    with pytest.raises(SwitchMismatch, match="ingress 3: expected 19, reads none") as e:
        await sw.connect_ports({3: 19})
    assert e.value.found == {1: 17} and e.value.expected == {1: 17, 3: 19}
    assert sw.health.state == "degraded" and "differs" in sw.health.last_error
    emu.clear_faults()
    await sw.connect_ports({3: 19})
    assert emu.model.map == {1: 17, 3: 19} and sw.health.state == "up"


async def test_an_agent_that_is_not_there_yet_is_reached_once_it_starts(switch):
    late = PolatisSnmpEmulator(ingress=4, egress=4)
    await late.start()
    port = late.port
    await late.stop()                                         # nobody answers on that port now
    sw = switch(agent=late)
    with pytest.raises(DeviceUnavailable, match="sw1 .*no answer"):
        await sw.connect()
    assert sw.health.state == "degraded"
    await late.start(port=port)
    try:
        await sw.connect()
        assert sw.health.state == "up" and await sw.size() == (4, 4)
    finally:
        await late.stop()


async def test_concurrent_calls_take_turns(emu, switch):
    sw = switch()
    emu.faults.delay = 0.01
    results = await asyncio.gather(*[sw.size() for _ in range(3)], sw.connect_ports({1: 17}),
                                   sw.connect_ports({2: 18}), *[sw.partner(17) for _ in range(2)], sw.port_powers())
    assert results[:3] == [(16, 16)] * 3 and results[5:7] == [1, 1] and len(results[7]) == 32
    assert emu.model.map == {1: 17, 2: 18} and sw.health.state == "up"


# ================================================================ QKD link telemetry (idq-snmp)

TKEY = "links[0].telemetry.settings"
QBER_OID = "1.3.6.1.3.9999.1.1.0"


@pytest.fixture
async def qkd():
    e = IdqSnmpEmulator(seed=7)
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def source(qkd):
    made: list[SnmpTelemetrySource] = []

    def make(security: dict | None = None, **over) -> SnmpTelemetrySource:
        sec = {k: v for k, v in (security or V2C).items() if k != "write_community"}
        settings = {"host": qkd.host, "port": qkd.port, "name": "qkd1", **FAST, "poll_interval": 0.05, **sec, **over}
        src = SnmpTelemetrySource.from_settings(settings, file=CONFIG, key=TKEY)
        made.append(src)
        return src

    yield make
    for src in made:
        await src.close()


async def polled(src: SnmpTelemetrySource) -> PolledTelemetry:
    """The next poll's result (a poll that raised fails the test)."""
    outcome = await asyncio.wait_for(src.next_poll(), 10)
    assert isinstance(outcome, PolledTelemetry), outcome
    return outcome


async def back_to_normal(src: SnmpTelemetrySource, qkd: IdqSnmpEmulator) -> PolledTelemetry:
    """Clear every fault: the poller's next poll must be whole again, with no alarm, health up."""
    qkd.clear_faults()
    await asyncio.wait_for(src.next_poll(), 10)               # a poll may have been under way with the fault
    t = await polled(src)
    assert t.missing == {} and t.alarms == {} and src.alarms == {}
    assert src.health.state == "up" and t.state == "running" and 0.005 < t.qber < 0.03
    assert await src.telemetry() == src.last
    return t


def test_telemetry_settings_the_metric_table_and_what_is_wrong():
    base = {"host": "192.0.2.20", "community": "public"}
    m = SnmpTelemetrySource.check_settings(base, file=CONFIG, key=TKEY)
    assert (m["profile"], m["poll_interval"], m["qber_alarm"]) == ("idq-test-mib", 10.0, 0.08)
    table = {x.name: x for x in m["metric_table"]}
    assert list(table) == ["qber", "secret_key_rate_bps", "state", "model", "visibility"]
    assert table["qber"].oid == (1, 3, 6, 1, 3, 9999, 1, 1, 0) and table["qber"].scale == 0.0001
    assert table["state"].states == {1: "running", 2: "stopped", 3: "calibrating", 4: "no-key"}
    src = SnmpTelemetrySource.from_settings(base, file=CONFIG, key=TKEY)
    assert isinstance(src, TelemetrySource) and src.health.state == "unknown"
    assert driver_class("idq-snmp", file=CONFIG, key="links[0].telemetry.driver") is SnmpTelemetrySource

    m = SnmpTelemetrySource.check_settings(
        {**base, "metrics": {"qber": {"oid": "1.3.6.1.4.1.99999.5.1.0", "scale": 0.001},
                             "temperature_c": {"oid": ".1.3.6.1.4.1.99999.5.9.0", "type": "integer", "scale": 0.1}}},
        file=CONFIG, key=TKEY)
    table = {x.name: x for x in m["metric_table"]}
    assert table["qber"].oid == (1, 3, 6, 1, 4, 1, 99999, 5, 1, 0) and table["qber"].type == "gauge"
    assert table["temperature_c"].oid[-1] == 0 and len(table) == 6
    m = SnmpTelemetrySource.check_settings({**base, "profile": "none", "metrics": {
        "secret_key_rate_bps": {"oid": "1.3.6.1.4.1.99999.1.0", "type": "counter"}}}, file=CONFIG, key=TKEY)
    assert [x.name for x in m["metric_table"]] == ["secret_key_rate_bps"]

    bad = [({**base, "profile": "idq"}, "profile"),
           ({**base, "poll_interval": 0}, "poll_interval"),
           ({**base, "qber_alarm": 8}, "qber_alarm"),
           ({**base, "write_community": "private"}, "write_community"),
           ({**base, "metrics": [1]}, "metrics"),
           ({**base, "profile": "none"}, "metrics"),
           ({**base, "metrics": {"qber": {"oid": "iso.3.6"}}}, "metrics.qber.oid"),
           ({**base, "metrics": {"qber": {"type": "float"}}}, "metrics.qber.type"),
           ({**base, "metrics": {"qber": {"type": "string"}}}, "metrics.qber.type"),
           ({**base, "metrics": {"qber": {"scale": 0}}}, "metrics.qber.scale"),
           ({**base, "metrics": {"qber": {"min": 0.5, "max": 0.1}}}, "metrics.qber.max"),
           ({**base, "metrics": {"qber": {"units": "%"}}}, "metrics.qber.units"),
           ({**base, "metrics": {"state": {"type": "integer"}}}, "metrics.state.type"),
           ({**base, "metrics": {"state": {"states": {"one": "running"}}}}, "metrics.state.states"),
           ({**base, "metrics": {"fan": {"oid": "1.3.6.1.4.1.1.1.0", "type": "enum"}}}, "metrics.fan.states"),
           ({**base, "metrics": {"fan": {"oid": "1.3.6.1.4.1.1.1.0"}}}, "metrics.fan.type"),
           ({**base, "metrics": {"Fan Speed": {"oid": "1.3.6.1.4.1.1.1.0", "type": "gauge"}}}, "metrics.Fan Speed"),
           ({**base, "metrics": {"skr2": {"oid": QBER_OID, "type": "gauge"}}}, "metrics.skr2.oid")]
    for settings, name in bad:
        with pytest.raises(ConfigError) as e:
            SnmpTelemetrySource.check_settings(settings, file=CONFIG, key=TKEY)
        assert e.value.key == f"{TKEY}.{name}", settings
        assert str(e.value).startswith(f"{CONFIG}: {TKEY}.{name}: expected")
    with pytest.raises(ConfigError, match="metric qber has it"):
        SnmpTelemetrySource.check_settings(bad[-1][0], file=CONFIG, key=TKEY)


async def test_telemetry_reads_the_link_over_v2c_and_v3(qkd, source, security):
    src = source(security)
    t = await src.telemetry()                                 # no poller: polled on the spot
    assert isinstance(t, LinkTelemetry) and t.state == "running"
    assert 0.005 < t.qber < 0.03 and 800 < t.secret_key_rate_bps < 1600
    assert t.extra["model"] == "EMU-Cerberis-XG" and t.extra["visibility"] == pytest.approx(1 - 2 * t.qber, abs=0.002)
    assert t.missing == {} and t.alarms == {} and t.excess_noise is None
    assert src.health.state == "up" and qkd.requests >= 1


async def test_the_qber_drifts_and_the_key_rate_follows_it(qkd, source):
    src = source()
    await src.connect()
    polls = [await polled(src) for _ in range(12)]
    qbers = [p.qber for p in polls]
    assert len(set(qbers)) > 3 and all(0.005 < q < 0.03 for q in qbers)
    for a in polls:
        for b in polls:
            if a.qber < b.qber - 0.0002:
                assert a.secret_key_rate_bps > b.secret_key_rate_bps
    assert all(p.polled_at < q.polled_at for p, q in zip(polls, polls[1:]))


async def test_qber_above_the_threshold_raises_an_alarm_until_it_comes_down(qkd, source, security):
    src = source(security)
    await src.connect()
    qkd.model.forced_qber = 0.12
    t = await polled(src)
    assert t.qber == pytest.approx(0.12) and t.state == "no-key" and t.secret_key_rate_bps == 0
    assert t.alarms == {"qber-high": "QBER 12.00 % above the alarm threshold 8.00 %"}
    assert src.health.state == "degraded" and "above the alarm threshold" in src.health.last_error
    t = await polled(src)
    assert src.health.state == "degraded" and src.health.failures == 1  # stays degraded, the agent answers
    await back_to_normal(src, qkd)


async def test_an_oid_that_answered_before_and_disappears_is_an_alarm(qkd, source, security):
    src = source(security)
    await src.connect()
    assert src.last.qber is not None
    qkd.faults.gone = {QKD_QBER}                              # a vendor software update moved it
    t = await polled(src)
    assert t.qber is None and t.secret_key_rate_bps > 0 and t.state == "running"
    assert t.missing["qber"].startswith(f"noSuchObject at {QBER_OID} (it answered before: gone")
    assert list(t.alarms) == ["qber"] and src.alarms == t.alarms
    assert src.health.state == "degraded" and f"qber: noSuchObject at {QBER_OID}" in src.health.last_error
    assert (await src.telemetry()).missing == t.missing     # the caller gets the result, not an exception
    await back_to_normal(src, qkd)


async def test_a_configured_oid_that_never_answered_is_missing_without_an_alarm(qkd, source):
    src = source(metrics={"temperature_c": {"oid": "1.3.6.1.3.9999.1.9.0", "type": "integer", "scale": 0.1}})
    t = await src.telemetry()
    assert t.missing == {"temperature_c": "noSuchObject at 1.3.6.1.3.9999.1.9.0 (never answered since start: "
                                          "check the OID)"}
    assert t.alarms == {} and src.health.state == "up" and t.qber is not None


async def test_one_oid_that_stops_answering_does_not_blind_the_others(qkd, source):
    src = source()
    await src.connect()
    qkd.faults.silent = {QKD_SKR}                             # the agent drops any request naming it
    t = await polled(src)
    assert t.secret_key_rate_bps is None and t.qber is not None and t.extra["model"] == "EMU-Cerberis-XG"
    assert t.missing["secret_key_rate_bps"].startswith("no answer for 1.3.6.1.3.9999.1.2.0 within 0.3 s while the "
                                                       "agent answers other OIDs (it answered before")
    assert list(t.alarms) == ["secret_key_rate_bps"] and src.health.state == "degraded"
    await back_to_normal(src, qkd)


async def test_an_agent_that_stops_answering_goes_down_and_comes_back_by_itself(qkd, source, security):
    src = source(security)
    await src.connect()
    qkd.faults.hang = True
    for state in ("degraded", "degraded", "down"):
        outcome = await asyncio.wait_for(src.next_poll(), 10)
        assert isinstance(outcome, DeviceUnavailable) and "no answer within 0.3 s" in str(outcome)
        assert src.health.state == state
    with pytest.raises(DeviceUnavailable, match="qkd1 .*GET 1.3.6.1.3.9999.1.1.0.*no answer within 0.3 s"):
        await src.telemetry()
    await back_to_normal(src, qkd)


@pytest.mark.parametrize("mode, reasons", [
    ("type", {"qber": r"1.3.6.1.3.9999.1.1.0 answered OctetString b'\\xffjunk\\x00', expected Gauge32/Unsigned32",
              "state": r"answered OctetString .*, expected Integer32 with a named value",
              "model": r"answered OctetString b'\\xffjunk\\x00', expected printable text"}),
    ("value", {"qber": r"answered Gauge32 4294967295 = 429497, outside 0..0.5",
               "state": r"answered Integer32 -2147483648, expected one of 1 \(running\), 2 \(stopped\)",
               "model": r"answered OctetString b'\\x00\\xff\?\?x\?\?', expected printable text",
               "visibility": r"outside 0..1"}),
])
async def test_garbage_values_are_alarms_naming_what_came_back(qkd, source, mode, reasons):
    src = source()
    await src.connect()
    qkd.faults.garbage = mode
    t = await polled(src)
    assert t.qber is None and t.state == "unknown"
    for name, pattern in reasons.items():
        assert re.search(pattern, t.missing[name]), (name, t.missing[name])
        assert name in t.alarms
    assert src.health.state == "degraded"
    await back_to_normal(src, qkd)


async def test_telemetry_slow_answers_within_the_timeout_work_and_beyond_it_fail(qkd, source):
    src = source()
    qkd.faults.delay = 0.1
    assert (await src.telemetry()).qber is not None and src.health.state == "up"
    qkd.faults.delay = 0.5
    with pytest.raises(DeviceUnavailable, match="no answer within 0.3 s"):
        await src.telemetry()
    assert src.health.state == "degraded"
    qkd.clear_faults()
    await asyncio.sleep(0.3)                                  # late answers arrive now: they must be ignored
    assert (await src.telemetry()).missing == {} and src.health.state == "up"


@pytest.mark.parametrize("wrong, message", [
    ({"auth_password": "not-the-auth-pass"}, "authentication failed .*check auth_password"),
    ({"priv_password": "not-the-priv-pass"}, "could not decrypt .*check priv_password"),
])
async def test_wrong_v3_credentials_fail_the_poll_clearly(qkd, source, wrong, message, caplog):
    caplog.set_level(logging.DEBUG)
    src = source({**V3, **wrong})
    with pytest.raises(DeviceUnauthorized, match=message) as e:
        await src.connect()
    for secret in (AUTH_PW, PRIV_PW, "not-the-auth-pass", "not-the-priv-pass"):
        assert secret not in str(e.value) and secret not in src.health.last_error and secret not in caplog.text
    assert src.health.state == "degraded" and "health unknown -> degraded" in caplog.text
    with pytest.raises(DeviceUnauthorized, match=message):
        await src.telemetry()                                 # the poller keeps trying; the answer stays no


def test_the_toml_examples_in_the_protocol_doc_are_valid_settings():
    doc = (Path(__file__).parent.parent / "docs" / "protocols" / "snmp.md").read_text()
    blocks = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", doc, re.S)]
    devices = [d for b in blocks for d in (b["devices"] if isinstance(b["devices"], list) else [b["devices"]])]
    switches = [d["settings"] for d in devices if d.get("driver", "polatis-snmp") == "polatis-snmp"]
    links = [d["settings"] for d in devices if d.get("driver") == "idq-snmp"]
    assert len(switches) == 2 and len(links) == 1
    for settings in switches:
        PolatisSnmpSwitch.check_settings(settings, file="snmp.md", key="switches.settings")
    m = SnmpTelemetrySource.check_settings(links[0], file="snmp.md", key="links.telemetry.settings")
    table = {x.name: x for x in m["metric_table"]}
    assert table["qber"].scale == 0.001 and table["temperature_c"].type == "integer"
