"""The API models refuse what the API server refuses, naming the same field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import FineTuneJob, ManifestError, load_manifest, parse_finetunejob
from kubetune.api.codegen.crd import build_crd
from kubetune.api.spec import FineTuneJobSpec, Method
from tests.cases.manifests import INVALID_CASES, InvalidCase, base_manifest

EXAMPLES = sorted(Path(__file__).parents[3].joinpath("examples").glob("*.yaml"))


def _constrained_paths(node: dict[str, Any], path: str, kind: str) -> list[str]:
    """Field paths under `node` (a CRD schema) that carry `kind` (`enum`, CEL rules)."""
    found = [path] if kind in node else []
    for key, child in (node.get("properties") or {}).items():
        found += _constrained_paths(child, f"{path}.{key}", kind)
    if "items" in node:
        found += _constrained_paths(node["items"], f"{path}[]", kind)
    return found


def _case_path(case: InvalidCase) -> str:
    return re.sub(r"\[\d+\]", "[]", case.field)


def test_every_enum_and_cel_rule_of_the_crd_has_an_invalid_case() -> None:
    """The table is checked offline and at `kubectl apply`; a case removed, or a rule added
    without one, leaves a refusal untested on both sides."""
    crd = build_crd()
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    fields = [_case_path(case) for case in INVALID_CASES]
    enums = _constrained_paths(spec, "spec", "enum")
    assert [path for path in enums if path not in fields] == []
    rules = _constrained_paths(spec, "spec", "x-kubernetes-validations")
    untested = [p for p in rules if not any(f == p or f.startswith(f"{p}.") for f in fields)]
    assert untested == []
    assert len({case.id for case in INVALID_CASES}) == len(INVALID_CASES)


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda case: case.id)
def test_invalid_manifest_is_refused_naming_the_field(case: InvalidCase) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_finetunejob(case.manifest(), source=case.id)
    named = [problem for problem in caught.value.problems if problem.startswith(case.field)]
    assert named, f"no problem names {case.field}: {caught.value.problems}"


def test_base_manifest_is_valid_and_defaults_apply() -> None:
    job = parse_finetunejob(base_manifest())
    assert job.spec.method is Method.LORA
    assert job.spec.training.batch_size == "Auto"
    assert job.spec.training.learning_rate == "2e-4"
    assert job.spec.resources.gpu_memory_gib == 80
    assert job.spec.lora is None and job.spec.lora_or_default.rank == 16


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_examples_are_valid(path: Path) -> None:
    assert isinstance(load_manifest(path), FineTuneJob)


def test_examples_cover_every_method_and_multi_node() -> None:
    jobs = [load_manifest(path) for path in EXAMPLES]
    assert {job.spec.method for job in jobs} == set(Method)
    assert any(job.spec.resources.nodes > 1 for job in jobs)


def test_wire_form_round_trips_in_camel_case() -> None:
    spec = FineTuneJobSpec.model_validate(base_manifest()["spec"] | {"training": {"maxSteps": 5}})
    wire = spec.to_wire()
    assert wire["training"]["maxSteps"] == 5
    assert "max_steps" not in wire["training"]
    assert FineTuneJobSpec.model_validate(wire) == spec


def test_int_or_string_fields_accept_both_forms() -> None:
    for value in (1, 64, "Auto"):
        manifest = base_manifest()
        manifest["spec"]["training"] = {"batchSize": value}
        manifest["spec"]["deepspeed"] = {"zeroStage": 3 if value != "Auto" else "Auto"}
        assert parse_finetunejob(manifest).spec.training.batch_size == value


def test_yaml_errors_and_document_count_are_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("kind: ConfigMap\n")
    with pytest.raises(ManifestError, match="expected one FineTuneJob document, found 0"):
        load_manifest(empty)
