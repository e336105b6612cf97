"""Conditions in the metav1.Condition shape, their transitions, and the phase summary.

Pure: the clock reading comes in as `now`, so an unchanged condition keeps its
lastTransitionTime and an unchanged status compares equal (and is not patched again).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kubetune.api import ConditionType, Phase

Status = Literal["True", "False", "Unknown"]
CONDITION_ORDER = [t.value for t in ConditionType]


@dataclass(frozen=True)
class Cond:
    """A condition before it gets its timestamps."""

    type: ConditionType
    status: Status
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the FineTuneJob."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def by_type(conditions: Iterable[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: dict(c) for c in conditions or () if "type" in c}


def merge(
    previous: Iterable[Mapping[str, Any]] | None,
    current: Iterable[Cond],
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """The new condition list: lastTransitionTime moves only when `status` changes."""
    before = by_type(previous)
    result = []
    for cond in current:
        old = before.get(cond.type.value)
        changed = old is None or old.get("status") != cond.status
        entry: dict[str, Any] = {
            "type": cond.type.value,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": now
            if changed or old is None
            else old.get("lastTransitionTime", now),
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        result.append(entry)
    result.sort(key=lambda c: CONDITION_ORDER.index(c["type"]))
    return result


def _event_type(cond: Mapping[str, Any]) -> Literal["Normal", "Warning"]:
    failed = cond["status"] == "False" and (
        cond["type"] != ConditionType.READY.value or cond["reason"].endswith("Failed")
    )
    return "Warning" if failed else "Normal"


def _worth_an_event(cond: Mapping[str, Any]) -> bool:
    """Conditions settling (True/False) are news; `Unknown` steps and Ready=False while
    work is merely under way are not (they would cost an API request each)."""
    if cond["status"] == "Unknown":
        return False
    if cond["type"] == ConditionType.READY.value and cond["status"] == "False":
        return bool(cond["reason"].endswith("Failed"))
    return True


def transitions(
    previous: Iterable[Mapping[str, Any]] | None, current: Iterable[Mapping[str, Any]]
) -> list[Event]:
    """One Event per condition whose status or reason changed to something worth telling."""
    before = by_type(previous)
    events = []
    for cond in current:
        old = before.get(cond["type"])
        if old is not None and (old.get("status"), old.get("reason")) == (
            cond["status"],
            cond["reason"],
        ):
            continue
        if not _worth_an_event(cond):
            continue
        message = f"{cond['type']}={cond['status']}"
        if cond.get("message"):
            message += f": {cond['message']}"
        events.append(Event(type=_event_type(cond), reason=cond["reason"], message=message))
    return events


def is_true(conditions: Iterable[Mapping[str, Any]] | None, kind: ConditionType) -> bool:
    cond = by_type(conditions).get(kind.value)
    return cond is not None and cond.get("status") == "True"


def phase(conds: Mapping[ConditionType, Cond]) -> Phase:
    """A one-word summary, read from the conditions (the contract) so the two never disagree."""
    validated = conds[ConditionType.VALIDATED]
    trained = conds[ConditionType.TRAINED]
    exported = conds[ConditionType.EXPORTED]
    ready = conds[ConditionType.READY]
    if validated.status == "False":
        return Phase.INVALID
    if ready.status == "True":
        return Phase.SUCCEEDED
    if validated.status != "True":
        return Phase.PENDING
    if trained.status == "False" or (exported.status == "False" and exported.reason != "Disabled"):
        return Phase.FAILED
    if ready.reason == "GateFailed":
        return Phase.FAILED
    if trained.status != "True":
        if trained.reason == "Suspended":
            return Phase.SUSPENDED
        return Phase.TRAINING if trained.reason == "Running" else Phase.PENDING
    if exported.status != "True" and exported.reason != "Disabled":
        return Phase.EXPORTING
    return Phase.DEPLOYING
