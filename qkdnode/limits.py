"""Per-SAE request rates and key-bit quotas (the optional `[limits]` table of the config).

A misbehaving or compromised SAE must not starve the others: it could flood the APIs with
requests, or drain a link's pool with large requests for key. Each SAE therefore has

- a request rate: a token bucket of `burst` requests refilled at `requests_per_second`
  (every call on the ETSI 014, ETSI 004 and SKIP listeners counts, refused ones too: a flood
  of bad requests is still a flood);
- a key-bit quota: at most `key_bits_per_day` bits handed out to it as the SAE asking for new
  key (ETSI 014 `enc_keys`: number x size; SKIP `GET /key`; ETSI 004: the chunks its streams'
  source end allocates) per UTC calendar day. Fetching a key made for it (`dec_keys` and the
  like) is never refused for the quota: the bits were taken from the pool when the other SAE
  got them, and a slave that could not fetch them would lose a key.

The node holds one SaeLimits (`Node.limits`) that all three APIs consult, so switching API
does not reset or widen an SAE's limits (docs/apis.md says how each API refuses).

0 means no limit. Values from `[limits]` apply to every SAE; `[limits.saes.ID]` overrides
them for one SAE. A refused call takes nothing: it is refused before any key is cut, and the
bits of an `enc_keys` that fails later (no key, peer down) are given back to the quota.

The counters live in memory: a restart starts every bucket full and every day's count at 0; a
SIGHUP reload changes the limits and keeps the counters.
They guard the node's pools against a client gone wrong; they are not accounting.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SaeLimit:
    requests_per_second: float = 0.0  # 0: no rate limit
    burst: int = 10                    # requests at once on top of the rate (the bucket's size)
    key_bits_per_day: int = 0          # 0: no quota


class LimitExceeded(Exception):
    """An SAE went over its request rate or its key-bit quota; nothing was done for it."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after  # seconds until the call may succeed (whole seconds, at least 1)


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float):
        self.tokens, self.at = tokens, at


class SaeLimits:
    """The limits of every SAE of one node. `clock` (monotonic seconds) and `today` (the UTC
    day number) are for tests."""

    def __init__(self, default: SaeLimit | None = None, per_sae: dict[str, SaeLimit] | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 today: Callable[[], int] = lambda: int(time.time() // 86400)):
        self.default = default or SaeLimit()
        self.per_sae = dict(per_sae or {})
        self._clock, self._today = clock, today
        self._buckets: dict[str, _Bucket] = {}
        self._used: dict[str, tuple[int, int]] = {}  # SAE -> (UTC day, bits taken that day)

    def reconfigure(self, default: SaeLimit, per_sae: dict[str, SaeLimit]) -> None:
        """New limits (a SIGHUP reload of `[limits]`). The buckets and the day's counts stay: a
        reload is no way to a fresh quota, and a lowered one holds from the next request on."""
        self.default, self.per_sae = default, dict(per_sae)

    def of(self, sae: str) -> SaeLimit:
        return self.per_sae.get(sae, self.default)

    def admit(self, sae: str) -> None:
        """One request by `sae`, or LimitExceeded if its bucket is empty."""
        limit = self.of(sae)
        rate = limit.requests_per_second
        if rate <= 0:
            return
        now = self._clock()
        size = max(limit.burst, 1)
        b = self._buckets.get(sae)
        if b is None:
            b = self._buckets[sae] = _Bucket(float(size), now)
        b.tokens = min(float(size), b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens < 1.0:
            wait = (1.0 - b.tokens) / rate
            raise LimitExceeded(f"SAE {sae} is over its request rate ({rate:g} requests/s, burst {size}); "
                                f"try again in {wait:.2f} s", _whole(wait))
        b.tokens -= 1.0

    def take_bits(self, sae: str, bits: int) -> None:
        """Count `bits` against `sae`'s quota of today, or LimitExceeded (nothing counted)."""
        quota = self.of(sae).key_bits_per_day
        if quota <= 0:
            return
        day = self._today()
        used_day, used = self._used.get(sae, (day, 0))
        if used_day != day:
            used = 0
        if used + bits > quota:
            left = (day + 1) * 86400 - time.time()
            raise LimitExceeded(f"SAE {sae} would go over its quota of {quota} key bits per day: {used} taken "
                                f"today (UTC), {bits} asked", _whole(left))
        self._used[sae] = (day, used + bits)

    def give_back(self, sae: str, bits: int) -> None:
        """A hand-out counted by take_bits did not happen: the bits count no more."""
        if sae in self._used:
            day, used = self._used[sae]
            if day == self._today():
                self._used[sae] = (day, max(used - bits, 0))

    @contextlib.contextmanager
    def key_bits(self, sae: str, bits: int) -> Iterator[None]:
        """take_bits for the block's work, given back if the block raises."""
        self.take_bits(sae, bits)
        try:
            yield
        except BaseException:
            self.give_back(sae, bits)
            raise

    def used_today(self, sae: str) -> int:
        day, used = self._used.get(sae, (self._today(), 0))
        return used if day == self._today() else 0


def _whole(seconds: float) -> float:
    return float(max(1, math.ceil(seconds)))
