"""The child-event handler's walk over the FineTuneJob index."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from kubetune.builders import naming
from kubetune.operator import handlers


def test_a_job_indexed_while_a_child_event_is_reconciled_does_not_break_the_walk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf's index hands out its live collection; the handler awaited a reconcile per owner
    while walking it, so an owner indexed meanwhile (a watch event, in the e2e tier a job
    applied while a namespace was torn down) failed the handler with `RuntimeError: dictionary
    changed size during iteration` and the remaining owners went unreconciled."""
    key = ("team", "demo")
    owners: dict[str, Any] = {"first": {"metadata": {"name": "demo"}}}
    reconciled: list[str] = []

    async def reconcile_pass(memo: Any, owner: Any, kwargs: Any) -> None:
        reconciled.append(owner["metadata"]["name"])
        owners.setdefault("second", {"metadata": {"name": "demo-again"}})

    class Index:
        def get(self, wanted: tuple[str, str]) -> Any:
            return owners.values() if wanted == key else None

    monkeypatch.setattr(handlers, "reconcile_pass", reconcile_pass)
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    [handler] = [h for h in registry._watching.get_all_handlers()
                 if h.id == "child_changed_jobs"]
    body = kopf.Body({"kind": "Job", "metadata": {
        "name": "demo-g1-train", "namespace": "team", "labels": {naming.LABEL_JOB: "demo"}}})
    memo = kopf.Memo(controller=IdleLanes(), shared={})
    asyncio.run(handler.fn(body=body, type="MODIFIED", memo=memo, finetunejobs=Index()))
    assert reconciled == ["demo"]


class IdleLanes:
    """The Controller's side of a child pass: no critical write in flight."""

    async def critical_idle(self) -> None:
        return None


def child_event(name: str, owner: str) -> kopf.Body:
    return kopf.Body({"kind": "Pod", "metadata": {
        "name": name, "namespace": "team", "labels": {naming.LABEL_JOB: owner}}})


def test_child_events_that_arrive_while_a_pass_waits_are_folded_into_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every child event ran a pass of its own: in bench/fleet.py's burst a job's Jobs and
    pods sent a dozen events, and as many passes over the same job took the event loop from
    new jobs. Events that arrive before the waiting pass starts now share it, and it reads
    the index when it starts (the newest body here)."""
    from kubetune.operator.lanes import Lanes

    passes: list[str] = []
    index = {("team", "demo"): [{"metadata": {"name": "demo", "resourceVersion": "1"}}],
             ("team", "other"): [{"metadata": {"name": "other", "resourceVersion": "1"}}]}

    async def reconcile_pass(memo: Any, owner: Any, kwargs: Any) -> None:
        passes.append(f"{owner['metadata']['name']}@{owner['metadata']['resourceVersion']}")

    class Controller:
        def __init__(self) -> None:
            self.lanes = Lanes(max_wait_seconds=30)

        async def critical_idle(self) -> None:
            await self.lanes.wait_turn()

    monkeypatch.setattr(handlers, "reconcile_pass", reconcile_pass)
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    [handler] = [h for h in registry._watching.get_all_handlers()
                 if h.id == "child_changed_pods"]

    async def scenario() -> None:
        memo = kopf.Memo(controller=Controller(), shared={})
        critical = memo.controller.lanes.critical()
        await critical.__aenter__()  # a new job's Job is being applied
        events = [asyncio.create_task(handler.fn(
            body=child_event(f"demo-pod-{i}", "demo"), type="MODIFIED", memo=memo,
            finetunejobs=index)) for i in range(5)]
        events.append(asyncio.create_task(handler.fn(
            body=child_event("other-pod", "other"), type="MODIFIED", memo=memo,
            finetunejobs=index)))
        await asyncio.sleep(0.05)
        assert passes == [], "no child pass while a critical write is in flight"
        index[("team", "demo")] = [{"metadata": {"name": "demo", "resourceVersion": "2"}}]
        await critical.__aexit__(None, None, None)
        await asyncio.gather(*events)
        assert sorted(passes) == ["demo@2", "other@1"], "one pass per job, from the index"
        # An event after that pass started gets a pass of its own.
        await handler.fn(body=child_event("demo-pod-0", "demo"), type="MODIFIED", memo=memo,
                         finetunejobs=index)
        assert sorted(passes) == ["demo@2", "demo@2", "other@1"]

    asyncio.run(scenario())
