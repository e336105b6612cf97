"""`kubetune.api.ratelimit.TokenBuckets`: the burst, the earned rate, the bound on keys."""

from __future__ import annotations

import pytest

from kubetune.api.ratelimit import NEVER_SECONDS, TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_spent_then_the_wait_is_what_the_rate_earns_back() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=0.5, burst=3, size=10, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(2.0)  # one token at 0.5/s
    clock.now += 1.0  # half a token earned
    assert buckets.take("a") == pytest.approx(1.0)
    clock.now += 1.0
    assert buckets.take("a") == 0.0


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=2, size=10, clock=clock)
    buckets.take("a")
    clock.now += 3600.0  # an hour idle earns no more than the burst
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_keys_have_buckets_of_their_own() -> None:
    buckets = TokenBuckets(rate=0.1, burst=1, size=10, clock=Clock())
    assert buckets.take("a") == 0.0
    assert buckets.take("b") == 0.0
    assert buckets.take("a") == pytest.approx(10.0)


def test_a_bucket_that_earns_nothing_answers_the_longest_wait() -> None:
    buckets = TokenBuckets(rate=0.0, burst=1, size=10, clock=Clock())
    assert [buckets.take("a"), buckets.take("a")] == [0.0, NEVER_SECONDS]


def test_the_least_recently_used_key_is_forgotten_for_room() -> None:
    buckets = TokenBuckets(rate=0.0, burst=1, size=2, clock=Clock())
    for key in ("a", "b", "c"):
        buckets.take(key)
    assert len(buckets) == 2
    assert buckets.take("a") == 0.0  # forgotten: starts full again
    assert buckets.take("c") == NEVER_SECONDS  # remembered: still spent
