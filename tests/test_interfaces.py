"""Pure logic shared by every driver: the DWDM grid and the device health state machine."""

import pytest

from qkdnode.interfaces import DeviceHealth, itu_channel, itu_frequency_thz, nm_to_thz


@pytest.mark.parametrize("channel, thz", [(34, 193.4), (37, 193.7), (38, 193.8), (21, 192.1), (60, 196.0)])
def test_the_madrid_channels_sit_on_the_100_ghz_grid(channel, thz):
    assert itu_frequency_thz(channel) == thz
    assert itu_channel(thz) == channel
    assert itu_channel(thz + 0.015) == channel          # 15 GHz off still counts as that channel
    assert itu_channel(thz + 0.05) is None               # half way between channels: on no channel


def test_wavelengths_map_to_their_channel():
    assert itu_channel(nm_to_thz(1550.12)) == 34         # C34 = 1550.12 nm
    assert itu_channel(nm_to_thz(1547.72)) == 37


def test_health_degrades_then_goes_down_and_recovers_at_once():
    changes = []
    h = DeviceHealth(down_after=3, on_change=lambda old, new: changes.append((old, new)))
    assert h.state == "unknown"
    h.ok()
    h.failed(TimeoutError("no answer within 2 s"))
    assert (h.state, h.last_error) == ("degraded", "no answer within 2 s")
    h.failed("again")
    h.failed("and again")
    assert h.state == "down"
    h.ok()
    assert h.state == "up" and h.failures == 0
    assert changes == [("unknown", "up"), ("up", "degraded"), ("degraded", "down"), ("down", "up")]
