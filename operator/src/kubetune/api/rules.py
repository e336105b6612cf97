"""Cross-field rules written once and enforced twice.

Each rule carries a CEL expression (emitted into the CRD as `x-kubernetes-validations`, so the
API server refuses a bad manifest at `kubectl apply`) and the same check in Python (so
`kubetune run` refuses the same manifest with the same message without a cluster). A unit test
evaluates both on the same inputs, and the e2e tests prove the CEL side against a real API
server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """One rule: `cel` must hold for `self` (this object), `check` is its Python twin."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None
    """JSON path below this object that the error names, e.g. `.source`."""

    def to_crd(self) -> dict[str, str]:
        rule = {"rule": self.cel, "message": self.message}
        if self.field_path:
            rule["fieldPath"] = self.field_path
        return rule


class RuleViolation(ValueError):
    """A broken rule; carries the field path below the object so errors can name the field."""

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule.message)
        self.rule = rule


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields refused, docstrings kept."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=False,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in type(self).rules:
            if not rule.check(self):
                raise RuleViolation(rule)
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest: camelCase, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
