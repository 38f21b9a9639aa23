"""The Polatis SCPI switch driver against its emulator, over a real TCP socket through pyvisa-py.

The driver is built from a switch's settings as the daemon builds it and opens the emulator as
`TCPIP::127.0.0.1::<port>::SOCKET`, exactly as it would open a unit on port 5025. Timeouts are
0.5 s and the reconnect backoff 0.05..0.1 s so the faults cost little time.
"""

import asyncio
import time

import pytest

from drivers.polatis import ClassicalPortRefused, PolatisSwitch, PortOutOfRange, SwitchMismatch
from hil.switch import PolatisEmulator, PolatisModel
from qkdnode.errors import ConfigError, DeviceProtocolError, DeviceRejected, DeviceUnavailable
from qkdnode.interfaces import OpticalSwitch

CONFIG = "node.toml"
KEY = "switches[0].settings"
BACKOFF_MAX = 0.1
CHANGES = ("ADD", "SUB", "ONLY", "DISC")


@pytest.fixture
async def emu():
    e = PolatisEmulator(ingress=16, egress=16)
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def switch(emu):
    made: list[PolatisSwitch] = []

    def make(**over) -> PolatisSwitch:
        settings = {"resource": emu.resource, "name": "sw1", "timeout": 0.5, "switch_timeout": 0.5,
                    "backoff": 0.05, "backoff_max": BACKOFF_MAX, **over}
        sw = PolatisSwitch.from_settings(settings, file=CONFIG, key=KEY)
        made.append(sw)
        return sw

    yield make
    for sw in made:
        await sw.close()


def change_commands(emu: PolatisEmulator, since: int = 0) -> list[str]:
    return [c for c in emu.received[since:] if any(word in c.upper() for word in CHANGES)]


async def recovers(sw: PolatisSwitch, emu: PolatisEmulator, backoff: float = BACKOFF_MAX) -> None:
    """Clear every fault; after the reconnect backoff the next call must work and health be up."""
    emu.faults.clear()
    await asyncio.sleep(backoff + 0.05)
    assert await sw.cross_connects() == emu.model.map
    assert sw.health.state == "up" and sw.health.failures == 0


# ---------------------------------------------------------------- settings


def test_settings_take_defaults_and_name_what_is_wrong():
    m = PolatisSwitch.check_settings({"resource": "TCPIP::192.0.2.10::5025::SOCKET", "classical_ports": [3]},
                                     file=CONFIG, key=KEY)
    assert (m["timeout"], m["switch_timeout"], m["backoff"], m["visa_library"]) == (2.0, 5.0, 0.5, "@py")
    sw = PolatisSwitch.from_settings({"resource": "TCPIP::192.0.2.10::5025::SOCKET", "classical_ports": [3]},
                                     file=CONFIG, key=KEY)
    assert sw.name == "TCPIP::192.0.2.10::5025::SOCKET" and sw.classical_ports == {3}
    assert isinstance(sw, OpticalSwitch) and sw.health.state == "unknown"

    bad = [({"resource": "TCPIP::h::5025::SOCKET", "colour": "red"}, "colour"),
           ({}, "resource"),
           ({"resource": "192.0.2.10:5025"}, "resource"),
           ({"resource": "TCPIP::h::5025::SOCKET", "timeout": 0}, "timeout"),
           ({"resource": "TCPIP::h::5025::SOCKET", "switch_timeout": "5"}, "switch_timeout"),
           ({"resource": "TCPIP::h::5025::SOCKET", "classical_ports": 5}, "classical_ports"),
           ({"resource": "TCPIP::h::5025::SOCKET", "classical_ports": [0]}, "classical_ports"),
           ({"resource": "TCPIP::h::5025::SOCKET", "classical_ports": [3, 3]}, "classical_ports"),
           ({"resource": "TCPIP::h::5025::SOCKET", "monitor_ports": [True]}, "monitor_ports"),
           ({"resource": "TCPIP::h::5025::SOCKET", "down_after": 0}, "down_after"),
           ({"resource": "TCPIP::h::5025::SOCKET", "backoff": 5, "backoff_max": 1}, "backoff_max"),
           ({"resource": "TCPIP::h::5025::SOCKET", "name": ""}, "name")]
    for settings, name in bad:
        with pytest.raises(ConfigError) as e:
            PolatisSwitch.check_settings(settings, file=CONFIG, key=KEY)
        assert e.value.key == f"{KEY}.{name}", settings
        assert str(e.value).startswith(f"{CONFIG}: {KEY}.{name}: expected")
    with pytest.raises(ConfigError) as e:
        PolatisSwitch.check_settings({"resource": "TCPIP::h::5025::SOCKET", "password": "hunter2"},
                                     file=CONFIG, key=KEY)
    assert "hunter2" not in str(e.value)


# ---------------------------------------------------------------- the emulator on its own


async def test_emulator_speaks_scpi_long_short_any_case_and_queues_errors(emu):
    reader, writer = await asyncio.open_connection(emu.host, emu.port)

    async def ask(line: str, expect_answer: bool = True) -> str | None:
        writer.write(line.encode() + b"\n")
        await writer.drain()
        if not expect_answer:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.readline(), 0.2)
            return None
        return (await asyncio.wait_for(reader.readline(), 2)).decode().rstrip("\n")

    try:
        assert await ask("*idn?") == "Polatis,N-OST-16x16-LU1-DMHNS,EMU0001,6.5.2.18"
        assert await ask(":oxc:switch:connect:add (@1,2),(@17,18);STATe?") == "(@1,2),(@17,18)"
        assert await ask(":OXC:SWIT:CONN:PORT? 18;:OXC:SWITCH:SIZE?;*OPC?") == "2;16,16;1"
        await ask(":FOO:BAR (@1)", expect_answer=False)                 # unknown command: silent
        await ask(":OXC:SWIT:CONN:STATUS?", expect_answer=False)        # unknown query: silent too
        await ask(":OXC:SWIT:CONN:ADD (@3),(@40)", expect_answer=False)  # no port 40
        assert await ask(":SYST:ERR?") == '-113,"Undefined header"'
        assert await ask(":SYSTem:ERRor:NEXT?") == '-113,"Undefined header"'
        assert await ask(":syst:err:all?") == '-222,"Data out of range; ports 3,40"'
        assert await ask(":SYST:ERR?") == '0,"No error"'
        await ask(":OXC:SWIT:CONN:ADD (@3),(@17)", expect_answer=False)  # 17 is taken by 1
        assert await ask(":SYST:ERR?") == '-221,"Settings conflict; port 17 in use"'
        assert await ask(":OXC:SWIT:CONN:ONLY (@5),(@30);:OXC:SWIT:CONN:STAT?") == "(@5),(@30)"
        assert await ask(":OXC:SWIT:DISC:ALL;:OXC:SWIT:CONN:STAT?") == "(@),(@)"
        assert await ask(":OXC:SWIT:PORT:STAT?") == "(" + ",".join(["E"] * 32) + ")"
        assert await ask(":PMONITOR:POW? (@1:2,32)") == "(-60.00,-60.00,-60.00)"
        assert emu.received[0] == "*idn?" and emu.connections == 1
    finally:
        writer.close()


def test_power_model_light_crosses_the_switch_with_insertion_loss():
    m = PolatisModel(4, 4, insertion_loss_db=1.5)
    m.light = {1: 0.0, 6: -10.0}
    m.map = {1: 5, 2: 6}
    assert abs(m.power_dbm(1) - 0.0) < 0.01 and abs(m.power_dbm(5) - -1.5) < 0.01
    assert abs(m.power_dbm(6) - -10.0) < 0.01 and abs(m.power_dbm(2) - -11.5) < 0.01
    assert abs(m.power_dbm(3) - -60.0) < 0.01


# ---------------------------------------------------------------- map operations


async def test_size_identity_and_map_read_back(emu, switch):
    sw = switch()
    await sw.connect()
    assert sw.idn == "Polatis,N-OST-16x16-LU1-DMHNS,EMU0001,6.5.2.18"
    assert sw.health.state == "up"
    assert await sw.size() == (16, 16)
    assert await sw.cross_connects() == {}
    emu.model.map = {3: 20, 4: 17}
    assert await sw.cross_connects() == {3: 20, 4: 17}
    assert await sw.partner(20) == 3 and await sw.partner(3) == 20 and await sw.partner(5) is None


async def test_connect_keeps_others_and_sends_only_what_changes(emu, switch):
    sw = switch()
    emu.model.map = {1: 17}
    await sw.connect_ports({2: 18, 3: 19})
    assert emu.model.map == {1: 17, 2: 18, 3: 19}
    assert change_commands(emu) == [":OXC:SWIT:CONN:ADD (@2,3),(@18,19);*OPC?"]

    mark = len(emu.received)
    await sw.connect_ports({1: 17, 4: 20})                   # 1->17 is there already: not touched
    assert change_commands(emu, mark) == [":OXC:SWIT:CONN:ADD (@4),(@20);*OPC?"]
    assert emu.received[-2:] == [":SYST:ERR?", ":OXC:SWIT:CONN:STAT?"]   # error queue, then read-back

    mark = len(emu.received)
    await sw.connect_ports({1: 21})                          # ingress 1 moves from 17 to 21
    assert change_commands(emu, mark) == [":OXC:SWIT:CONN:SUB (@1),(@17);:OXC:SWIT:CONN:ADD (@1),(@21);*OPC?"]
    await sw.connect_ports({5: 18})                          # egress 18 moves from ingress 2 to 5
    assert emu.model.map == {1: 21, 3: 19, 4: 20, 5: 18}
    assert await sw.cross_connects() == emu.model.map
    assert sw.health.state == "up"


async def test_replace_map_touches_only_ports_that_change(emu, switch):
    sw = switch()
    emu.model.map = {1: 17, 2: 18, 3: 19}
    await sw.replace_map({1: 17, 2: 20, 4: 21})
    assert emu.model.map == {1: 17, 2: 20, 4: 21}
    assert change_commands(emu) == [
        ":OXC:SWIT:CONN:SUB (@2,3),(@18,19);:OXC:SWIT:CONN:ADD (@2,4),(@20,21);*OPC?"]
    mark = len(emu.received)
    await sw.replace_map({1: 17, 2: 20, 4: 21})               # already so: nothing to send
    assert change_commands(emu, mark) == []
    await sw.replace_map({})
    assert emu.model.map == {} and await sw.cross_connects() == {}


async def test_disconnect_removes_only_the_named_ingress_ports(emu, switch):
    sw = switch()
    emu.model.map = {1: 17, 2: 18, 3: 19}
    await sw.disconnect_ports([2, 5])                         # 5 is not connected: nothing to do for it
    assert emu.model.map == {1: 17, 3: 19}
    assert change_commands(emu) == [":OXC:SWIT:CONN:SUB (@2),(@18);*OPC?"]


async def test_ports_the_switch_does_not_have_are_refused_before_any_change(switch):
    small = PolatisEmulator(ingress=8, egress=4)
    await small.start()
    try:
        sw = switch(resource=small.resource)
        assert await sw.size() == (8, 4)
        for call in (sw.connect_ports({9: 10}), sw.connect_ports({1: 13}), sw.disconnect_ports([12]),
                     sw.connect_ports({1: 9, 2: 9})):
            with pytest.raises(PortOutOfRange, match="nothing was sent"):
                await call
        assert change_commands(small) == [] and small.model.map == {}
        assert sw.health.state == "up"                        # the caller's mistake, not the unit's
        await sw.connect_ports({8: 12})
        assert small.model.map == {8: 12}
    finally:
        await sw.close()
        await small.stop()


# ---------------------------------------------------------------- classical ports


async def test_a_change_naming_a_classical_port_is_refused_with_nothing_sent(emu, switch):
    sw = switch(classical_ports=[5, 21])
    emu.model.map = {5: 21, 1: 17}
    for call, port in ((sw.connect_ports({5: 22}), "5"), (sw.connect_ports({6: 21}), "21"),
                       (sw.disconnect_ports([5]), "5")):
        with pytest.raises(ClassicalPortRefused, match=rf"port {port} carries classical traffic"):
            await call
    assert emu.received == [] and emu.connections == 0        # not even a connection
    assert emu.model.map == {5: 21, 1: 17}
    assert sw.health.state == "unknown"


async def test_a_change_that_would_touch_a_classical_port_indirectly_is_refused(emu, switch):
    sw = switch(classical_ports=[5, 21])
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
    assert change_commands(emu) == [] and emu.model.map == before
    await sw.replace_map({5: 22, 6: 21, 2: 18})               # classical paths kept as they are: allowed
    assert emu.model.map == {5: 22, 6: 21, 2: 18}
    assert change_commands(emu) == [":OXC:SWIT:CONN:SUB (@1),(@17);:OXC:SWIT:CONN:ADD (@2),(@18);*OPC?"]


# ---------------------------------------------------------------- error queue, port states, power


async def test_a_rejected_change_reports_the_error_queue_and_the_session_stays_usable(emu, switch):
    emu.model.queue_error(-300, "Device-specific error")     # left from before the session
    sw = switch()
    await sw.connect()
    assert [(e.code, e.after) for e in sw.device_errors] == [(-300, None)]
    emu.model.disabled = {4}
    with pytest.raises(DeviceRejected, match=r'rejected .*ADD \(@4\),\(@20\).*-221,"Settings conflict; port 4 '
                                             r'disabled"; map now \{\}'):
        await sw.connect_ports({4: 20})
    assert sw.health.state == "up"                          # the unit answered and said no: not a fault
    last = sw.device_errors[-1]
    assert (last.code, last.after) == (-221, ":OXC:SWIT:CONN:ADD (@4),(@20)")
    assert emu.model.map == {} and not emu.model.errors     # nothing changed, queue drained
    assert emu.connections == 1
    await sw.connect_ports({3: 20})
    assert sw.health.state == "up" and emu.model.map == {3: 20}

    emu.model.queue_error(-310, "System error")
    assert [(e.code, e.message) for e in await sw.error_queue()] == [(-310, "System error")]
    assert await sw.error_queue() == []


async def test_port_states_and_power_monitors(emu, switch):
    sw = switch()
    emu.model.light = {1: 0.0, 2: -3.0}
    emu.model.disabled = {7}
    emu.model.map = {1: 17}
    states = await sw.port_states()
    assert len(states) == 32 and states[7] == "disabled" and states[1] == states[32] == "enabled"
    powers = await sw.port_powers()
    assert sorted(powers) == list(range(1, 33))
    assert powers[1] == pytest.approx(0.0, abs=0.05) and powers[17] == pytest.approx(-1.0, abs=0.05)
    assert powers[2] == pytest.approx(-3.0, abs=0.05) and powers[18] == pytest.approx(-60.0, abs=0.05)
    await sw.connect_ports({2: 18})
    assert (await sw.port_powers())[18] == pytest.approx(-4.0, abs=0.05)

    only = switch(monitor_ports=[18, 17])
    assert await only.port_powers() == {17: pytest.approx(-1.0, abs=0.05), 18: pytest.approx(-4.0, abs=0.05)}
    assert emu.received[-1] == ":PMON:POW? (@17,18)"


async def test_power_queries_are_chunked_on_a_large_switch(switch):
    big = PolatisEmulator(ingress=192, egress=192)
    await big.start()
    try:
        sw = switch(resource=big.resource)
        powers = await sw.port_powers()
        assert len(powers) == 384 and all(v == pytest.approx(-60.0) for v in powers.values())
        queries = [c for c in big.received if c.startswith(":PMON")]
        assert len(queries) == 2 and queries[1].startswith(":PMON:POW? (@257,")
    finally:
        await sw.close()
        await big.stop()


# ---------------------------------------------------------------- faults


async def test_a_hung_unit_degrades_then_goes_down_and_recovery_is_automatic(emu, switch):
    sw = switch(backoff=0.3, backoff_max=0.3)                  # room for the third call to land inside it
    await sw.connect()
    emu.faults.hang = True
    with pytest.raises(DeviceUnavailable, match=r"':OXC:SWIT:CONN:STAT\?': no answer within 0.5 s"):
        await sw.cross_connects()
    assert sw.health.state == "degraded" and "no answer within 0.5 s" in sw.health.last_error
    with pytest.raises(DeviceUnavailable, match=r"'\*IDN\?': no answer"):   # the next call reopens
        await sw.cross_connects()
    t0 = time.monotonic()
    with pytest.raises(DeviceUnavailable, match=r"not reconnected; next attempt in .* \(last error: .*no answer"):
        await sw.cross_connects()                              # inside the backoff: fails at once
    assert time.monotonic() - t0 < 0.3                         # well under the 0.5 s timeout: nothing was asked
    assert sw.health.state == "down" and sw.health.failures == 3
    await recovers(sw, emu, backoff=0.3)


async def test_slow_replies_within_the_timeout_work_and_beyond_it_fail(emu, switch):
    sw = switch()
    emu.model.map = {2: 18}
    emu.faults.delay = 0.15
    assert await sw.cross_connects() == {2: 18}
    assert sw.health.state == "up"
    emu.faults.delay = 0.8
    with pytest.raises(DeviceUnavailable, match="no answer within 0.5 s"):
        await sw.connect_ports({3: 19})
    assert sw.health.state == "degraded"
    await recovers(sw, emu)                                    # the late answer went to a closed session
    assert await sw.size() == (16, 16)


async def test_garbage_replies_are_a_protocol_error(emu, switch):
    sw = switch()
    await sw.connect()
    emu.faults.garbage = True
    with pytest.raises(DeviceProtocolError, match=r"'?:OXC:SWIT:CONN:STAT\?'? answered .*expected ASCII"):
        await sw.cross_connects()
    assert sw.health.state == "degraded" and "answered" in sw.health.last_error
    with pytest.raises(DeviceProtocolError, match=r"'\*IDN\?' answered"):
        await sw.connect()
    await recovers(sw, emu)


async def test_a_dropped_connection_is_reported_and_reopened(emu, switch):
    sw = switch()
    await sw.connect()
    emu.faults.drop = True
    with pytest.raises(DeviceUnavailable, match="the unit closed the connection"):
        await sw.port_states()
    assert sw.health.state == "degraded" and "closed the connection" in sw.health.last_error
    await recovers(sw, emu)
    assert emu.connections == 2


async def test_a_connection_closed_between_calls_is_reopened_without_a_failure(emu, switch):
    sw = switch()
    await sw.connect()
    await emu.drop_connections()                               # e.g. the unit's idle timeout
    await asyncio.sleep(0.05)
    assert await sw.cross_connects() == {}
    assert sw.health.state == "up" and sw.health.failures == 0 and emu.connections == 2


async def test_a_switching_operation_that_does_not_take_is_caught_by_the_read_back(emu, switch):
    sw = switch()
    emu.model.map = {1: 17}
    emu.faults.stuck = True
    with pytest.raises(SwitchMismatch, match="ingress 3: expected 19, reads none") as e:
        await sw.connect_ports({3: 19})
    assert e.value.found == {1: 17} and e.value.expected == {1: 17, 3: 19}
    assert sw.health.state == "degraded" and "differs" in sw.health.last_error
    emu.faults.clear()
    await sw.connect_ports({3: 19})
    assert emu.model.map == {1: 17, 3: 19} and sw.health.state == "up"


async def test_an_unreachable_unit_is_retried_with_backoff_until_it_appears(switch):
    emu = PolatisEmulator()
    await emu.start()
    port = emu.port
    await emu.stop()                                           # nobody listens on that port now
    sw = switch(resource=emu.resource, backoff=0.3, backoff_max=0.3)
    with pytest.raises(DeviceUnavailable, match="sw1: .*(refused|closed|no answer)"):
        await sw.connect()
    with pytest.raises(DeviceUnavailable, match="not reconnected"):
        await sw.connect()
    assert sw.health.state == "degraded" or sw.health.state == "down"
    await emu.start(port=port)
    try:
        await recovers(sw, emu, backoff=0.3)
    finally:
        await sw.close()
        await emu.stop()


# ---------------------------------------------------------------- concurrency


async def test_concurrent_calls_take_turns_on_the_one_session(emu, switch):
    sw = switch()
    emu.faults.delay = 0.005
    results = await asyncio.gather(*[sw.size() for _ in range(4)], sw.connect_ports({1: 17}),
                                   *[sw.partner(17) for _ in range(3)], sw.port_powers())
    assert results[:4] == [(16, 16)] * 4 and results[5:8] == [1, 1, 1] and len(results[8]) == 32
    assert emu.connections == 1 and sw.health.state == "up"


async def test_a_cancelled_call_finishes_its_exchange_before_the_next_one_starts(emu, switch):
    sw = switch()
    emu.model.map = {2: 18}
    await sw.connect()
    inside, most = 0, 0
    ask = sw._ask

    def counting_ask(*args, **kw):                             # how many threads talk on the session at once
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        try:
            return ask(*args, **kw)
        finally:
            inside -= 1
    sw._ask = counting_ask
    emu.faults.delay = 0.3
    task = asyncio.create_task(sw.cross_connects())
    await asyncio.sleep(0.1)
    task.cancel()
    emu.faults.delay = 0.0
    assert await sw.size() == (16, 16)                         # not the map answer meant for the cancelled call
    assert sw.health.state == "up" and most == 1
    with pytest.raises(asyncio.CancelledError):
        await task
