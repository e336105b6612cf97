"""Reading children: what a Job and its pods say about a training or export run. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kubetune.api.dataplane import ExportReport, TrainingReport
from kubetune.builders import naming

MAX_MESSAGE = 1024


class RunState(StrEnum):
    MISSING = "Missing"
    PENDING = "Pending"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    UNSCHEDULABLE = "Unschedulable"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class RunStatus:
    """The state of one Job-backed step, with a reason and message fit for a condition."""

    state: RunState
    reason: str
    message: str
    report: TrainingReport | None = None
    retries: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def _condition(obj: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or ():
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def _terminated(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return dict(terminated)
    return None


def _shorten(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def failure_message(pod: Mapping[str, Any]) -> str:
    """What a failed pod said: the report's `error` (and a plan made for another model, which
    may be why), else its termination message or reason."""
    return termination_message(_terminated(pod) or {})


def termination_message(terminated: Mapping[str, Any]) -> str:
    """What a container's `terminated` state says: its exit code, and the report's `error`
    (and a plan made for another model, which may be why) or its termination message."""
    message = terminated.get("message") or ""
    report = TrainingReport.parse(message)
    if report is not None and report.error:
        message = report.error
        if report.plan_mismatch:
            message += f" ({report.plan_mismatch})"
    detail = f"exit code {terminated.get('exitCode', '?')}"
    return _shorten(f"{detail}: {message}" if message else detail)


def _completion_index(pod: Mapping[str, Any]) -> str | None:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return annotations.get(naming.JOB_COMPLETION_INDEX_ANNOTATION)


def final_report(pods: Sequence[Mapping[str, Any]]) -> TrainingReport | None:
    """The report of the succeeded rank-0 pod (index 0 writes it), else any succeeded pod's."""
    for message in _succeeded_messages(pods):
        report = TrainingReport.parse(message)
        if report is not None:
            return report
    return None


def export_report(pods: Sequence[Mapping[str, Any]]) -> ExportReport | None:
    """What the succeeded export pod exported (its termination message), if it said."""
    for message in _succeeded_messages(pods):
        report = ExportReport.parse(message)
        if report is not None and report.ok:
            return report
    return None


def _succeeded_messages(pods: Sequence[Mapping[str, Any]]) -> list[str | None]:
    succeeded = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    succeeded.sort(key=lambda p: (_completion_index(p) != "0", p["metadata"]["name"]))
    return [(_terminated(pod) or {}).get("message") for pod in succeeded]


def _unschedulable(pods: Sequence[Mapping[str, Any]]) -> str | None:
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Pending":
            continue
        for cond in status.get("conditions") or ():
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return _shorten(cond.get("message") or "no node fits the pod")
    return None


CANNOT_START = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff",
     "InvalidImageName"}
)
"""Waiting reasons of a container the kubelet will not start until something outside the pod
changes: a missing Secret or ConfigMap key, an image that cannot be pulled."""


def _cannot_start(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a pending pod's container cannot start, e.g. `secret "hf-token" not found`.

    Where the operator may not read Secrets (cluster-wide RBAC), this is how a missing one
    reaches the status."""
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Pending":
            continue
        for container in [
            *(status.get("initContainerStatuses") or ()),
            *(status.get("containerStatuses") or ()),
        ]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in CANNOT_START:
                said = waiting.get("message") or waiting["reason"]
                return _shorten(f"{waiting['reason']}: {said}")
    return None


def _latest_failed(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: (_terminated(p) or {}).get("finishedAt") or "")
    return failed[-1] if failed else None


def _restarting(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a long-running container (the inference server) keeps stopping: its waiting
    reason (CrashLoopBackOff) or restart count, and what its last run said when it ended.
    With `FallbackToLogsOnError` that is the log's tail; its last line names the error."""
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or ():
            last = (container.get("lastState") or {}).get("terminated")
            if container.get("ready") or not last:
                continue
            waiting = ((container.get("state") or {}).get("waiting") or {}).get("reason")
            restarts = int(container.get("restartCount") or 0)
            lines = [line for line in str(last.get("message") or "").splitlines() if line.strip()]
            said = termination_message({**last, "message": lines[-1] if lines else ""})
            how = waiting or f"restarted {restarts} time{'s' if restarts != 1 else ''}"
            return _shorten(f"{how}; last run ended with {said}")
    return None


SERVING = "inference"


def serving_trouble(
    deployment: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]
) -> RunStatus | None:
    """Why the serving Deployment's pods are not available, or None when nothing says so.

    Read as `run_status` reads a trainer Job's pods (the same scheduler and kubelet reasons),
    plus what only a long-running container shows: a crash loop with its last termination
    message. A rollout past the Deployment's `progressDeadlineSeconds` (Progressing=False,
    ProgressDeadlineExceeded) has failed: the Deployment controller gives up on it until the
    template changes, so it is FAILED, with the pods' reason when they give one."""
    said: RunStatus | None = None
    unschedulable = _unschedulable(pods)
    cannot_start = _cannot_start(pods)
    restarting = _restarting(pods)
    if unschedulable:
        said = RunStatus(
            RunState.UNSCHEDULABLE,
            "Unschedulable",
            f"{SERVING} pods cannot be scheduled: {unschedulable}",
        )
    elif cannot_start:
        said = RunStatus(
            RunState.PENDING,
            "ContainersCannotStart",
            f"{SERVING} pods cannot start: {cannot_start}",
        )
    elif restarting:
        said = RunStatus(RunState.PENDING, "ServerRestarting", f"{SERVING} server: {restarting}")
    for cond in ((deployment or {}).get("status") or {}).get("conditions") or ():
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == (
            "Progressing", "False", "ProgressDeadlineExceeded"
        ):
            deadline = cond.get("message") or "the rollout made no progress"
            because = f"; {said.message}" if said else ""
            message = _shorten(f"rollout failed: {deadline}{because}")
            return RunStatus(RunState.FAILED, "ProgressDeadlineExceeded", message)
    return said


FAILURE_REASONS = {
    "PodFailurePolicy": "ConfigurationError",
    "BackoffLimitExceeded": "BackoffLimitExceeded",
    "DeadlineExceeded": "DeadlineExceeded",
}


def run_status(
    job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]], what: str
) -> RunStatus:
    """Interpret a Job (`what` names it in messages: "training", "export")."""
    if job is None:
        return RunStatus(RunState.MISSING, "Creating", f"creating the {what} Job")
    status = job.get("status") or {}
    retries = int(status.get("failed") or 0)
    if _condition(job, "Complete"):
        return RunStatus(
            RunState.SUCCEEDED,
            "Succeeded",
            f"{what} finished",
            report=final_report(pods),
            retries=retries,
        )
    failed = _condition(job, "Failed")
    if failed:
        reason = FAILURE_REASONS.get(failed.get("reason", ""), "Failed")
        pod = _latest_failed(pods)
        said = f"; last pod: {failure_message(pod)}" if pod else ""
        message = _shorten(f"{what} failed ({failed.get('reason', 'Failed')}){said}")
        return RunStatus(RunState.FAILED, reason, message, retries=retries)
    if (job.get("spec") or {}).get("suspend"):
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        if annotations.get(naming.ANNOTATION_SUSPEND_REQUESTED) == "true":
            return RunStatus(RunState.SUSPENDED, "Suspended", f"{what} is suspended")
        return RunStatus(RunState.QUEUED, "Queued", f"{what} waits for Kueue to admit it")
    unschedulable = _unschedulable(pods)
    if unschedulable:
        return RunStatus(
            RunState.UNSCHEDULABLE,
            "Unschedulable",
            f"{what} pods cannot be scheduled: {unschedulable}",
            retries=retries,
        )
    cannot_start = _cannot_start(pods)
    if cannot_start:
        return RunStatus(
            RunState.PENDING,
            "ContainersCannotStart",
            f"{what} pods cannot start: {cannot_start}",
            retries=retries,
        )
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    wanted = int((job.get("spec") or {}).get("parallelism") or 1)
    if running:
        retried = f", {retries} retried" if retries else ""
        return RunStatus(
            RunState.RUNNING,
            "Running",
            f"{what}: {len(running)}/{wanted} pods running{retried}",
            retries=retries,
        )
    return RunStatus(RunState.PENDING, "Pending", f"{what} pods are starting", retries=retries)


def slim(obj: Mapping[str, Any], kind: str, api_version: str) -> dict[str, Any]:
    """What reconcile reads of a child; the rest (pod specs, managedFields) is dropped, so the
    indexes stay small and an apply response can stand in for the child until the watch
    delivers it. Of the ownerReferences only the controller's is kept: it ties a pod to the
    Job that made it (see `kubetune.reconcile.children.pods_of_job`)."""
    meta = obj.get("metadata") or {}
    controller = [
        {key: ref.get(key) for key in ("apiVersion", "kind", "name", "uid", "controller")}
        for ref in meta.get("ownerReferences") or ()
        if ref.get("controller") is True
    ]
    spec = obj.get("spec") or {}
    kept = ("suspend", "parallelism", "completions", "replicas", "accessModes")
    slim_spec: dict[str, Any] = {key: spec[key] for key in kept if key in spec}
    template_meta = (spec.get("template") or {}).get("metadata")
    if template_meta:
        slim_spec["template"] = {"metadata": dict(template_meta)}
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "generation": meta.get("generation"),
            "resourceVersion": meta.get("resourceVersion"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": dict(meta.get("annotations") or {}),
            "ownerReferences": controller,
        },
        "spec": slim_spec,
        "status": dict(obj.get("status") or {}),
    }
