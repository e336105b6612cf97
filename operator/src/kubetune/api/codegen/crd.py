"""Generate the FineTuneJob CRD from the pydantic models (`kubetune crd`).

Pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a *structural* OpenAPI v3
schema: every `$ref` inlined, `nullable` instead of `anyOf [X, null]`, no `title`, no
`additionalProperties` beside `properties`, boolean `exclusiveMinimum`. The cross-field rules
of each model become `x-kubernetes-validations` on that model's schema.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from kubetune.api import resource
from kubetune.api.rules import ApiModel
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus

Schema = dict[str, Any]

_DROP_KEYS = {"title", "additionalProperties", "$defs", "discriminator"}


def _rules_by_title() -> dict[str, list[dict[str, str]]]:
    """CEL rules of every API model, keyed by the model's schema title (its class name)."""
    rules: dict[str, list[dict[str, str]]] = {}
    pending: list[type[ApiModel]] = [ApiModel]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.rules:
            rules[cls.__name__] = [rule.to_crd() for rule in cls.rules]
    return rules


def _int_or_string(node: Schema) -> Schema:
    """`int | Literal["Auto"]` becomes the Kubernetes int-or-string type with a CEL check."""
    integer = next(option for option in node["anyOf"] if option.get("type") == "integer")
    words = [option["const"] for option in node["anyOf"] if "const" in option]
    low, high = integer.get("minimum"), integer.get("maximum")
    bounds = [f"self >= {low}" if low is not None else "", f"self <= {high}" if high else ""]
    int_check = " && ".join(bound for bound in bounds if bound) or "true"
    word_check = " || ".join(f"self == '{word}'" for word in words)
    allowed = f"{' or '.join(words)} or an integer" + (
        f" from {low} to {high}" if low is not None and high is not None else ""
    )
    out: Schema = {
        "x-kubernetes-int-or-string": True,
        "x-kubernetes-validations": [
            {
                "rule": f"type(self) == int ? ({int_check}) : ({word_check})",
                "message": f"must be {allowed}",
            }
        ],
    }
    if "description" in node:
        out["description"] = " ".join(node["description"].split())
    if "default" in node:
        out["default"] = node["default"]
    return out


class _Converter:
    def __init__(self, root: Schema) -> None:
        self.defs: dict[str, Schema] = root.get("$defs", {})
        self.rules = _rules_by_title()

    def convert(self, node: Schema) -> Schema:
        if "$ref" in node:
            target = self.defs[node["$ref"].split("/")[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return self.convert(merged)
        if node.get("x-kubernetes-int-or-string"):
            return _int_or_string(node)
        if "anyOf" in node:
            return self._any_of(node)
        out: Schema = {}
        title = node.get("title")
        for key, value in node.items():
            if key in _DROP_KEYS:
                continue
            if key == "properties":
                out[key] = {name: self.convert(prop) for name, prop in value.items()}
            elif key == "items":
                out[key] = self.convert(value)
            elif key == "const":
                out["enum"] = [value]
                out.setdefault("type", "string")
            elif key == "exclusiveMinimum":
                out["minimum"], out["exclusiveMinimum"] = value, True
            elif key == "exclusiveMaximum":
                out["maximum"], out["exclusiveMaximum"] = value, True
            elif key == "default" and not _is_scalar_default(value):
                continue
            elif key == "description":
                out[key] = " ".join(value.split())  # docstrings wrap; the CRD wants one line
            elif key == "propertyNames":
                out.setdefault("x-kubernetes-validations", []).append(self._key_rule(value))
            else:
                out[key] = value
        if node.get("type") == "object" and "properties" not in node:
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                out["additionalProperties"] = self.convert(extra)
        if node.get("type") == "object" and title in self.rules and "properties" in node:
            out["x-kubernetes-validations"] = self.rules[title]
        return out

    def _key_rule(self, names: Schema) -> dict[str, str]:
        """A map keyed by an enum (`dict[Metric, ...]`): a structural schema has no
        `propertyNames`, so the keys are checked by a CEL rule on the map."""
        if "$ref" in names:
            names = self.defs[names["$ref"].split("/")[-1]]
        allowed = names.get("enum")
        if not allowed:
            raise ValueError(f"cannot express propertyNames {names} in a structural schema")
        listed = ", ".join(f"'{name}'" for name in allowed)
        return {"rule": f"self.all(key, key in [{listed}])",
                "message": f"keys must be one of {', '.join(allowed)}"}

    def _any_of(self, node: Schema) -> Schema:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {node['anyOf']} in a structural schema")
        merged = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        if merged.get("default", "absent") is None:
            del merged["default"]
        return self.convert(merged)


def _is_scalar_default(value: Any) -> bool:
    if isinstance(value, (str, int, bool)):
        return True
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def structural_schema(model: type[ApiModel]) -> Schema:
    """The model's JSON schema converted to a Kubernetes structural schema."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _Converter(raw).convert(raw)


KIND_DESCRIPTION = (
    "A FineTuneJob fine-tunes a language model (LoRA, QLoRA, DoRA or full), exports it to "
    "ONNX and serves it behind an OpenAI-compatible API."
)

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent",
     "description": "Percent of training steps done"},
    {"name": "Loss", "type": "string", "jsonPath": ".status.progress.trainLoss"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.serving.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "priority": 1},
]


def build_crd() -> Schema:
    """The CustomResourceDefinition as a dict."""
    spec_schema = structural_schema(FineTuneJobSpec)
    status_schema = structural_schema(FineTuneJobStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{resource.PLURAL}.{resource.GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune"},
        },
        "spec": {
            "group": resource.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.KIND,
                "listKind": f"{resource.KIND}List",
                "plural": resource.PLURAL,
                "singular": resource.SINGULAR,
                "shortNames": resource.SHORT_NAMES,
                "categories": resource.CATEGORIES,
            },
            "versions": [
                {
                    "name": resource.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": KIND_DESCRIPTION,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Quotes strings that YAML 1.2 parsers (Go's, kubectl's) would read as numbers.

    PyYAML follows YAML 1.1, where `2e-4` is a string and is written unquoted; the API server
    reads it back as a number and refuses a string field's default.
    """


_NUMBER_LIKE = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "'" if _NUMBER_LIKE.match(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(document: Any) -> str:
    """YAML that Go's parser reads back with the same types."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


HEADER = "# Generated by `kubetune crd` from the pydantic models. Do not edit.\n"


def render_crd() -> str:
    """The CRD as the YAML text committed under crds/ and charts/kubetune/crds/."""
    return HEADER + dump_yaml(build_crd())
