"""Pods that wait for a volume another node holds, as the conditions report them. Pure.

On block storage a ReadWriteOnce claim attaches to one node at a time. A pod scheduled onto
another node (a generation-2 trainer on a GPU node while the server runs elsewhere, a second
server replica, a rollout's surge pod) stays in ContainerCreating; the pod's status says no
more than that. The attach/detach controller's Event on the pod says why
(`FailedAttachVolume`: `Multi-Attach error for volume "pvc-..." Volume is already used by
pod(s) ...`), and that is what the Trained, Exported or Serving condition carries.

Events carry no KubeTune labels, so no index holds them: the caller lists a namespace's
attach events only when `waiting_for_volumes` says some pod of the job waits, and passes
them in as `PodEvent`s (`pod_event` reads one from the API's Event object).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.api import ConditionType
from kubetune.reconcile.conditions import Cond
from kubetune.reconcile.runs import MAX_MESSAGE, RunState, RunStatus

ATTACH_EVENT_REASON = "FailedAttachVolume"
"""The attach/detach controller's Event reason for a volume it cannot attach to the pod's
node (Multi-Attach included); the operator lists events by it (a field selector)."""
REASON = "VolumeAttachFailed"
"""The condition reason for a pod that waits for such a volume."""
WAITING_FOR_VOLUMES = frozenset({"ContainerCreating", "PodInitializing"})
"""What a scheduled pod's containers wait in while its volumes attach and mount."""


@dataclass(frozen=True)
class PodEvent:
    """What reconcile reads of a core/v1 Event about a pod."""

    pod_uid: str
    pod_name: str
    reason: str
    message: str
    last_seen: str = ""
    """RFC 3339; the newest of a pod's events speaks."""


def pod_event(event: Mapping[str, Any]) -> PodEvent | None:
    """A `PodEvent` from an Event as the API lists it; None for one about something else
    or missing what identifies the pod."""
    involved = event.get("involvedObject") or {}
    if involved.get("kind") != "Pod" or not involved.get("uid") or not involved.get("name"):
        return None
    series = event.get("series") or {}
    last_seen = (
        series.get("lastObservedTime")
        or event.get("lastTimestamp")
        or event.get("eventTime")
        or ""
    )
    return PodEvent(
        pod_uid=str(involved["uid"]),
        pod_name=str(involved["name"]),
        reason=str(event.get("reason") or ""),
        message=str(event.get("message") or "").strip(),
        last_seen=str(last_seen),
    )


def _waits_for_volumes(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return False
    for container in [
        *(status.get("initContainerStatuses") or ()),
        *(status.get("containerStatuses") or ()),
    ]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in WAITING_FOR_VOLUMES:
            return True
    return False


def waiting_for_volumes(pods: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any of `pods` is scheduled and waits for its volumes: only then are attach
    events worth a request."""
    return any(_waits_for_volumes(pod) for pod in pods)


def attach_failure(pods: Sequence[Mapping[str, Any]], events: Sequence[PodEvent]) -> str | None:
    """`pod <name>: <the attach controller's message>` for the first of `pods` that waits
    for its volumes with a `FailedAttachVolume` event (its newest); None if none does. An
    event about a pod that has its volume since (it outlives it by an hour) says nothing."""
    for pod in pods:
        if not _waits_for_volumes(pod):
            continue
        uid = (pod.get("metadata") or {}).get("uid")
        about = [e for e in events if e.pod_uid == uid and e.reason == ATTACH_EVENT_REASON]
        if about:
            newest = max(about, key=lambda e: e.last_seen)
            text = f"pod {newest.pod_name}: {newest.message or newest.reason}"
            return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
    return None


def run_with_attach_failure(run: RunStatus, failure: str | None, what: str) -> RunStatus:
    """A run whose pods are only starting, told why they do not start (`what`: "training",
    "export"); any other state says more than the attach failure."""
    if failure is None or run.state is not RunState.PENDING or run.reason != "Pending":
        return run
    message = f"{what} pods wait for a volume attached to another node: {failure}"
    return dataclasses.replace(run, reason=REASON, message=message)


def serving_with_attach_failure(cond: Cond, failure: str | None) -> Cond:
    """The Serving condition with a server pod's attach failure: while older pods still
    serve, said after what they serve (the rollout is what waits); else as the reason."""
    if failure is None or cond.type is not ConditionType.SERVING:
        return cond
    if cond.status == "True":
        return dataclasses.replace(cond, message=f"{cond.message}; a new pod waits: {failure}")
    if cond.reason == "Disabled":
        return cond
    message = f"inference pods wait for a volume attached to another node: {failure}"
    return Cond(ConditionType.SERVING, "False", REASON, message)
