"""The combined link's pairing and XOR (pure logic; the demo's A-B link runs it over real KMEs
in tests/test_relay.py and tests/test_demo.py)."""

import secrets

import pytest

from drivers.combined import CombinedKeySource
from qkdnode.errors import ConfigError, DeviceRejected
from qkdnode.interfaces import KeyBlock, LinkTelemetry


class Device:
    """Both ends of one device pair: the same blocks by ID, handed out in order at the master end."""

    def __init__(self, prefix: str, sizes: list[int], leaked: int = 0):
        self.blocks = {f"{prefix}{i}": (secrets.token_bytes(n), leaked) for i, n in enumerate(sizes)}
        self.order = list(self.blocks)

    async def fetch_new(self, max_bits):
        out = []
        while self.order and sum(len(b.bits) for b in out) * 8 < max_bits:
            bid = self.order.pop(0)
            out.append(KeyBlock(bid, bytearray(self.blocks[bid][0]), self.blocks[bid][1]))
        return out

    async def fetch_by_ids(self, ids):
        if any(i not in self.blocks for i in ids):
            raise DeviceRejected("unknown block")
        return [KeyBlock(i, bytearray(self.blocks[i][0]), self.blocks[i][1]) for i in ids]


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


async def test_blocks_are_the_xor_of_both_devices_and_the_other_end_gets_the_same():
    dv = Device("dv-", [32] * 8)                  # 256-bit keys
    cv = Device("cv-", [128, 128], leaked=100)    # 1024-bit reconciled blocks with leakage
    master = CombinedKeySource(dv, cv)
    blocks = await master.fetch_new(1 << 20)
    assert len(blocks) == 2
    first = blocks[0]
    # Four DV keys cover one CV block; the result is their XOR, and the leakage adds up.
    expected = xor(b"".join(dv.blocks[f"dv-{i}"][0] for i in range(4)), cv.blocks["cv-0"][0])
    assert bytes(first.bits) == expected and first.leaked_bits == 100
    # The other end of the link builds the same blocks from its own devices by ID.
    slave = CombinedKeySource(dv, cv)
    again = await slave.fetch_by_ids([b.block_id for b in blocks])
    assert [bytes(b.bits) for b in again] == [bytes(b.bits) for b in blocks]
    # Knowing one device's key alone does not give the combined key.
    assert bytes(first.bits) != b"".join(dv.blocks[f"dv-{i}"][0] for i in range(4))


async def test_leftover_blocks_wait_for_their_partner_and_a_bad_id_is_refused():
    a, b = Device("a", [32, 32, 32]), Device("b", [32])
    src = CombinedKeySource(a, b)
    assert len(await src.fetch_new(1 << 20)) == 1     # a1, a2 wait: b has nothing more yet
    b.blocks["b1"] = (secrets.token_bytes(32), 0)
    b.order.append("b1")
    (blk,) = await src.fetch_new(1 << 20)
    assert bytes(blk.bits) == xor(a.blocks["a1"][0], b.blocks["b1"][0])
    with pytest.raises(DeviceRejected):
        await src.fetch_by_ids(["not-a-combined-id"])


async def test_a_faster_device_does_not_pile_up_blocks_while_the_slower_one_lags():
    class Slow(Device):
        async def fetch_new(self, max_bits):   # one block per call, whatever is asked
            return await super().fetch_new(1)

    fast, slow = Device("f", [32] * 10000), Slow("s", [32] * 100)
    src = CombinedKeySource(fast, slow)
    for _ in range(100):
        assert len(await src.fetch_new(1024)) == 1
    # The fast device's blocks waiting in memory never exceed what one request asks for.
    assert sum(len(b.bits) for b in src._queues[0]) * 8 <= 1024
    assert len(fast.order) >= 10000 - 100 - 1024 // 256


def test_settings_name_what_is_wrong(tmp_path):
    file = tmp_path / "node.toml"
    with pytest.raises(ConfigError, match="parts"):
        CombinedKeySource.check_settings({"parts": [{"driver": "etsi014"}]}, file=file, key="links[0].settings")
    with pytest.raises(ConfigError, match="do not nest"):
        CombinedKeySource.check_settings({"parts": [{"driver": "combined"}, {"driver": "combined"}]}, file=file,
                                         key="links[0].settings")


class Telemetered(Device):
    def __init__(self, prefix, sizes, qber, skr, state="running"):
        super().__init__(prefix, sizes)
        self.figures = LinkTelemetry(state=state, qber=qber, secret_key_rate_bps=skr)

    async def telemetry(self):
        return self.figures


async def test_telemetry_is_the_worse_device_and_the_slower_rate():
    src = CombinedKeySource(Telemetered("a", [32], 0.01, 5000.0), Telemetered("b", [32], 0.03, 800.0))
    t = await src.telemetry()
    assert (t.state, t.qber, t.secret_key_rate_bps) == ("running", 0.03, 800.0)
    src.parts[1].figures = LinkTelemetry(state="no-key", qber=None, secret_key_rate_bps=None)
    t = await src.telemetry()
    assert (t.state, t.qber, t.secret_key_rate_bps) == ("no-key", 0.01, None)
