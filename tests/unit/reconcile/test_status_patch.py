"""reconcile.status.status_patch: the merge patch that makes status exactly what reconcile
decided, applied as the API server applies it (RFC 7386)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kubetune.reconcile.status import status_patch
from tests.unit.operator_fixtures import merge_patched

KEYS = st.sampled_from(["a", "b", "c", "d"])
SCALARS = st.one_of(st.integers(-2, 2), st.text("xy", max_size=2), st.booleans())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=2), st.dictionaries(KEYS, inner, max_size=3)
    ),
    max_leaves=8,
)
STORED = st.dictionaries(KEYS, VALUES, max_size=4)
"""What the API server stores: no nulls in objects (a null removes the key)."""
DESIRED = st.dictionaries(KEYS, st.one_of(st.none(), VALUES), max_size=4)
"""What reconcile decides: None at the top level removes the key."""


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


@given(STORED, DESIRED)
def test_each_decided_key_ends_exactly_as_decided_and_the_rest_stays(
    stored: dict[str, Any], desired: dict[str, Any]
) -> None:
    after = merge_patched(stored, status_patch(stored, desired))
    for key, wanted in desired.items():
        assert after.get(key) == _without_nulls(wanted)
    for key in stored.keys() - desired.keys():
        assert after[key] == stored[key]
    assert status_patch(after, desired) == {}  # the next pass sends nothing


def test_a_nested_key_that_no_longer_applies_is_set_to_null() -> None:
    stored = {"evaluation": {"generation": 1, "accuracy": "0.85", "evalLoss": "1.1"},
              "progress": {"step": 3}}
    desired = {"evaluation": {"generation": 2, "evalLoss": "1.1"}}
    assert status_patch(stored, desired) == {"evaluation": {"generation": 2, "accuracy": None}}


def _server_defaulted(status: dict[str, Any]) -> dict[str, Any]:
    """`status` as the API server reads it back: the CRD's defaults filled in (here the ones
    of `status.evaluation`, which a finished job holds)."""
    evaluation = status.get("evaluation")
    if evaluation is None:
        return status
    return {**status, "evaluation": {"exportMessage": "", "message": "", **evaluation}}


def test_a_key_the_server_defaults_is_not_nulled_on_every_pass() -> None:
    """A finished job whose gate set no message: the API server fills `message: ""` (the
    CRD's default) in. Nulling it was undone on every read, so each resync patched every
    finished job's status again (bench/fleet.py: one write per job every 10 s at rest)."""
    stored = {"evaluation": {"generation": 1, "evalLoss": "1.05", "exportMessage": "",
                             "message": ""}}  # fmt: skip
    desired = {"evaluation": {"generation": 1, "evalLoss": "1.05"}}
    assert status_patch(stored, desired) == {}
    # The gate's message, once there is one, is still written, and a stale one removed.
    assert status_patch(stored, {"evaluation": {**desired["evaluation"], "message": "passed"}}) \
        == {"evaluation": {"message": "passed"}}  # fmt: skip
    stale = {"evaluation": {**stored["evaluation"], "message": "an earlier verdict"}}
    assert status_patch(stale, desired) == {"evaluation": {"message": None}}


@given(st.sampled_from(["", "gate passed"]), st.sampled_from([None, "1.2"]),
       st.sampled_from([1, 2]))  # fmt: skip
def test_the_pass_after_a_patch_sends_nothing_once_the_server_filled_its_defaults(
    message: str, accuracy: str | None, generation: int
) -> None:
    stored = _server_defaulted({"evaluation": {"generation": 1, "message": "old",
                                               "accuracy": "0.5"}})  # fmt: skip
    evaluation: dict[str, Any] = {"generation": generation}
    if message:
        evaluation["message"] = message
    if accuracy is not None:
        evaluation["accuracy"] = accuracy
    desired = {"evaluation": evaluation}
    after = _server_defaulted(merge_patched(stored, status_patch(stored, desired)))
    assert status_patch(after, desired) == {}
