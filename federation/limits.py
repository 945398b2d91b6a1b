"""Per-caller submission limits: a token bucket of jobs for each user (at an antenna) or antenna (at a hub).

A caller may submit `burst` jobs at once and `rate` jobs per second on average. A call that would take more
tokens than are left is refused whole with RESOURCE_EXHAUSTED, saying when to retry; nothing of it is stored.
Other callers are unaffected: each has its own bucket.
"""

from __future__ import annotations

import time

from federation.errors import ResourceExhausted

MAX_BUCKETS = 100_000  # idle full buckets are dropped beyond this, so many callers cannot grow memory for ever


class SubmitLimiter:
    def __init__(self, rate: float, burst: int, what: str = "jobs", clock=time.monotonic):
        self.rate, self.burst, self.what, self.clock = rate, burst, what, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when)

    def take(self, caller: str, n: int) -> None:
        """Take `n` tokens for `caller` or raise ResourceExhausted (and take none)."""
        if self.rate <= 0 or n <= 0:
            return
        if n > self.burst:
            raise ResourceExhausted(f"{n} {self.what} in one call is more than the {self.burst} this daemon "
                                    f"admits at once from {caller}; split the submission")
        now = self.clock()
        tokens, when = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        if tokens < n:
            wait = (n - tokens) / self.rate
            self._buckets[caller] = (tokens, now)
            raise ResourceExhausted(f"{caller} is submitting faster than the limit of {self.rate:g} {self.what} "
                                    f"per second (burst {self.burst}); retry in {wait:.1f} s")
        self._buckets[caller] = (tokens - n, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._prune(now)

    def _prune(self, now: float) -> None:
        full = [k for k, (t, w) in self._buckets.items() if t + (now - w) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
