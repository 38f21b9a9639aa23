"""The AQ6370 driver against the emulated OSA, over a real TCP socket through pyvisa-py (`@py`).

The emulator carries the C-band line of a CV-QKD trusted node: five classical carriers between
1532 and 1546 nm (ITU 40-56), an ASE floor at -62 dBm/0.1 nm, a notch over channels 34-38 where
the quantum channels sit some 70 dB below the carriers. The driver is built from a node's
settings exactly as the daemon builds it; only the resource names a loopback port.
"""

import asyncio
import logging
import math
import socket
import time

import pytest

from drivers.aq6370 import Aq6370, SweepTimeout, quantum_band_power
from hil.osa import Aq6370Emulator, CBandSpectrum, Leak, itu_nm
from qkdnode.errors import ConfigError, DeviceProtocolError, DeviceRejected, DeviceUnauthorized, DeviceUnavailable
from qkdnode.interfaces import SpectrumAnalyser, Trace, itu_frequency_thz

CONFIG = "node.toml"
KEY = "osa[0].settings"
CLASSICAL = {40: 1.0, 44: 0.0, 48: 2.5, 52: 3.0, 56: 1.5}
NOTCH = [34, 35, 36, 37, 38]
C_BAND = (1525.0, 1565.0)
ALARM_DBM = -50.0           # "classical power in the quantum band exceeds a configured level"
PASSWORD = "s3cret-Pa55"

FAST = dict(timeout=0.5, sweep_timeout=5.0, poll_interval=0.05, backoff=0.05, backoff_max=0.2)


@pytest.fixture
async def osa():
    emu = Aq6370Emulator(CBandSpectrum(classical=dict(CLASSICAL)), sweep_time=0.1,
                         users={"anonymous": None, "operator": PASSWORD})
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture
async def make_driver(osa):
    made = []

    def make(**settings) -> Aq6370:
        drv = Aq6370.from_settings({"resource": osa.resource, "name": "osa-quijote", **FAST, **settings},
                                   file=CONFIG, key=KEY)
        made.append(drv)
        return drv

    yield make
    for drv in made:
        await drv.close()


def near(trace: Trace, nm: float, half_width_nm: float = 0.05) -> float:
    """The highest level of the trace within +-half_width_nm of nm."""
    return max(p for w, p in zip(trace.wavelengths_nm, trace.powers_dbm) if abs(w - nm) <= half_width_nm)


# ---------------------------------------------------------------- settings


def test_settings_default_to_the_anonymous_account_and_name_what_is_wrong():
    m = Aq6370.check_settings({"resource": "TCPIP0::192.0.2.7::10001::SOCKET"}, file=CONFIG, key=KEY)
    assert (m["user"], m["timeout"], m["sweep_timeout"], m["visa_library"]) == ("anonymous", 5.0, 120.0, "@py")
    drv = Aq6370.from_settings({"resource": "TCPIP0::192.0.2.7::10001::SOCKET"}, file=CONFIG, key=KEY)
    assert isinstance(drv, SpectrumAnalyser) and drv.health.state == "unknown"

    cases = [
        ({}, "osa[0].settings.resource"),
        ({"resource": "GPIB0::1::INSTR"}, "osa[0].settings.resource"),
        ({"resource": "TCPIP::h::10001::SOCKET", "timeout": 0}, "osa[0].settings.timeout"),
        ({"resource": "TCPIP::h::10001::SOCKET", "points": 50}, "osa[0].settings.points"),
        ({"resource": "TCPIP::h::10001::SOCKET", "resolution_nm": "0.1"}, "osa[0].settings.resolution_nm"),
        ({"resource": "TCPIP::h::10001::SOCKET", "user": 'a"b'}, "osa[0].settings.user"),
        ({"resource": "TCPIP::h::10001::SOCKET", "user": "operator"}, "osa[0].settings.password"),
        ({"resource": "TCPIP::h::10001::SOCKET", "backoff": 60}, "osa[0].settings.backoff"),
        ({"resource": "TCPIP::h::10001::SOCKET", "down_after": True}, "osa[0].settings.down_after"),
    ]
    for settings, key in cases:
        with pytest.raises(ConfigError) as e:
            Aq6370.check_settings(settings, file=CONFIG, key=KEY)
        assert e.value.key == key, settings


def test_settings_never_echo_a_password():
    for settings in ({"resource": "TCPIP::h::10001::SOCKET", "pasword": PASSWORD},
                     {"resource": "TCPIP::h::10001::SOCKET", "password": PASSWORD + "\n"}):
        with pytest.raises(ConfigError) as e:
            Aq6370.check_settings(settings, file=CONFIG, key=KEY)
        assert PASSWORD not in str(e.value)
    drv = Aq6370.from_settings({"resource": "TCPIP::h::10001::SOCKET", "user": "operator", "password": PASSWORD},
                               file=CONFIG, key=KEY)
    assert PASSWORD not in repr(drv)


# ---------------------------------------------------------------- login


async def test_login_as_anonymous_and_as_a_named_user(osa, make_driver):
    anon = make_driver()
    await anon.connect()
    assert anon.health.state == "up"
    assert anon.identity.startswith("YOKOGAWA,AQ6370")
    named = make_driver(user="operator", password=PASSWORD)
    await named.connect()
    assert named.health.state == "up"
    assert osa.logins == 2 and osa.refused_logins == 0


async def test_a_wrong_password_is_refused_clearly_and_never_shown(osa, make_driver, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = PASSWORD + "-wrong"
    drv = make_driver(user="operator", password=wrong)
    with pytest.raises(DeviceUnauthorized, match="login as 'operator' refused") as e:
        await drv.connect()
    assert drv.health.state == "degraded" and "refused" in drv.health.last_error
    stranger = make_driver(user="mallory", password="x")
    with pytest.raises(DeviceUnauthorized):
        await stranger.connect()
    assert osa.refused_logins == 2 and osa.logins == 0
    for text in (str(e.value), caplog.text, repr(drv), drv.health.last_error):
        assert wrong not in text and PASSWORD not in text


async def test_the_instrument_hears_nothing_but_the_login_before_it(osa):
    def raw() -> list[bytes]:
        with socket.create_connection((osa.host, osa.port), timeout=2) as s:
            s.settimeout(0.3)
            s.sendall(b"*IDN?\r\n")
            try:
                early = s.recv(100)
            except socket.timeout:
                early = b"(silence)"
            s.settimeout(2)
            s.sendall(b'OPEN "anonymous"\r\n')
            challenge = s.recv(100)
            s.sendall(b"anything\r\n")
            ready = s.recv(100)
            s.sendall(b"*IDN?\r\n")
            return [early, challenge, ready, s.recv(100)]
    early, challenge, ready, idn = await asyncio.to_thread(raw)
    assert early == b"(silence)"
    assert (challenge, ready) == (b"AUTHENTICATE CRAM-MD5.\r\n", b"ready\r\n")
    assert idn.startswith(b"YOKOGAWA,AQ6370")


async def test_the_emulator_queues_errors_and_answers_opc_when_the_sweep_is_done(osa):
    osa.sweep_time = 0.3

    def raw() -> tuple[list[str], float]:
        with socket.create_connection((osa.host, osa.port), timeout=2) as s:
            f = s.makefile("rwb")

            def ask(line: str) -> str:
                f.write(line.encode() + b"\r\n")
                f.flush()
                return f.readline().decode().strip()
            ask('OPEN "anonymous"'), ask("")
            t0 = time.monotonic()
            opc = ask(":INIT;*OPC?")
            waited = time.monotonic() - t0
            # an unknown query gets silence, as on the instrument; the error waits in the queue
            f.write(b":SENS:FOO?\r\n:SENSe:WAVelength:STARt 1530.5NM;:SENS:WAV:STAR?;:SYST:ERR?;:SYST:ERR?\r\n")
            f.flush()
            return [opc, f.readline().decode().strip(), f.readline().decode().strip(),
                    f.readline().decode().strip(), ask(":STAT:OPER:COND?"), ask(":TRAC:Y? TRA,11,20")], waited
    (opc, start, err, no_err, cond, part), waited = await asyncio.to_thread(raw)
    assert opc == "1" and waited >= 0.25
    assert len(part.split(",")) == 10 and float(part.split(",")[0]) < -50
    assert float(start) == pytest.approx(1530.5e-9)                    # long forms too, answer in m
    assert (err, no_err, cond) == ('-113,"Undefined header"', '0,"No error"', "1")


# ---------------------------------------------------------------- sweep and trace


async def test_a_sweep_waits_for_completion_and_shows_the_carriers_the_floor_and_the_notch(osa, make_driver):
    osa.sweep_time = 0.4
    drv = make_driver()
    t0 = time.monotonic()
    trace = await drv.sweep(*C_BAND)
    assert time.monotonic() - t0 >= 0.4                  # no trace before the sweep has run
    assert osa.model.sweeps == 1 and drv.health.state == "up"

    assert len(trace.wavelengths_nm) == len(trace.powers_dbm) == 2001   # automatic sampling: 0.1 nm / 5
    assert trace.wavelengths_nm[0] == pytest.approx(C_BAND[0]) and trace.wavelengths_nm[-1] == pytest.approx(C_BAND[1])
    assert all(b > a for a, b in zip(trace.wavelengths_nm, trace.wavelengths_nm[1:]))
    for ch, dbm in CLASSICAL.items():
        assert near(trace, itu_nm(ch)) == pytest.approx(dbm, abs=0.6), ch
    assert near(trace, 1541.0, 0.1) == pytest.approx(-62, abs=2)          # ASE floor between carriers
    assert near(trace, itu_nm(36), 0.1) < -75                               # the notch: no classical light
    for ch in (37, 38):                                                     # CV-QKD channels, photon level
        assert near(trace, itu_nm(ch)) == pytest.approx(-70, abs=2.5)


async def test_sampling_and_resolution_come_from_the_settings(osa, make_driver):
    drv = make_driver(points=1001, resolution_nm=0.05)
    trace = await drv.sweep(1530.0, 1550.0)
    assert len(trace.wavelengths_nm) == 1001
    assert osa.model.rbw_nm == 0.05
    # a narrower resolution filter narrows the line: 0.05 nm off the centre it has fallen further
    ch48 = itu_nm(48)
    assert near(trace, ch48) - near(trace, ch48 + 0.06, 0.005) > 6


async def test_a_sweep_slower_than_its_timeout_is_aborted_with_a_clear_error(osa, make_driver):
    osa.sweep_time = 3.0
    drv = make_driver()
    t0 = time.monotonic()
    with pytest.raises(SweepTimeout, match=r"did not complete within 0\.4 s; aborted"):
        await drv.sweep(*C_BAND, timeout=0.4)
    assert time.monotonic() - t0 < 1.5
    assert isinstance(SweepTimeout("x"), DeviceUnavailable)
    assert drv.health.state == "degraded" and "did not complete" in drv.health.last_error
    assert not osa.model.sweeping and osa.model.sweeps == 0             # :ABOR reached the instrument
    osa.sweep_time = 0.1
    await drv.sweep(*C_BAND)
    assert drv.health.state == "up" and osa.logins == 1                  # the session was kept


async def test_requests_outside_the_instrument_limits_are_rejected_without_blaming_it(osa, make_driver):
    drv = make_driver()
    with pytest.raises(DeviceRejected, match="start < stop"):
        await drv.sweep(1565.0, 1525.0)
    assert drv.health.state == "unknown" and osa.logins == 0             # nothing was sent
    odd = make_driver(resolution_nm=0.03)                                # not a resolution it has
    with pytest.raises(DeviceRejected, match=r"-222,\"Data out of range\""):
        await odd.sweep(*C_BAND)
    assert odd.health.state == "up" and osa.model.sweeps == 0


# ---------------------------------------------------------------- WDM analysis


async def test_wdm_analysis_puts_the_carriers_on_their_itu_channels(osa, make_driver):
    drv = make_driver()
    assert await drv.channels() == []                                   # nothing swept yet
    with pytest.raises(DeviceRejected, match="no sweep yet"):
        await drv.trace()
    assert drv.health.state == "up"
    trace = await drv.sweep(*C_BAND)
    channels = await drv.channels()
    assert sorted(c.itu_channel for c in channels) == sorted(CLASSICAL)
    for c in channels:
        assert c.frequency_thz == pytest.approx(itu_frequency_thz(c.itu_channel), abs=0.005)
        assert c.power_dbm == pytest.approx(CLASSICAL[c.itu_channel], abs=0.6)
        assert c.power_dbm == pytest.approx(near(trace, c.centre_nm), abs=0.01)   # as in the trace
        assert c.osnr_db == pytest.approx(CLASSICAL[c.itu_channel] + 62, abs=3)    # over the ASE floor
    assert drv.health.state == "up"


async def test_a_strong_leak_shows_up_as_an_extra_wdm_channel_in_the_notch(osa, make_driver):
    osa.fault(leak=Leak(channel=36, power_dbm=-8.0))
    drv = make_driver()
    await drv.sweep(*C_BAND)
    channels = {c.itu_channel: c for c in await drv.channels()}
    assert set(channels) == set(CLASSICAL) | {36}
    assert channels[36].power_dbm == pytest.approx(-8.0, abs=0.6)


# ---------------------------------------------------------------- classical power in the quantum band


async def test_the_notch_keeps_the_quantum_band_dark_and_a_leak_lights_it(osa, make_driver):
    drv = make_driver()
    clean = quantum_band_power(await drv.sweep(*C_BAND), NOTCH, 25)
    assert max(clean.values()) < ALARM_DBM and set(clean) == set(NOTCH)
    assert clean[36] < -75 and clean[37] == pytest.approx(-70, abs=2.5)

    osa.fault(leak=Leak(channel=36, power_dbm=-20.0))                      # a carrier in channel 36
    carrier = quantum_band_power(await drv.sweep(*C_BAND), NOTCH, 25)
    assert carrier[36] == pytest.approx(-20, abs=0.6) and carrier[36] > ALARM_DBM
    assert carrier[34] < ALARM_DBM and carrier[38] < ALARM_DBM            # its neighbours stay dark

    osa.fault(leak=Leak(power_dbm=-45.0, ase=True))                        # ASE filling the notch
    trace = await drv.sweep(*C_BAND)
    peak = quantum_band_power(trace, NOTCH, 50)
    integrated = quantum_band_power(trace, NOTCH, 50, resolution_nm=0.1)
    for ch in (35, 36, 37):
        assert peak[ch] == pytest.approx(-45, abs=1.5)
        # 100 GHz = 0.8 nm of ASE at -45 dBm per 0.1 nm: about 9 dB more, above the alarm level
        assert integrated[ch] == pytest.approx(-45 + 10 * math.log10(0.8 / 0.1), abs=1.5)
        assert integrated[ch] > ALARM_DBM

    osa.clear_faults()
    assert max(quantum_band_power(await drv.sweep(*C_BAND), NOTCH, 25).values()) < ALARM_DBM


def test_quantum_band_power_on_a_hand_made_trace():
    xs = tuple(round(1546.0 + i * 0.01, 2) for i in range(501))           # 1546-1551 nm
    ys = [-80.0] * 501
    ys[xs.index(1548.51)] = -30.0                                          # one sample in channel 36
    trace = Trace(xs, tuple(ys))
    peak = quantum_band_power(trace, [36, 37], 20)
    assert peak == {36: -30.0, 37: -80.0}
    # integrated over 40 GHz (~0.32 nm, 32 samples of 0.01 nm) in a 0.1 nm resolution bandwidth
    flat = quantum_band_power(Trace(xs, tuple([-80.0] * 501)), [37], 20, resolution_nm=0.1)
    assert flat[37] == pytest.approx(-80 + 10 * math.log10(0.32 / 0.1), abs=0.3)
    with pytest.raises(ValueError, match="ITU channel 20"):
        quantum_band_power(trace, [20], 20)                                # far outside the trace
    with pytest.raises(ValueError, match="half_width_ghz"):
        quantum_band_power(trace, [36], 0)


# ---------------------------------------------------------------- faults: seen, reported, recovered


FAULTS = {
    # fault -> (emulator fault, expected error type, what the message says)
    "hang": (dict(hang=True), DeviceUnavailable, r"no answer to .* within 0\.5 s"),
    "slow": (dict(delay=1.0), DeviceUnavailable, r"no answer to .* within 0\.5 s"),
    "garbage": (dict(garbage=True), DeviceProtocolError, r"not ASCII text|not an integer|not a list of numbers"),
    "drop": (dict(drop=True), DeviceUnavailable, r"closed the connection|connection lost"),
}


@pytest.mark.parametrize("fault", FAULTS)
async def test_each_fault_shows_in_health_gives_a_clear_error_and_heals_by_itself(osa, make_driver, fault):
    faults, error, message = FAULTS[fault]
    drv = make_driver()
    await drv.sweep(*C_BAND)
    assert drv.health.state == "up" and osa.logins == 1

    osa.fault(**faults)
    with pytest.raises(error, match=message):
        await drv.trace()
    assert drv.health.state == "degraded" and drv.health.last_error
    for _ in range(2):                         # it keeps failing cleanly (reconnect, then backoff)
        with pytest.raises((DeviceUnavailable, DeviceProtocolError)):
            await drv.trace()
    assert drv.health.state == "down"

    osa.clear_faults()
    await asyncio.sleep(0.25)                  # past the longest reconnect pause (backoff_max)
    trace = await drv.trace()
    assert len(trace.wavelengths_nm) == 2001 and drv.health.state == "up"
    assert osa.logins >= 2                     # it logged in again on its own
    assert [c.itu_channel for c in await drv.channels()] == sorted(CLASSICAL, reverse=True)


async def test_a_slow_instrument_within_the_timeout_is_just_slow(osa, make_driver):
    osa.fault(delay=0.05)
    drv = make_driver()
    trace = await drv.sweep(*C_BAND)
    assert len(trace.powers_dbm) == 2001 and drv.health.state == "up"


async def test_a_connection_dropped_while_idle_is_reopened_on_the_next_call(osa, make_driver):
    drv = make_driver()
    await drv.sweep(*C_BAND)
    osa.fault(drop=True)                       # the instrument reboots its LAN stack ...
    osa.clear_faults()                         # ... and is back at once
    await asyncio.sleep(0.05)
    await drv.trace()
    assert drv.health.state == "up" and osa.logins == 2


async def test_a_hung_instrument_does_not_block_the_event_loop(osa, make_driver):
    drv = make_driver()
    await drv.connect()
    osa.fault(hang=True)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    task = asyncio.create_task(ticker())
    with pytest.raises(DeviceUnavailable):
        await drv.trace()
    task.cancel()
    assert ticks >= 10                          # the loop ran on during the 0.5 s wait


async def test_calls_take_turns_and_a_cancelled_sweep_leaves_no_mess(osa, make_driver):
    osa.sweep_time = 0.3
    drv = make_driver()
    trace, channels = await asyncio.gather(drv.sweep(*C_BAND), drv.channels())
    assert len(trace.wavelengths_nm) == 2001 and len(channels) == len(CLASSICAL)   # analysis saw the sweep

    osa.sweep_time = 2.0
    task = asyncio.create_task(drv.sweep(*C_BAND))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert osa.model.sweeping                   # the instrument sweeps on, nobody waiting for it
    osa.sweep_time = 0.1
    trace = await drv.sweep(1530.0, 1560.0)     # stops that sweep and runs its own
    assert trace.wavelengths_nm[0] == pytest.approx(1530.0) and drv.health.state == "up"
    assert osa.model.sweeps == 2
