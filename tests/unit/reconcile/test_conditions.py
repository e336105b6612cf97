"""Conditions: transition times, events on transitions, the phase summary."""

from __future__ import annotations

from kubetune.api import ConditionType, Phase
from kubetune.reconcile.conditions import Cond, merge, phase, transitions

T = ConditionType


def _all(**overrides: Cond) -> dict[ConditionType, Cond]:
    conds = {
        T.VALIDATED: Cond(T.VALIDATED, "True", "Valid"),
        T.TRAINED: Cond(T.TRAINED, "Unknown", "Running"),
        T.EXPORTED: Cond(T.EXPORTED, "Unknown", "WaitingForTraining"),
        T.SERVING: Cond(T.SERVING, "Unknown", "NoModel"),
        T.READY: Cond(T.READY, "False", "Training"),
    }
    for cond in overrides.values():
        conds[cond.type] = cond
    return conds


def test_transition_time_moves_only_when_status_changes() -> None:
    first = merge(None, [Cond(T.TRAINED, "Unknown", "Pending")], 1, "t1")
    assert first[0]["lastTransitionTime"] == "t1"
    same_status = merge(first, [Cond(T.TRAINED, "Unknown", "Running", "1/1 pods")], 2, "t2")
    assert same_status[0]["lastTransitionTime"] == "t1"
    assert same_status[0]["reason"] == "Running"
    assert same_status[0]["observedGeneration"] == 2
    changed = merge(same_status, [Cond(T.TRAINED, "True", "Succeeded")], 2, "t3")
    assert changed[0]["lastTransitionTime"] == "t3"


def test_conditions_are_kept_in_a_fixed_order() -> None:
    merged = merge(None, reversed(list(_all().values())), 1, "t")
    assert [c["type"] for c in merged] == ["Validated", "Trained", "Exported", "Serving", "Ready"]


def test_events_only_for_settled_transitions() -> None:
    before = merge(None, _all().values(), 1, "t1")
    assert [e.reason for e in transitions(None, before)] == ["Valid"]
    after = merge(
        before, _all(t=Cond(T.TRAINED, "False", "ConfigurationError", "bad")).values(), 1, "t2"
    )
    events = transitions(before, after)
    assert [(e.type, e.reason) for e in events] == [("Warning", "ConfigurationError")]
    assert "bad" in events[0].message
    assert transitions(after, after) == []


def test_phase_summary() -> None:
    assert phase(_all()) is Phase.TRAINING
    assert phase(_all(t=Cond(T.TRAINED, "Unknown", "Suspended"))) is Phase.SUSPENDED
    assert phase(_all(v=Cond(T.VALIDATED, "False", "MissingReference"))) is Phase.INVALID
    assert phase(_all(t=Cond(T.TRAINED, "False", "BackoffLimitExceeded"))) is Phase.FAILED
    trained = Cond(T.TRAINED, "True", "Succeeded")
    assert phase(_all(t=trained)) is Phase.EXPORTING
    exported = Cond(T.EXPORTED, "True", "Succeeded")
    assert phase(_all(t=trained, e=exported)) is Phase.DEPLOYING
    gate = Cond(T.READY, "False", "GateFailed")
    assert phase(_all(t=trained, e=exported, r=gate)) is Phase.FAILED
    ready = Cond(T.READY, "True", "Serving")
    assert phase(_all(t=trained, e=exported, r=ready)) is Phase.SUCCEEDED
