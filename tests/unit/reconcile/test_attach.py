"""reconcile.attach: a pod stuck in ContainerCreating because its volume is attached to another
node (ReadWriteOnce block storage: Multi-Attach) is reported with the attach controller's own
words, not as "pods are starting"."""

from __future__ import annotations

import json
from typing import Any

from kubetune.builders import naming
from kubetune.reconcile.attach import PodEvent, attach_failure, pod_event, waiting_for_volumes
from tests.unit.operator_fixtures import (
    applied,
    as_observed,
    body,
    condition,
    deployment_status,
    job_status,
    observe,
    pod,
    spec_dict,
)

MULTI_ATTACH = (
    'Multi-Attach error for volume "pvc-0c1d" Volume is already used by pod(s) '
    "demo-server-6d9f7-xk2lp"
)


def _creating(job_name: str, *, init: bool = False) -> dict[str, Any]:
    """A scheduled pod whose containers wait for their volumes (what the kubelet shows)."""
    waiting = pod(job_name, "Pending")
    reason = "PodInitializing" if init else "ContainerCreating"
    statuses = [{"name": "c", "state": {"waiting": {"reason": reason}}}]
    waiting["status"]["initContainerStatuses" if init else "containerStatuses"] = statuses
    waiting["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
    return waiting


def _event(for_pod: dict[str, Any], reason: str = "FailedAttachVolume",
           message: str = MULTI_ATTACH, last: str = "2026-01-01T00:05:00Z") -> dict[str, Any]:
    """A core/v1 Event about `for_pod`, as the API server lists it."""
    meta = for_pod["metadata"]
    return {
        "metadata": {"name": f"{meta['name']}.17a", "namespace": meta["namespace"]},
        "involvedObject": {"kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                           "uid": meta["uid"]},
        "reason": reason,
        "message": message,
        "type": "Warning",
        "lastTimestamp": last,
    }  # fmt: skip


def _events(*raw: dict[str, Any]) -> list[PodEvent]:
    parsed = [pod_event(e) for e in raw]
    return [e for e in parsed if e is not None]


def test_a_multi_attach_event_of_a_waiting_pod_is_the_reason() -> None:
    stuck = _creating("demo-g2-train")
    failure = attach_failure([stuck], _events(_event(stuck)))
    assert failure == f"pod {stuck['metadata']['name']}: {MULTI_ATTACH}"


def test_the_newest_attach_event_speaks() -> None:
    stuck = _creating("demo-g2-train")
    old = _event(stuck, message="AttachVolume.Attach failed: timed out",
                 last="2026-01-01T00:01:00Z")  # fmt: skip
    assert attach_failure([stuck], _events(_event(stuck), old)) == (
        f"pod {stuck['metadata']['name']}: {MULTI_ATTACH}"
    )


def test_nothing_to_report_without_a_stuck_pod_or_without_its_event() -> None:
    stuck = _creating("demo-g2-train")
    running = pod("demo-g2-train", "Running", index="1")
    # The pod got its volume since: the event stays in the namespace for an hour.
    assert attach_failure([running], _events(_event(running))) is None
    # Another pod's event, or another reason, says nothing of this pod.
    other = _creating("demo-g2-train")
    other["metadata"]["uid"] = "another-uid"
    assert attach_failure([stuck], _events(_event(other))) is None
    assert attach_failure([stuck], _events(_event(stuck, reason="Scheduled"))) is None
    assert attach_failure([stuck], []) is None


def test_an_init_container_waiting_for_the_volume_counts_too() -> None:
    stuck = _creating("demo-g2-train", init=True)
    assert waiting_for_volumes([stuck])
    assert attach_failure([stuck], _events(_event(stuck))) is not None


def test_only_pods_waiting_for_their_volumes_make_the_operator_look_for_events() -> None:
    """The operator lists a namespace's attach events only when this is true: a pass over
    running or finished work sends no extra request."""
    assert waiting_for_volumes([_creating("demo-g1-train")])
    assert not waiting_for_volumes([pod("demo-g1-train", "Running")])
    assert not waiting_for_volumes([pod("demo-g1-train", "Succeeded", message="{}")])
    unscheduled = pod("demo-g1-train", "Pending", unschedulable="0/3 nodes are available")
    assert not waiting_for_volumes([unscheduled])


def test_events_the_api_returns_half_filled_are_skipped() -> None:
    assert pod_event({"reason": "FailedAttachVolume"}) is None
    assert pod_event({"involvedObject": {"kind": "Node", "name": "n", "uid": "u"},
                      "reason": "FailedAttachVolume", "message": "x"}) is None  # fmt: skip


def test_the_trained_condition_carries_the_attach_failure() -> None:
    """Generation 2 trains on a GPU node while the server holds the ReadWriteOnce claim on
    another: before, status said only "training pods are starting"."""
    job_body = body()
    train = as_observed(applied(observe(job_body), "Job")[0], job_status(active=1))
    stuck = _creating("demo-g1-train")
    trained = condition(observe(job_body, [train, stuck], events=_events(_event(stuck))),
                        "Trained")  # fmt: skip
    assert trained["status"] == "Unknown"
    assert trained["reason"] == "VolumeAttachFailed"
    assert MULTI_ATTACH in trained["message"]
    quiet = condition(observe(job_body, [train, stuck]), "Trained")
    assert quiet["reason"] == "Pending"


def test_the_serving_condition_carries_a_server_pods_attach_failure() -> None:
    job_body = body(spec_dict(serving={"replicas": 2}))
    first = observe(job_body)
    job = as_observed(applied(first, "Job")[0], job_status("Complete", succeeded=1))
    trainer = pod("demo-g1-train", "Succeeded", message=json.dumps({"status": "Succeeded"}))
    export_manifest = applied(observe(job_body, [job, trainer]), "Job")
    exporter = as_observed(next(m for m in export_manifest if "export" in m["metadata"]["name"]),
                           job_status("Complete", succeeded=1))  # fmt: skip
    done = pod("demo-g1-export", "Succeeded", message=json.dumps({"ok": True}))
    serving = observe(job_body, [job, trainer, exporter, done])
    deployment = as_observed(applied(serving, "Deployment")[0],
                             deployment_status(replicas=2, available=1, updated=2))  # fmt: skip
    server = _creating("demo-server", init=True)
    server["metadata"]["labels"][naming.LABEL_COMPONENT] = naming.COMPONENT_SERVER
    server["metadata"]["ownerReferences"] = []
    children = [job, trainer, exporter, done, deployment, server]

    said = condition(observe(job_body, children, events=_events(_event(server))), "Serving")

    assert said["reason"] == "VolumeAttachFailed"
    assert MULTI_ATTACH in said["message"]
