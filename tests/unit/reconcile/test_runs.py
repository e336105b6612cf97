"""reconcile.runs: what a pod that cannot start says reaches the Trained condition."""

from __future__ import annotations

from typing import Any

from kubetune.reconcile.runs import RunState, run_status
from tests.unit.operator_fixtures import (
    applied,
    as_observed,
    body,
    condition,
    job_status,
    observe,
    pod,
)


def _waiting_pod(job: str, reason: str, message: str, init: bool = False) -> dict[str, Any]:
    waiting = pod(job, "Pending")
    statuses = [{"name": "trainer", "state": {"waiting": {"reason": reason, "message": message}}}]
    waiting["status"]["initContainerStatuses" if init else "containerStatuses"] = statuses
    return waiting


def test_a_missing_secret_on_the_pod_reaches_the_trained_condition() -> None:
    """Cluster-wide, the operator may not read Secrets: the kubelet's refusal is the news."""
    job_body = body()
    train = as_observed(applied(observe(job_body), "Job")[0], job_status(active=1))
    name = train["metadata"]["name"]
    waiting = _waiting_pod(name, "CreateContainerConfigError", 'secret "hf-token" not found')
    trained = condition(observe(job_body, [train, waiting]), "Trained")
    assert trained["reason"] == "ContainersCannotStart"
    assert 'secret "hf-token" not found' in trained["message"]


def test_an_init_container_that_cannot_pull_counts_too() -> None:
    job = {"metadata": {"name": "j"}, "spec": {"parallelism": 1}, "status": {"active": 1}}
    pod = _waiting_pod("j", "ImagePullBackOff", "Back-off pulling image", init=True)
    status = run_status(job, [pod], "training")
    assert (status.state, status.reason) == (RunState.PENDING, "ContainersCannotStart")
    assert "ImagePullBackOff: Back-off pulling image" in status.message


def test_a_container_still_creating_is_only_starting() -> None:
    job = {"metadata": {"name": "j"}, "spec": {"parallelism": 1}, "status": {"active": 1}}
    pod = _waiting_pod("j", "ContainerCreating", "")
    assert run_status(job, [pod], "training").reason == "Pending"
