"""The operator's burst helpers: write lanes, shared existence checks, apply bookkeeping,
retries of refused passes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kubetune.operator.applier import RetryLater, updated_children
from kubetune.operator.lanes import Lanes
from kubetune.operator.references import ExistenceCache


def test_deferred_writes_wait_for_the_critical_lane() -> None:
    order: list[str] = []

    async def critical(lanes: Lanes, release: asyncio.Event) -> None:
        async with lanes.critical():
            order.append("critical started")
            await release.wait()
            order.append("critical done")

    async def deferred(lanes: Lanes) -> None:
        await lanes.wait_turn()
        order.append("deferred")

    async def main() -> None:
        lanes = Lanes(max_wait_seconds=30)
        release = asyncio.Event()
        first = asyncio.create_task(critical(lanes, release))
        await asyncio.sleep(0)
        later = asyncio.create_task(deferred(lanes))
        await asyncio.sleep(0.01)
        assert order == ["critical started"]
        assert lanes.critical_in_flight == 1
        release.set()
        await asyncio.gather(first, later)
        assert lanes.critical_in_flight == 0

    asyncio.run(main())
    assert order == ["critical started", "critical done", "deferred"]


def test_deferred_writes_do_not_starve() -> None:
    async def main() -> bool:
        lanes = Lanes(max_wait_seconds=0.05)
        async with lanes.critical():
            await lanes.wait_turn()  # returns after max_wait although the lane is busy
            return lanes.critical_in_flight == 1

    assert asyncio.run(main())


class FakeLookup:
    def __init__(self, answer: bool | Exception) -> None:
        self.answer = answer
        self.calls = 0

    async def __call__(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        self.calls += 1
        await asyncio.sleep(0.01)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_concurrent_checks_of_one_object_share_one_request() -> None:
    lookup = FakeLookup(True)
    now = [0.0]
    cache = ExistenceCache(lookup, ttl_seconds=5, clock=lambda: now[0])

    async def burst() -> list[bool]:
        return await asyncio.gather(
            *(cache.exists("v1", "PersistentVolumeClaim", "ns", "shared") for _ in range(50))
        )

    assert asyncio.run(burst()) == [True] * 50
    assert lookup.calls == 1
    assert asyncio.run(cache.exists("v1", "PersistentVolumeClaim", "ns", "shared"))
    assert lookup.calls == 1, "found objects are remembered for the TTL"
    now[0] = 6.0
    assert asyncio.run(cache.exists("v1", "PersistentVolumeClaim", "ns", "shared"))
    assert lookup.calls == 2, "and looked up again after it"


def test_missing_objects_and_errors_are_not_remembered() -> None:
    missing = FakeLookup(False)
    cache = ExistenceCache(missing)
    assert not asyncio.run(cache.exists("v1", "Secret", "ns", "token"))
    assert not asyncio.run(cache.exists("v1", "Secret", "ns", "token"))
    assert missing.calls == 2

    failing = FakeLookup(RuntimeError("HTTP 500"))
    cache = ExistenceCache(failing)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            asyncio.run(cache.exists("v1", "Secret", "ns", "token"))
    assert failing.calls == 2


def _job(name: str, rv: int, suspend: bool) -> dict[str, object]:
    return {
        "kind": "Job",
        "metadata": {"name": name, "resourceVersion": str(rv)},
        "spec": {"suspend": suspend},
    }


def test_apply_responses_replace_older_children_only() -> None:
    children = [_job("train-1", 10, True), _job("export-1", 12, False)]
    applied = [_job("train-1", 11, False), _job("export-1", 9, True), _job("train-2", 3, True)]
    merged = {c["metadata"]["name"]: c for c in updated_children(children, applied)}
    assert merged["train-1"]["spec"] == {"suspend": False}  # newer: the response wins
    assert merged["export-1"]["spec"] == {"suspend": False}  # older response: index wins
    assert "train-2" in merged  # not in the index yet


class FlakyController:
    """Refuses the first pass as the API server would (RetryLater), accepts the next."""

    def __init__(self) -> None:
        self.passes: list[str] = []

    def revisit(self) -> list[Any]:
        return []

    async def reconcile(self, body: dict[str, Any], children: list[Any], *pool: Any) -> None:
        self.passes.append(body["metadata"]["resourceVersion"])
        if len(self.passes) == 1:
            raise RetryLater("PATCH jobs: HTTP 429")


def test_a_refused_pass_is_retried_from_the_indexes(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf

    from kubetune.operator import handlers
    from kubetune.operator.indexes import INDEXES

    monkeypatch.setattr(handlers, "RETRY_SECONDS", 0.01)
    key = ("ns", "job")
    stale = {"metadata": {"namespace": "ns", "name": "job", "resourceVersion": "1"}}
    fresh = {"metadata": {"namespace": "ns", "name": "job", "resourceVersion": "2"}}
    indexes: dict[str, dict[Any, Any]] = {name: {} for name in INDEXES}
    indexes["finetunejobs"][key] = [stale]
    controller = FlakyController()
    memo = kopf.Memo(controller=controller, shared={})

    async def main() -> None:
        await handlers.reconcile_pass(memo, stale, indexes)  # refused: a retry is scheduled
        await handlers.reconcile_pass(memo, stale, indexes)  # an event's pass: accepted
        indexes["finetunejobs"][key] = [fresh]  # the watch delivered a newer body meanwhile
        for _ in range(100):
            if len(controller.passes) == 3:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    # The retry reads the indexes when it fires, so it reconciles the freshest body.
    assert controller.passes == ["1", "1", "2"]
    assert memo.shared["retries"] == {}
