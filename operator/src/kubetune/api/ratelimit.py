"""Token buckets: a rate limit both planes may use (pure: the clock is passed in).

The operator's progress endpoint rations TokenReviews per source address and in all with
them. Kept in `kubetune.api`, which does no I/O, so that a data-plane server rationing its
clients takes the same shape instead of a second copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

NEVER_SECONDS = 3600.0
"""The wait a bucket that earns nothing (rate 0) answers once spent: an hour, the longest a
client is told to wait."""


class TokenBuckets:
    """One token bucket per key (a source address), in a bounded map: a key forgotten for
    room starts again full, which only gives back what it had earned anyway.

    Each bucket holds up to `burst` tokens and earns `rate` tokens per second of `clock`."""

    def __init__(self, rate: float, burst: int, size: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.size, self.clock = rate, float(burst), size, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0.0 when a token was taken; else the seconds until one is earned."""
        now = self.clock()
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else NEVER_SECONDS
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.size:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
