"""Kubernetes' name rules as the CRD and the models check them, against a port of the API
server's own checks (k8s.io/apimachinery/pkg/util/validation and
k8s.io/kubernetes/pkg/apis/core/v1/helper), on Kubernetes' test values and generated ones.

The models and the CRD evaluate the same regexes (`NameRule.holds` here, `NameRule.cel` on the
API server); tests/e2e/test_crd.py proves the CEL side on a real API server.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune.api.names import (
    DNS1123_SUBDOMAIN,
    EXTENDED_RESOURCE_NAME,
    LABEL_VALUE,
    LABEL_VALUE_PATTERN,
    QUALIFIED_NAME,
    SECRET_KEY,
)
from tests.cases.names import (
    EXTENDED_BAD,
    EXTENDED_GOOD,
    LABEL_VALUES,
    QUALIFIED_BAD,
    QUALIFIED_GOOD,
    SECRET_KEYS_BAD,
    SECRET_KEYS_GOOD,
)

# --- The reference: Kubernetes' Go code, line by line --------------------------------------

_DNS1123_SUBDOMAIN_RE = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_QUALIFIED_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def k8s_is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= 253 and _DNS1123_SUBDOMAIN_RE.fullmatch(value) is not None


def k8s_is_qualified_name(value: str) -> bool:
    """validation.IsQualifiedName: what label keys, taint keys and resource names must be."""
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix or not k8s_is_dns1123_subdomain(prefix):
            return False
    else:
        return False
    return 0 < len(name) <= 63 and _QUALIFIED_NAME_RE.fullmatch(name) is not None


def k8s_is_label_value(value: str) -> bool:
    """validation.IsValidLabelValue."""
    return len(value) <= 63 and (value == "" or _QUALIFIED_NAME_RE.fullmatch(value) is not None)


_CONFIG_MAP_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")


def k8s_is_config_map_key(value: str) -> bool:
    """validation.IsConfigMapKey: what a Secret's or ConfigMap's data keys must be."""
    return (
        len(value) <= 253
        and _CONFIG_MAP_KEY_RE.fullmatch(value) is not None
        and value not in (".", "..")
        and not value.startswith("..")
    )


def k8s_is_extended_resource_name(value: str) -> bool:
    """helper.IsExtendedResourceName: not native (has a `/`, outside `kubernetes.io/`), no
    `requests.` prefix, and `requests.<name>` is a qualified name (for quota)."""
    native = "/" not in value or "kubernetes.io/" in value
    if native or value.startswith("requests."):
        return False
    return k8s_is_qualified_name("requests." + value)


@pytest.mark.parametrize("value", QUALIFIED_GOOD + QUALIFIED_BAD)
def test_qualified_name_matches_kubernetes(value: str) -> None:
    assert QUALIFIED_NAME.holds(value) is k8s_is_qualified_name(value)
    assert k8s_is_qualified_name(value) is (value in QUALIFIED_GOOD)


@pytest.mark.parametrize("value", EXTENDED_GOOD + EXTENDED_BAD)
def test_extended_resource_name_matches_kubernetes(value: str) -> None:
    assert EXTENDED_RESOURCE_NAME.holds(value) is k8s_is_extended_resource_name(value)
    assert k8s_is_extended_resource_name(value) is (value in EXTENDED_GOOD)


@pytest.mark.parametrize("value", LABEL_VALUES)
def test_label_value_pattern_matches_kubernetes(value: str) -> None:
    # The pattern is an OpenAPI `pattern` with `maxLength: 63` beside it.
    ours = len(value) <= 63 and re.fullmatch(LABEL_VALUE_PATTERN.strip("^$"), value) is not None
    assert ours is k8s_is_label_value(value)
    assert LABEL_VALUE.holds(value) is k8s_is_label_value(value)


@pytest.mark.parametrize("value", SECRET_KEYS_GOOD + SECRET_KEYS_BAD)
def test_secret_key_matches_kubernetes(value: str) -> None:
    assert SECRET_KEY.holds(value) is k8s_is_config_map_key(value)
    assert k8s_is_config_map_key(value) is (value in SECRET_KEYS_GOOD)


# Names built from the characters that matter, with lengths around every bound.
_NAME_CHARS = st.sampled_from([*"aZ9-_./", "kubernetes.io/", "requests.", "\n", " "])
_PIECES = st.lists(st.one_of(_NAME_CHARS, st.sampled_from(["a" * 62, "b" * 243, "c" * 252])),
                   max_size=8).map("".join)


@settings(max_examples=3000, deadline=None)
@given(_PIECES)
def test_generated_names_match_kubernetes(value: str) -> None:
    assert QUALIFIED_NAME.holds(value) is k8s_is_qualified_name(value)
    assert EXTENDED_RESOURCE_NAME.holds(value) is k8s_is_extended_resource_name(value)
    assert DNS1123_SUBDOMAIN.holds(value) is k8s_is_dns1123_subdomain(value)
    assert LABEL_VALUE.holds(value) is k8s_is_label_value(value)
    assert SECRET_KEY.holds(value) is k8s_is_config_map_key(value)


def test_cel_is_the_same_regexes_without_escapes() -> None:
    """The CEL string literal holds the regexes as written: no backslash or quote to escape."""
    cel = EXTENDED_RESOURCE_NAME.cel("self.gpuResource")
    for pattern in EXTENDED_RESOURCE_NAME.patterns:
        assert f"self.gpuResource.matches('^{pattern}$')" in cel
    assert "!self.gpuResource.startsWith('requests.')" in cel
    assert "!self.gpuResource.contains('kubernetes.io/')" in cel
