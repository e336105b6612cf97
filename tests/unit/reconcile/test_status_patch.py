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
