"""The leader Lease: takeover only after the holder went silent for the lease duration."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kubetune.operator.client import object_path
from kubetune.operator.leader import LeaseLock


def _lease(holder: str | None, renew: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "l", "namespace": "ns", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "renewTime": renew, "leaseDurationSeconds": 5},
    }


def test_a_live_holder_keeps_the_lease_and_a_silent_one_loses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr("kubetune.operator.leader.time.monotonic", lambda: clock[0])
    lock = LeaseLock(client=None, namespace="ns", name="l", identity="me")  # type: ignore[arg-type]
    assert lock._expired(_lease(None, "t0"))  # nobody holds it
    assert lock._expired(_lease("me", "t0"))  # ours: renew
    assert not lock._expired(_lease("other", "t1"))  # first sight of this renewal
    clock[0] += 4
    assert not lock._expired(_lease("other", "t1"))
    clock[0] += 2
    assert not lock._expired(_lease("other", "t2"))  # it renewed: alive again
    clock[0] += 6
    assert lock._expired(_lease("other", "t2"))  # silent for longer than 5 s


def test_takeover_keeps_resource_version_for_optimistic_concurrency() -> None:
    lock = LeaseLock(client=None, namespace="ns", name="l", identity="me")  # type: ignore[arg-type]
    manifest = lock._manifest(_lease("other", "t0"), transitions=1)
    assert manifest["metadata"]["resourceVersion"] == "7"
    assert manifest["spec"]["holderIdentity"] == "me"
    assert manifest["spec"]["leaseTransitions"] == 1


def test_object_paths() -> None:
    assert object_path("v1", "ConfigMap", "ns", "c") == "/api/v1/namespaces/ns/configmaps/c"
    assert object_path("batch/v1", "Job", "ns") == "/apis/batch/v1/namespaces/ns/jobs"
    assert (
        object_path("kubetune.io/v1alpha1", "FineTuneJob", "ns", "x")
        == "/apis/kubetune.io/v1alpha1/namespaces/ns/finetunejobs/x"
    )


@pytest.mark.parametrize("stall", ["get", "replace"])
def test_hold_returns_at_its_deadline_when_a_renewal_hangs(stall: str) -> None:
    """The same guarantee without a cluster: whichever request of a renewal hangs."""

    class HangingClient:
        def __init__(self) -> None:
            self.lease: dict[str, object] = {
                "metadata": {"resourceVersion": "1"},
                "spec": {"holderIdentity": "me"},
            }

        async def get(self, *_: object) -> object:
            if stall == "get":
                await asyncio.Event().wait()
            return self.lease

        async def replace(self, _: object) -> object:
            if stall == "replace":
                await asyncio.Event().wait()
            return self.lease

    async def hold_once() -> None:
        lock = LeaseLock(HangingClient(), "ns", "l", "me", duration_seconds=3)  # type: ignore[arg-type]
        lock.renewed_at = time.monotonic()
        # hold must return at all: before the deadline it waited as long as the request hung.
        async with asyncio.timeout(60):
            await lock.hold()

    asyncio.run(hold_once())
