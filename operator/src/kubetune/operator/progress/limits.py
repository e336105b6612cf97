"""What unauthenticated progress requests may cost: the review budgets (`ReviewLimits`) and
the bounded caches of verified and refused tokens, keyed by the token's sha256. The token
buckets that ration reviews are `kubetune.api.ratelimit.TokenBuckets`."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

VERIFIED_FOR_SECONDS = 300.0
"""How long a verified token is reused without another TokenReview."""


@dataclass(frozen=True)
class ReviewLimits:
    """What unauthenticated requests may cost the API server (`kubetune operator` flags).

    A trainer pod needs one TokenReview per token (a verified token is reused for
    `VERIFIED_FOR_SECONDS`; tokens rotate hourly at the earliest), so these leave the
    job's own pods far below every limit."""

    source_rate: float = 0.2
    """TokenReviews per second one source address earns (one every 5 s)."""
    source_burst: int = 5
    """TokenReviews one source address may spend at once."""
    total_rate: float = 5.0
    """TokenReviews per second in all, whatever the source."""
    total_burst: int = 20
    in_flight: int = 4
    """TokenReviews sent at once (the review client's connection pool has as many)."""
    queued: int = 16
    """Requests waiting for a TokenReview slot; beyond them, 503 at once."""
    refused_for_seconds: float = 300.0
    """How long a refused token is refused again without a TokenReview."""
    remembered: int = 10000
    """Tokens (verified, refused) and sources remembered; the oldest are forgotten first."""


V = TypeVar("V")


class ExpiringCache(Generic[V]):
    """A bounded map with a time to live: the least recently stored entry goes first."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float]) -> None:
        self.size, self.ttl, self.clock = size, ttl, clock
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        found = self._items.get(key)
        if found is None:
            return None
        if found[0] <= self.clock():
            del self._items[key]
            return None
        return found[1]

    def put(self, key: str, value: V) -> None:
        self._items.pop(key, None)
        self._items[key] = (self.clock() + self.ttl, value)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def digest_of(token: str) -> str:
    """Caches key tokens by their sha256: the operator keeps no usable credential."""
    return hashlib.sha256(token.encode()).hexdigest()
