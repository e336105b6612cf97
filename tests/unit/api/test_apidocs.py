"""docs/api.md is generated from the API models and must not go stale."""

from __future__ import annotations

from pathlib import Path

import yaml

from kubetune.api import parse_finetunejob
from kubetune.api.codegen.docs import EXAMPLE, models_in_order, render_api_docs
from kubetune.api.spec import FineTuneJobSpec, TrainingSpec

DOCS = Path(__file__).resolve().parents[3] / "docs" / "api.md"


def test_docs_api_md_is_up_to_date() -> None:
    assert DOCS.read_text() == render_api_docs(), (
        "docs/api.md is stale: run `python -m kubetune.api.codegen.docs > docs/api.md`"
    )


def test_every_spec_field_is_documented_with_its_wire_name() -> None:
    text = render_api_docs()
    for model in models_in_order(FineTuneJobSpec):
        assert f"## {model.__name__}" in text
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            assert f"| `{field.alias or name}` |" in text


def test_types_defaults_and_rules_are_rendered() -> None:
    text = render_api_docs()
    assert "| `batchSize` | integer (1-65536) or `Auto` | `Auto` |" in text
    assert "| `method` | one of `LoRA`, `QLoRA`, `DoRA`, `Full` | `LoRA` |" in text
    assert "| `learningRate` | decimal string | `2e-4` |" in text
    assert "| `model` | [ModelSpec](#modelspec) | **required** |" in text
    for rule in TrainingSpec.rules:
        assert f"- {rule.message}" in text


def test_example_is_a_valid_manifest() -> None:
    job = parse_finetunejob(yaml.safe_load(EXAMPLE), "docs example")
    assert job.spec.resources.gpus_per_node == 0
