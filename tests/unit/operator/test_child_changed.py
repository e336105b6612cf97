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
    asyncio.run(handler.fn(body=body, type="MODIFIED", memo=kopf.Memo(),
                           finetunejobs=Index()))
    assert reconciled == ["demo"]
