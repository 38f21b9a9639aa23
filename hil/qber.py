"""The QBER of an emulated DV-QKD link, as a vendor's box would report it.

A real link's QBER is not a constant: it wanders with the fibre's temperature and
polarisation drift and the detectors' dark counts, around a level set by the link's loss,
with small fluctuations from one reading to the next. `force()` pins it, for the fault "QBER
above threshold".
"""

from __future__ import annotations

import math
import random
import time


class QberDrift:
    def __init__(self, baseline: float = 0.02, amplitude: float = 0.004, period_s: float = 600.0,
                 jitter: float = 0.0015, seed: int | None = None):
        self.baseline, self.amplitude, self.period_s, self.jitter = baseline, amplitude, period_s, jitter
        self._rng = random.Random(seed)
        self._t0 = time.monotonic()
        self._phase = self._rng.uniform(0, 2 * math.pi)
        self.forced: float | None = None

    def force(self, qber: float | None) -> None:
        """Pin the QBER at `qber` (e.g. 0.09: an eavesdropper, a misaligned link); None resumes drift."""
        self.forced = qber

    def value(self) -> float:
        if self.forced is not None:
            return self.forced
        t = time.monotonic() - self._t0
        q = self.baseline + self.amplitude * math.sin(2 * math.pi * t / self.period_s + self._phase)
        return round(min(0.5, max(0.0, q + self._rng.gauss(0.0, self.jitter))), 5)
