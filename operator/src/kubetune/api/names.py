"""Kubernetes' rules for names that the spec hands on to child objects.

A value the FineTuneJob accepts but the API server refuses in a Pod or Job (a nodeSelector key
that is not a label key, a GPU resource that is not an extended resource name, a `pvc://` URI
without a claim name) leaves the job waiting forever, so these are refused at admission, exactly
as Kubernetes refuses them (k8s.io/apimachinery/pkg/util/validation; tests/unit/api/test_names.py
compares them with a port of that code).

Each rule is a few regexes that must each match the whole value, plus prefixes and substrings it
must not have: RE2 (CEL's regexes) has no lookaround, so lengths and exclusions are separate
checks. The same regexes are evaluated by Python (`holds`) and emitted as CEL (`cel`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DNS1123_LABEL_PATTERN = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN_PATTERN = f"{DNS1123_LABEL_PATTERN}([.]{DNS1123_LABEL_PATTERN})*"
DNS1123_SUBDOMAIN_MAX = 253
NAME_PART_PATTERN = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
"""The name part of a qualified name (`MyName`, `my.name`, `123-abc`), and of a label value."""
NAME_PART_MAX = 63
LABEL_VALUE_PATTERN = f"^({NAME_PART_PATTERN})?$"
"""A label value (an OpenAPI `pattern`, with `maxLength: 63` beside it)."""
LABEL_VALUE_MAX = 63
REQUESTS_PREFIX = "requests."
"""ResourceQuota spells a resource `requests.<name>`; the name must stay a qualified name."""


@dataclass(frozen=True)
class NameRule:
    """A value is valid when every pattern matches all of it and it has none of the forbidden
    prefixes and substrings."""

    patterns: tuple[str, ...]
    forbidden_prefixes: tuple[str, ...] = ()
    forbidden_substrings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The patterns go into a CEL string literal as written.
        texts = self.patterns + self.forbidden_prefixes + self.forbidden_substrings
        if any("\\" in text or "'" in text for text in texts):
            raise ValueError("NameRule texts must not need escaping in a CEL string literal")

    def holds(self, value: str) -> bool:
        return (
            all(re.fullmatch(pattern, value) for pattern in self.patterns)
            and not any(value.startswith(prefix) for prefix in self.forbidden_prefixes)
            and not any(text in value for text in self.forbidden_substrings)
        )

    def cel(self, expr: str) -> str:
        """The rule as a CEL expression on the string `expr`."""
        checks = [f"{expr}.matches('^{pattern}$')" for pattern in self.patterns]
        checks += [f"!{expr}.startsWith('{prefix}')" for prefix in self.forbidden_prefixes]
        checks += [f"!{expr}.contains('{text}')" for text in self.forbidden_substrings]
        return "(" + " && ".join(checks) + ")"


DNS1123_SUBDOMAIN = NameRule(
    (DNS1123_SUBDOMAIN_PATTERN, f"[^/]{{1,{DNS1123_SUBDOMAIN_MAX}}}"),
)
"""Names of most objects (a PersistentVolumeClaim's included): lowercase, at most 253."""

SECRET_KEY = NameRule(
    ("[-._a-zA-Z0-9]{1,253}", "([^.]|[.].).*"),  # the second: not `.` alone
    forbidden_prefixes=("..",),
)
"""A key of a Secret's (or ConfigMap's) data: at most 253 letters, digits, `-`, `_` and `.`,
neither `.` nor starting with `..` (IsConfigMapKey)."""

QUALIFIED_NAME = NameRule(
    (
        f"({DNS1123_SUBDOMAIN_PATTERN}/)?{NAME_PART_PATTERN}",
        f"([^/]{{1,{DNS1123_SUBDOMAIN_MAX}}}/)?[^/]{{1,{NAME_PART_MAX}}}",
    ),
)
"""Label keys and taint keys: an optional DNS-subdomain prefix and `/`, then a name part of at
most 63 letters, digits, `-`, `_` and `.` (IsQualifiedName)."""
QUALIFIED_NAME_MAX = DNS1123_SUBDOMAIN_MAX + 1 + NAME_PART_MAX

LABEL_VALUE = NameRule((f"({NAME_PART_PATTERN})?", f"[^/]{{0,{LABEL_VALUE_MAX}}}"))
"""Label values and taint values: empty, or at most 63 letters, digits, `-`, `_` and `.`,
starting and ending with a letter or digit (IsValidLabelValue)."""

EXTENDED_RESOURCE_NAME = NameRule(
    (
        f"{DNS1123_SUBDOMAIN_PATTERN}/{NAME_PART_PATTERN}",
        # `requests.<prefix>` must fit a DNS subdomain too.
        f"[^/]{{1,{DNS1123_SUBDOMAIN_MAX - len(REQUESTS_PREFIX)}}}/[^/]{{1,{NAME_PART_MAX}}}",
    ),
    forbidden_prefixes=(REQUESTS_PREFIX,),
    # Names in (a subdomain of) kubernetes.io are native resources, not extended ones.
    forbidden_substrings=("kubernetes.io/",),
)
"""A resource such as `nvidia.com/gpu` that a container may request (IsExtendedResourceName)."""
EXTENDED_RESOURCE_NAME_MAX = DNS1123_SUBDOMAIN_MAX - len(REQUESTS_PREFIX) + 1 + NAME_PART_MAX
