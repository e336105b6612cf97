"""The CRD is generated from the models, structural, and committed copies are current."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.codegen.crd import build_crd, render_crd

ROOT = Path(__file__).parents[3]
COMMITTED = [
    ROOT / "crds" / "kubetune.io_finetunejobs.yaml",
    ROOT / "charts" / "kubetune" / "crds" / "kubetune.io_finetunejobs.yaml",
]
FORBIDDEN = {"$ref", "anyOf", "oneOf", "allOf", "not", "$defs", "title", "const"}


@pytest.mark.parametrize("path", COMMITTED, ids=lambda path: str(path.relative_to(ROOT)))
def test_committed_crd_is_current(path: Path) -> None:
    assert path.is_file(), f"{path} is missing: run `make crd`"
    assert path.read_text() == render_crd(), f"{path} is stale: run `make crd`"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return []
    found = [(path, node)]
    for key, value in node.get("properties", {}).items():
        found += _walk(value, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural() -> None:
    for path, node in _walk(schema()):
        assert not FORBIDDEN & node.keys(), f"{path} has {FORBIDDEN & node.keys()}"
        assert not ("properties" in node and "additionalProperties" in node), path
        int_or_string = node.get("x-kubernetes-int-or-string")
        assert int_or_string or "type" in node, f"{path} has no type"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True, path


def test_every_spec_field_is_described() -> None:
    spec = schema()["properties"]["spec"]
    missing = [path for path, node in _walk(spec) if path and "description" not in node
               and not path.endswith("[]") and not path.endswith("}")]
    assert not missing, f"fields without a docstring: {missing}"


def test_names_columns_and_subresources() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["kubetune"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [column["name"] for column in version["additionalPrinterColumns"]]
    assert columns[:5] == ["Phase", "Progress", "Loss", "Endpoint", "Age"]


def test_cross_field_rules_are_in_the_schema() -> None:
    rules = [
        rule["rule"]
        for _, node in _walk(schema())
        for rule in node.get("x-kubernetes-validations", [])
    ]
    assert any("self.method != 'Full'" in rule for rule in rules)
    assert any("offload" in rule for rule in rules)
    assert any("splitPercent" in rule for rule in rules)
    assert all(rule.count("(") == rule.count(")") for rule in rules)


def test_rendered_yaml_parses_back() -> None:
    text = render_crd()
    assert yaml.safe_load(text) == build_crd()
