"""What the operator keeps of each FineTuneJob between passes: with 1,000 jobs (bench/fleet.py)
the kept bodies were most of its memory."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from kubetune.api import GROUP, VERSION
from kubetune.operator import handlers
from kubetune.operator.controller import Controller
from tests.unit.operator_fixtures import CONFIG, spec_dict

KEY = ("team", "demo")
MANAGED_FIELDS = [
    {"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
     "fieldsV1": {"f:spec": {"f:model": {}, "f:dataset": {}}}},
    {"manager": "kubetune", "operation": "Update", "subresource": "status",
     "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}, "f:conditions": {}}}},
]  # fmt: skip


def finetunejob(resource_version: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
        "metadata": {"name": KEY[1], "namespace": KEY[0], "uid": "u1", "generation": 1,
                     "resourceVersion": resource_version, "managedFields": MANAGED_FIELDS,
                     "labels": {"team": "a"}},
        "spec": spec_dict(),
        "status": {"phase": "Running", "observedGeneration": 1},
    }  # fmt: skip


def test_the_finetunejob_index_keeps_no_managed_fields() -> None:
    """It kept `dict(body)`: the managedFields (every field each writer set, the operator's
    status fields included) were held for every job, read by nothing."""
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    [indexer] = [h for h in registry._indexing.get_all_handlers() if h.id == "finetunejobs"]
    indexed = asyncio.run(indexer.fn(body=kopf.Body(finetunejob("7"))))
    kept = indexed[KEY]
    assert "managedFields" not in kept["metadata"]
    source = finetunejob("7")
    del source["metadata"]["managedFields"]
    assert kept == source, "everything else a pass reads is kept as it came"


class Client:
    """What a Controller touches on construction; this test sends nothing."""

    async def exists(self, *_: Any) -> bool:
        return True


def test_a_patched_body_is_kept_slim_and_dropped_once_the_watch_delivers_it() -> None:
    """The answer of the operator's last status patch was kept for every job forever (a
    second full body per job, managedFields included) though the index holds the same
    version as soon as the watch delivers the patch's echo."""
    controller = Controller(Client(), CONFIG)  # type: ignore[arg-type]
    controller.remember(KEY, finetunejob("8"))
    newest = controller.newest(KEY)
    assert newest is not None and "managedFields" not in newest["metadata"]
    assert newest["status"] == {"phase": "Running", "observedGeneration": 1}

    assert not controller.wrote(KEY, finetunejob("7")), "an older event: not the echo"
    assert controller.newest(KEY) is not None, "kept until the watch reaches version 8"
    assert controller.wrote(KEY, finetunejob("8")), "the echo of the patch"
    assert controller.newest(KEY) is None, "the index holds version 8 from now on"

    controller.remember(KEY, finetunejob("9"))
    assert not controller.wrote(KEY, finetunejob("10")), "someone else wrote after us"
    assert controller.newest(KEY) is None, "the index holds a newer body than ours"


def test_a_pass_queued_before_the_echo_still_reads_the_patched_body() -> None:
    """A pass that read the index before the echo of the last status patch arrived, and
    waited for the job's lock meanwhile, must still decide from the patched body: from an
    older one it announced the same transitions again (bench/fleet.py at 300 jobs: 5.8
    Events per job instead of 5)."""
    seen: list[str] = []

    async def scenario() -> None:
        controller = Controller(Client(), CONFIG)  # type: ignore[arg-type]

        async def decide(key: Any, body: Any, *_: Any) -> None:
            seen.append(body["metadata"]["resourceVersion"])

        controller._reconcile = decide  # type: ignore[method-assign]
        async with controller.lock(KEY):  # a pass is running; it patched version 8
            controller.remember(KEY, finetunejob("8"))
            queued = asyncio.create_task(controller.reconcile(finetunejob("7"), []))
            await asyncio.sleep(0)
            assert controller.wrote(KEY, finetunejob("8")), "the echo"
        await queued
        assert seen == ["8"], "the queued pass decided from the patched body"
        assert controller.newest(KEY) is not None, "its own body was older: kept"
        await controller.reconcile(finetunejob("8"), [])
        assert seen == ["8", "8"]
        assert controller.newest(KEY) is None, "a pass given version 8: the index caught up"

    asyncio.run(scenario())
