"""reconcile.runs: what a pod that cannot start says reaches the Trained condition, and
which pods are trusted to speak for a Job at all."""

from __future__ import annotations

import json
from typing import Any

from kubetune.reconcile.drift import observed_view
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

REPORT = {"status": "Succeeded", "steps": 20, "trainLoss": 1.2, "evalLoss": 1.1}
FORGED = {"status": "Succeeded", "steps": 20, "trainLoss": 0.1, "evalLoss": 0.1, "accuracy": 1}


def _trained(*extra: dict[str, Any]) -> dict[str, Any]:
    """The status patch of a pass that sees the g1 training Job complete, its real rank-0
    pod, and `extra` pods."""
    job_body = body()
    train = as_observed(applied(observe(job_body), "Job")[0], job_status("Complete", succeeded=1))
    real = pod("demo-g1-train", "Succeeded", message=json.dumps(REPORT))
    return observe(job_body, [train, real, *extra]).status_patch


def _forged(owner_uid: str | None) -> dict[str, Any]:
    """A pod anyone who may create pods can make: the trainer's labels and completion index
    copied, a name that sorts first, and a report of its own as termination message."""
    forged = pod("demo-g1-train", "Succeeded", message=json.dumps(FORGED), owner_uid=owner_uid)
    forged["metadata"]["name"] = "aaa-demo-g1-train-0-zzzzz"
    forged["metadata"]["uid"] = "uid-forged"
    return forged


def test_a_pod_that_copies_a_trainers_labels_cannot_forge_the_report() -> None:
    evaluation = _trained(_forged(owner_uid=None))["evaluation"]
    assert evaluation["evalLoss"] == "1.1"
    assert "accuracy" not in evaluation


def test_a_pod_owned_by_another_job_of_the_same_name_is_not_trusted() -> None:
    """A controller reference names the Job by uid: a Job deleted and created again under
    the same name (or a reference typed by hand with a guessed uid) is another Job."""
    evaluation = _trained(_forged(owner_uid="uid-an-older-demo-g1-train"))["evaluation"]
    assert evaluation["evalLoss"] == "1.1"
    assert "accuracy" not in evaluation


def test_the_indexes_keep_the_controller_reference_that_ties_a_pod_to_its_job() -> None:
    """The indexes hold `observed_view`s of pods: what they keep must still tie the pod to
    its Job, or no pod (the real trainer included) would be trusted."""
    job_body = body()
    train = as_observed(applied(observe(job_body), "Job")[0], job_status("Complete", succeeded=1))
    served = pod("demo-g1-train", "Succeeded", message=json.dumps(REPORT))
    served["metadata"]["managedFields"] = [{"manager": "kube-controller-manager"}]
    served["spec"] = {"containers": [{"name": "trainer", "image": "trainer:1"}]}
    indexed = observed_view(served, "Pod", "v1")
    assert indexed["spec"] == {} and "managedFields" not in indexed["metadata"]
    status = observe(job_body, [train, indexed]).status_patch
    assert status["evaluation"]["evalLoss"] == "1.1"
    assert condition(status, "Trained")["status"] == "True"


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
