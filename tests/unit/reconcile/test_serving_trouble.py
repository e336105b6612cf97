"""Why the inference pods are not available, in the Serving condition: the scheduler's
reason, a container that cannot start or keeps restarting (with its last termination
message), and a rollout past its progress deadline (issue 28, item 7). Pure; no cluster."""

from __future__ import annotations

import json
from typing import Any

from kubetune.reconcile.readiness import serving_condition
from kubetune.reconcile.runs import RunState, serving_trouble
from kubetune.reconcile.status import ServingView
from tests.unit.operator_fixtures import (
    applied,
    as_observed,
    body,
    condition,
    job_status,
    observe,
    pod,
    spec_dict,
)

REPORT = {"status": "Succeeded", "steps": 20, "trainLoss": 1.2, "evalLoss": 1.1}
INSUFFICIENT = "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available"
LOAD_ERROR = "model failed to load: OrtException: Load model from /artifacts/x failed"
DEADLINE = {
    "type": "Progressing",
    "status": "False",
    "reason": "ProgressDeadlineExceeded",
    "message": 'ReplicaSet "demo-server-5d9c" has timed out progressing.',
}


def server_pod(
    *,
    phase: str = "Pending",
    conditions: list[dict[str, Any]] | None = None,
    container: dict[str, Any] | None = None,
    controller: str = "ReplicaSet",
) -> dict[str, Any]:
    """An inference pod as the ReplicaSet controller makes it (its controller reference)."""
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if container is not None:
        status["containerStatuses"] = [{"name": "server", "ready": False, **container}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "demo-server-5d9c-xyz",
            "namespace": "team",
            "labels": {"kubetune.io/job": "demo", "app.kubernetes.io/component": "server",
                       "kubetune.io/generation": "1"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": controller,
                                 "name": "demo-server-5d9c", "uid": "rs", "controller": True}],
        },
        "status": status,
    }  # fmt: skip


def unschedulable_pod() -> dict[str, Any]:
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": INSUFFICIENT}  # fmt: skip
    return server_pod(conditions=[scheduled])


def crash_looping_pod(message: str = LOAD_ERROR) -> dict[str, Any]:
    return server_pod(phase="Running", container={
        "restartCount": 4,
        "state": {"waiting": {"reason": "CrashLoopBackOff",
                              "message": "back-off 1m20s restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message}},
    })  # fmt: skip


def image_pull_pod() -> dict[str, Any]:
    return server_pod(container={"restartCount": 0, "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "kubetune/serve:nope"'}}})


def deployment(conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"generation": 1},
            "status": {"observedGeneration": 1, "replicas": 1, "unavailableReplicas": 1,
                       "conditions": conditions or []}}  # fmt: skip


# ------------------------------------------------------------------ the pure decision


def test_an_unschedulable_inference_pod_gives_the_schedulers_reason() -> None:
    trouble = serving_trouble(deployment(), [unschedulable_pod()])
    assert trouble is not None and trouble.state is RunState.UNSCHEDULABLE
    assert trouble.reason == "Unschedulable" and "1 Insufficient cpu" in trouble.message


def test_an_image_that_cannot_be_pulled_is_named() -> None:
    trouble = serving_trouble(deployment(), [image_pull_pod()])
    assert trouble is not None and trouble.reason == "ContainersCannotStart"
    assert "ImagePullBackOff" in trouble.message and "kubetune/serve:nope" in trouble.message


def test_a_crash_loop_carries_the_last_termination_message() -> None:
    trouble = serving_trouble(deployment(), [crash_looping_pod()])
    assert trouble is not None and trouble.reason == "ServerRestarting"
    assert "CrashLoopBackOff" in trouble.message and LOAD_ERROR in trouble.message
    assert "exit code 0" in trouble.message


def test_a_log_tail_as_termination_message_gives_its_last_line() -> None:
    tail = "Traceback (most recent call last):\n  File x\nMemoryError: cannot allocate\n\n"
    trouble = serving_trouble(deployment(), [crash_looping_pod(tail)])
    assert trouble is not None and "MemoryError: cannot allocate" in trouble.message
    assert "Traceback" not in trouble.message


def test_a_passed_progress_deadline_is_a_failed_rollout_with_the_pods_reason() -> None:
    trouble = serving_trouble(deployment([DEADLINE]), [crash_looping_pod()])
    assert trouble is not None and trouble.state is RunState.FAILED
    assert trouble.reason == "ProgressDeadlineExceeded"
    assert "has timed out progressing" in trouble.message and LOAD_ERROR in trouble.message
    alone = serving_trouble(deployment([DEADLINE]), [])
    assert alone is not None and alone.state is RunState.FAILED


def test_nothing_is_said_while_pods_merely_start() -> None:
    loading = server_pod(phase="Running", container={"restartCount": 0,
                                                     "state": {"running": {}}})  # fmt: skip
    assert serving_trouble(deployment(), [loading]) is None
    assert serving_trouble(None, []) is None


# ------------------------------------------------------------------ through reconcile


def _serving_world(
    deployment_conditions: list[dict[str, Any]], pods: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A job trained and exported, its first Deployment applied and not available."""
    job_body = body(spec_dict())
    train = as_observed(applied(observe(job_body), "Job")[0], job_status("Complete", succeeded=1))
    name = train["metadata"]["name"]
    children = [train, pod(name, "Succeeded", message=json.dumps(REPORT))]
    export = next(
        m for m in applied(observe(job_body, children), "Job")
        if m["metadata"]["name"].endswith("export")
    )  # fmt: skip
    children.append(as_observed(export, job_status("Complete", succeeded=1)))
    manifest = applied(observe(job_body, children), "Deployment")[0]
    status = {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
              "unavailableReplicas": 1, "conditions": deployment_conditions}  # fmt: skip
    children.append(as_observed(manifest, status))
    return job_body, children + pods


def test_serving_says_why_the_first_inference_pod_is_not_scheduled() -> None:
    job_body, children = _serving_world([], [unschedulable_pod()])
    serving = condition(observe(job_body, children), "Serving")
    assert (serving["status"], serving["reason"]) == ("Unknown", "Unschedulable")
    assert "1 Insufficient cpu" in serving["message"]
    assert "1 Insufficient cpu" in condition(observe(job_body, children), "Ready")["message"]


def test_a_failed_rollout_fails_serving_and_ready() -> None:
    job_body, children = _serving_world([DEADLINE], [crash_looping_pod()])
    outcome = observe(job_body, children)
    serving = condition(outcome, "Serving")
    assert (serving["status"], serving["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert LOAD_ERROR in serving["message"]
    ready = condition(outcome, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ServingFailed")
    assert LOAD_ERROR in ready["message"]


def test_a_pod_no_replicaset_controls_says_nothing() -> None:
    """Anyone who may create pods can copy the server's labels: only the Deployment's own
    pods (controlled by its ReplicaSet) speak for it."""
    job_body, children = _serving_world([], [server_pod(controller="Job", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": INSUFFICIENT}])])  # fmt: skip
    serving = condition(observe(job_body, children), "Serving")
    assert serving["reason"] == "Deploying"


def test_a_failed_rollout_of_a_new_generation_is_said_while_the_old_one_serves() -> None:
    trouble = serving_trouble(deployment([DEADLINE]), [crash_looping_pod()])
    view = ServingView(exists=True, template_generation=2, available_replicas=1,
                       serving_generation=1, trouble=trouble)  # fmt: skip
    serving = serving_condition(view, True, "http://demo-server.team.svc:8000/v1")
    assert (serving.status, serving.reason) == ("True", "Available")
    assert "rolling out generation 2: rollout failed" in serving.message
    assert LOAD_ERROR in serving.message
