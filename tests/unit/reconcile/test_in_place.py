"""Edits that do not change the trained model apply to the running generation (issue 13,
finding 12): no new Job, no deletion; the run ConfigMap carries them to the trainer."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders import naming
from kubetune.builders.meta import legacy_training_hash
from kubetune.reconcile.decide import ChildRef
from tests.unit.operator_fixtures import (
    applied,
    as_observed,
    body,
    job_status,
    observe,
    pod,
    spec_dict,
)


def _running() -> list[dict[str, Any]]:
    first = observe(body())
    job = as_observed(applied(first, "Job")[0], job_status(active=1))
    return [job, pod("demo-g1-train", "Running")]


def _run_config(outcome: Any) -> dict[str, Any]:
    [config_map] = applied(outcome, "ConfigMap")
    assert config_map["metadata"]["name"] == "demo-g1-config"
    return dict(json.loads(config_map["data"][naming.RUN_CONFIG_KEY]))


def test_log_cadence_and_checkpoint_keep_reach_the_running_generations_config() -> None:
    edited = body(
        spec_dict(training={"logEverySteps": 1}, checkpoint={"keep": 7}), generation=2
    )
    outcome = observe(edited, _running())
    assert outcome.delete == []
    assert [j["metadata"]["name"] for j in applied(outcome, "Job")] == ["demo-g1-train"]
    run = _run_config(outcome)
    assert run["spec"]["training"]["logEverySteps"] == 1
    assert run["spec"]["checkpoint"]["keep"] == 7


def test_a_learning_rate_edit_starts_a_new_generation() -> None:
    edited = body(spec_dict(training={"learningRate": "1e-3"}), generation=2)
    outcome = observe(edited, _running())
    assert ChildRef("batch/v1", "Job", "demo-g1-train") in outcome.delete
    assert [j["metadata"]["name"] for j in applied(outcome, "Job")] == ["demo-g2-train"]


def test_a_job_an_older_operator_labelled_keeps_its_generation() -> None:
    children = _running()
    spec = FineTuneJobSpec.model_validate(spec_dict())
    children[0]["metadata"]["annotations"][naming.ANNOTATION_TRAINING_HASH] = (
        legacy_training_hash(spec)
    )
    outcome = observe(body(generation=3), children)
    assert outcome.delete == []
    assert [j["metadata"]["name"] for j in applied(outcome, "Job")] == ["demo-g1-train"]
