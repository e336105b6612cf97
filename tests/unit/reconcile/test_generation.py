"""The training generation survives its children (issue 28, item 2).

It is recorded in `status.training` when training for it starts and read back from there: an
invalid edit leaves the running generation alone and reverting it goes on under the same
generation; a deleted trainer Job comes back under its own generation; edits that do not change
the trained model never start a new one. Each pass's status patch is applied as the API server
applies it (RFC 7386), over several passes and spec generations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.status import TrainingStatus
from kubetune.reconcile.children import training_generation
from kubetune.reconcile.decide import ChildRef, Outcome
from tests.unit.operator_fixtures import (
    applied,
    as_observed,
    body,
    condition,
    deployment_status,
    job_status,
    merge_patched,
    observe,
    pod,
    spec_dict,
)

REPORT = {"status": "Succeeded", "steps": 20, "trainLoss": 1.2, "evalLoss": 1.1}
MISSING_CLAIM = 'PersistentVolumeClaim "missing"'


@dataclass
class World:
    """A FineTuneJob across passes: the status as the API server holds it after each pass's
    patch, and the children as the indexes hold them."""

    status: dict[str, Any] = field(default_factory=dict)
    children: list[dict[str, Any]] = field(default_factory=list)

    def reconcile(
        self, spec: dict[str, Any], generation: int, missing: list[str] | None = None
    ) -> Outcome:
        outcome = observe(
            body(spec, generation=generation, status=self.status), self.children,
            missing=missing,
        )  # fmt: skip
        self.status = dict(merge_patched(self.status, outcome.status_patch))
        for ref in outcome.delete:
            self.delete(ref.kind, ref.name)
        return outcome

    def store(self, manifest: dict[str, Any], status: dict[str, Any] | None = None) -> None:
        """The API server stored `manifest` (replacing the child of that name)."""
        self.delete(manifest["kind"], manifest["metadata"]["name"])
        self.children.append(as_observed(manifest, status))

    def delete(self, kind: str, name: str) -> None:
        self.children = [
            c for c in self.children
            if (c["kind"], c["metadata"]["name"]) != (kind, name)
            and not (kind == "Job" and c["kind"] == "Pod"
                     and c["metadata"]["labels"].get("batch.kubernetes.io/job-name") == name)
        ]  # fmt: skip


def _job_names(outcome: Outcome) -> list[str]:
    return [j["metadata"]["name"] for j in applied(outcome, "Job")]


def _training_world(spec: dict[str, Any]) -> World:
    """Generation 1 of `spec` training: its Job stored and its pod running."""
    world = World()
    first = world.reconcile(spec, 1)
    for manifest in first.apply:
        world.store(manifest, job_status(active=1) if manifest["kind"] == "Job" else None)
    world.children.append(pod("demo-g1-train", "Running"))
    world.reconcile(spec, 1)
    assert world.status["training"]["generation"] == 1
    return world


def _missing_dataset(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "dataset": {"source": "pvc://missing/train.jsonl"}}


def test_an_invalid_edit_leaves_the_running_generation_alone_and_says_so() -> None:
    spec = spec_dict()
    world = _training_world(spec)
    recorded = world.status["training"]

    invalid = world.reconcile(_missing_dataset(spec), 2, missing=[MISSING_CLAIM])

    assert invalid.delete == []
    assert invalid.apply == []
    validated = condition(world.status, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "MissingReference")
    assert MISSING_CLAIM in validated["message"]
    assert "the spec is invalid" in validated["message"]
    assert "generation 1 keeps running" in validated["message"]
    assert condition(world.status, "Trained")["reason"] == "Running"
    assert world.status["training"] == recorded
    assert world.status["phase"] == "Invalid"


def test_reverting_an_invalid_edit_goes_on_with_the_same_generation() -> None:
    spec = spec_dict()
    world = _training_world(spec)
    world.reconcile(_missing_dataset(spec), 2, missing=[MISSING_CLAIM])

    reverted = world.reconcile(spec, 3)

    assert reverted.delete == []
    assert _job_names(reverted) == ["demo-g1-train"]
    [config_map] = applied(reverted, "ConfigMap")
    assert config_map["metadata"]["name"] == "demo-g1-config"
    assert world.status["training"]["generation"] == 1
    assert condition(world.status, "Validated")["status"] == "True"
    assert condition(world.status, "Trained")["reason"] == "Running"


def test_an_invalid_edit_leaves_an_export_and_the_deployment_alone() -> None:
    spec = spec_dict()
    world = _training_world(spec)
    world.store(applied(world.reconcile(spec, 1), "Job")[0], job_status("Complete", succeeded=1))
    world.children.append(pod("demo-g1-train", "Succeeded", message=json.dumps(REPORT)))
    export = next(j for j in applied(world.reconcile(spec, 1), "Job") if "export" in
                  j["metadata"]["name"])  # fmt: skip
    world.store(export, job_status("Complete", succeeded=1))
    deployment = applied(world.reconcile(spec, 1), "Deployment")[0]
    world.store(deployment, deployment_status())
    world.reconcile(spec, 1)
    assert condition(world.status, "Ready")["status"] == "True"
    # generation 2 trains; its export is under way when the edit is made
    edited = spec_dict(training={"epochs": 1})
    world.reconcile(edited, 2)
    for manifest in applied(world.reconcile(edited, 2), "Job"):
        world.store(manifest, job_status("Complete", succeeded=1))
    world.children.append(pod("demo-g2-train", "Succeeded", message=json.dumps(REPORT),
                              generation=2))  # fmt: skip
    g2_export = next(j for j in applied(world.reconcile(edited, 2), "Job") if "export" in
                     j["metadata"]["name"])  # fmt: skip
    world.store(g2_export, job_status(active=1))
    world.children.append(pod("demo-g2-export", "Running", generation=2))
    world.reconcile(edited, 2)
    assert condition(world.status, "Exported")["reason"] == "Running"

    # the invalid edit also turns serving off: nothing is deleted all the same
    invalid_spec = {**_missing_dataset(edited), "serving": {"enabled": False}}
    invalid = world.reconcile(invalid_spec, 3, missing=[MISSING_CLAIM])

    assert invalid.delete == [] and invalid.apply == []
    assert "generation 2 keeps running" in condition(world.status, "Validated")["message"]
    assert condition(world.status, "Exported")["reason"] == "Running"
    assert condition(world.status, "Serving")["status"] == "True"
    assert world.status["serving"]["modelGeneration"] == 1
    assert world.status["training"]["generation"] == 2
    reverted = world.reconcile(edited, 4)
    assert reverted.delete == []
    assert {"demo-g2-train", "demo-g2-export"} <= set(_job_names(reverted))


def test_a_deleted_trainer_job_comes_back_under_its_own_generation() -> None:
    spec = spec_dict()
    world = _training_world(spec)
    serving_edit = spec_dict(serving={"replicas": 2})
    world.reconcile(serving_edit, 2)
    world.delete("Job", "demo-g1-train")

    again = world.reconcile(serving_edit, 2)

    assert _job_names(again) == ["demo-g1-train"]
    job = applied(again, "Job")[0]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any("demo/gen-1" in arg for arg in args)  # its run directory, and checkpoints
    assert again.delete == []
    assert world.status["training"]["generation"] == 1


def test_a_deleted_finished_job_after_serving_only_edits_does_not_start_a_new_generation() -> None:
    spec = spec_dict()
    world = _training_world(spec)
    world.store(applied(world.reconcile(spec, 1), "Job")[0], job_status("Complete", succeeded=1))
    world.children.append(pod("demo-g1-train", "Succeeded", message=json.dumps(REPORT)))
    world.reconcile(spec, 1)
    assert world.status["evaluation"]["generation"] == 1
    for generation, replicas in ((2, 2), (3, 3)):
        world.reconcile(spec_dict(serving={"replicas": replicas}), generation)
    world.delete("Job", "demo-g1-train")  # and its pods, by the garbage collector

    again = world.reconcile(spec_dict(serving={"replicas": 3}), 3)

    assert _job_names(again) == ["demo-g1-train"]
    assert world.status["training"]["generation"] == 1
    assert not any("g3" in name for name in _job_names(again))


def test_a_training_edit_records_the_new_generation_and_its_job_comes_back_under_it() -> None:
    world = _training_world(spec_dict())
    edited = spec_dict(training={"learningRate": "1e-3"})

    started = world.reconcile(edited, 2)

    assert _job_names(started) == ["demo-g2-train"]
    assert ChildRef("batch/v1", "Job", "demo-g1-train") in started.delete
    assert world.status["training"]["generation"] == 2
    world.store(applied(started, "Job")[0], job_status(active=1))
    world.reconcile({**edited, "serving": {"replicas": 2}}, 3)
    world.delete("Job", "demo-g2-train")
    again = world.reconcile({**edited, "serving": {"replicas": 2}}, 3)
    assert _job_names(again) == ["demo-g2-train"]
    assert world.status["training"]["generation"] == 2


def test_an_invalid_first_spec_records_no_generation() -> None:
    world = World()
    outcome = world.reconcile(_missing_dataset(spec_dict()), 1, missing=[MISSING_CLAIM])
    assert outcome.apply == []
    assert "training" not in world.status
    assert "keeps running" not in condition(world.status, "Validated")["message"]
    world.reconcile(spec_dict(), 2)
    assert world.status["training"]["generation"] == 2


# The pure decision, case by case.

HASHES = ("h-now", "h-legacy")


def _trainer(generation: int, training_hash: str) -> dict[str, Any]:
    return {
        "kind": "Job",
        "metadata": {
            "name": f"demo-g{generation}-train",
            "labels": {"app.kubernetes.io/component": "trainer", "kubetune.io/job": "demo",
                       "kubetune.io/generation": str(generation)},
            "annotations": {"kubetune.io/training-hash": training_hash},
        },
    }  # fmt: skip


def _record(generation: int, training_hash: str = "h-now") -> TrainingStatus:
    return TrainingStatus(generation=generation, training_hash=training_hash)


def test_the_record_decides_when_its_jobs_are_gone() -> None:
    assert training_generation(_record(2), [], HASHES, 5, spec_valid=True) == 2


def test_an_invalid_spec_keeps_the_recorded_generation_whatever_it_trains() -> None:
    assert training_generation(_record(2, "h-old"), [], HASHES, 5, spec_valid=False) == 2
    running = [_trainer(1, "h-old")]
    assert training_generation(None, running, HASHES, 5, spec_valid=False) == 1


def test_a_changed_training_hash_starts_the_specs_generation() -> None:
    assert training_generation(_record(2, "h-old"), [], HASHES, 5, spec_valid=True) == 5


def test_a_matching_job_newer_than_the_record_is_the_one_whose_status_was_not_written() -> None:
    children = [_trainer(2, "h-old"), _trainer(4, "h-now")]
    assert training_generation(_record(2, "h-old"), children, HASHES, 5, spec_valid=True) == 4
    older = [_trainer(1, "h-now")]
    assert training_generation(_record(2, "h-old"), older, HASHES, 5, spec_valid=True) == 5


def test_a_new_generation_is_never_below_the_recorded_one() -> None:
    # a status restored beside a spec whose generation started again from 1
    assert training_generation(_record(7, "h-old"), [], HASHES, 1, spec_valid=True) == 8


def test_without_a_record_the_jobs_tell_as_before() -> None:
    assert training_generation(None, [_trainer(3, "h-legacy")], HASHES, 5, spec_valid=True) == 3
    assert training_generation(None, [_trainer(3, "h-old")], HASHES, 5, spec_valid=True) == 5
