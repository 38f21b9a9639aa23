"""Per-SAE request rates and key-bit quotas ([limits], qkdnode/limits.py): a client that floods
the API or drains a pool is refused with 429 and an ETSI Error object, takes nothing, and
leaves the other SAEs of the node alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qkdnode import config
from qkdnode.errors import ConfigError
from qkdnode.limits import LimitExceeded, SaeLimit, SaeLimits
from tests.campaign_support import CampaignTestbed, Saes, record
from tests.test_config import BASE, write


class Clock:
    def __init__(self):
        self.t, self.day = 1000.0, 20000

    def __call__(self) -> float:
        return self.t


def test_the_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    limits = SaeLimits(SaeLimit(requests_per_second=2.0, burst=3), clock=clock, today=lambda: clock.day)
    for _ in range(3):
        limits.admit("sae-a1")
    with pytest.raises(LimitExceeded) as exc:
        limits.admit("sae-a1")
    assert exc.value.retry_after == 1.0 and "2 requests/s" in str(exc.value)
    limits.admit("sae-a2")                       # another SAE has its own bucket
    clock.t += 0.5                               # one request's worth of tokens comes back
    limits.admit("sae-a1")
    with pytest.raises(LimitExceeded):
        limits.admit("sae-a1")
    clock.t += 3600                              # a long pause refills to the burst, no more
    for _ in range(3):
        limits.admit("sae-a1")
    with pytest.raises(LimitExceeded):
        limits.admit("sae-a1")


def test_the_quota_counts_bits_per_utc_day_and_gives_back_what_was_not_handed_out():
    clock = Clock()
    limits = SaeLimits(SaeLimit(key_bits_per_day=1024), {"sae-a2": SaeLimit(key_bits_per_day=0)},
                       clock=clock, today=lambda: clock.day)
    limits.take_bits("sae-a1", 768)
    with pytest.raises(LimitExceeded, match="768 taken today"):
        limits.take_bits("sae-a1", 512)
    assert limits.used_today("sae-a1") == 768    # a refusal counts nothing
    with pytest.raises(RuntimeError):
        with limits.key_bits("sae-a1", 256):
            raise RuntimeError("the peer node did not take the keys")
    assert limits.used_today("sae-a1") == 768    # a hand-out that failed is given back
    with limits.key_bits("sae-a1", 256):
        pass
    assert limits.used_today("sae-a1") == 1024
    limits.take_bits("sae-a2", 1 << 40)          # 0: no quota for this one
    clock.day += 1                               # a new UTC day
    limits.take_bits("sae-a1", 1024)


def test_limits_in_the_config_are_checked_and_named(tmp_path: Path):
    path = write(tmp_path, BASE + """
[limits]
requests_per_second = 20
key_bits_per_day = 1_000_000

[limits.saes.sae-1]
burst = 40
""")
    cfg = config.load(path)
    assert cfg.limits.default == SaeLimit(20.0, 10, 1_000_000)
    assert cfg.limits.saes == {"sae-1": SaeLimit(20.0, 40, 1_000_000)}
    assert config.load(write(tmp_path, BASE)).limits.default == SaeLimit()
    for snippet, key in (("[limits]\nrequests_per_second = -1\n", "limits.requests_per_second"),
                         ("[limits]\nburst = 0\n", "limits.burst"),
                         ("[limits]\nkey_bits_per_day = 1.5\n", "limits.key_bits_per_day"),
                         ("[limits]\nrequests = 5\n", "limits.requests"),
                         ('[limits.saes.sae-2]\nburst = 5\n', "limits.saes.sae-2"),
                         ('[limits.saes.nobody]\nburst = 5\n', "limits.saes.nobody")):
        with pytest.raises(ConfigError) as exc:
            config.load(write(tmp_path, BASE + "\n" + snippet))
        assert exc.value.key == key, (snippet, exc.value)


LIMITS = """
[limits]
requests_per_second = 4.0
burst = 6

[limits.saes.sae-a2]
requests_per_second = 100.0
burst = 100
key_bits_per_day = 2048
"""


async def test_an_sae_over_its_rate_or_quota_gets_429_and_takes_nothing(tmp_path):
    tb = CampaignTestbed(tmp_path / "net", extra={"A": LIMITS}, rate_bps=0.0, initial_keys=64,
                         topology=None)
    await tb.start()
    saes = Saes(tb)
    try:
        async def stored() -> int:
            status, body = await saes.call("sae-a2", "GET", "sae-b1/status")
            assert status == 200, body
            return body["stored_key_count"]

        while await stored() < 64:
            await asyncio.sleep(0.2)
        # sae-a1 floods: 30 status calls at once, then enc_keys; at most the burst gets through.
        answers = await asyncio.gather(*(saes.call("sae-a1", "GET", "sae-b1/status") for _ in range(30)))
        codes = [s for s, _ in answers]
        assert codes.count(200) <= 7 and codes.count(429) >= 23, codes
        refused = next(b for s, b in answers if s == 429)
        assert "request rate" in refused["message"] and refused["details"][0]["retry_after_seconds"] >= 1
        status, body = await saes.enc_keys("sae-a1", "sae-b1", 4)
        assert status == 429, body
        assert await stored() == 64                     # nothing was taken
        await asyncio.sleep(1.6)                        # the rate gives sae-a1 new requests
        status, body = await saes.enc_keys("sae-a1", "sae-b1", 1)
        assert status == 200, body

        # sae-a2's quota: 2048 bits a day. 8 keys of 256 bits, then no more.
        status, body = await saes.enc_keys("sae-a2", "sae-b1", 6)
        assert status == 200, body
        status, body = await saes.enc_keys("sae-a2", "sae-b1", 4)
        assert status == 429 and "2048 key bits per day" in body["message"], body
        assert await stored() == 64 - 1 - 6            # the refused request took no key
        status, body = await saes.enc_keys("sae-a2", "sae-b1", 2)
        assert status == 200, body
        # A slave is never refused for its master's quota, and another SAE is not limited by it.
        status, body = await saes.call("sae-b1", "GET", f"sae-a2/dec_keys?key_ID={body['keys'][0]['key_ID']}")
        assert status == 200, body
        record("tls", case="request rate over [limits] (4/s, burst 6): 30 calls at once",
               outcome=f"{codes.count(200)} served, {codes.count(429)} refused with 429 and Retry-After; "
                       "pool unchanged", passed=True)
        record("tls", case="key-bit quota over [limits] (2048 bits/day)",
               outcome="429 naming the quota; no key taken; the slave still fetches; other SAEs unaffected",
               passed=True)
    finally:
        await saes.close()
        await tb.stop()
