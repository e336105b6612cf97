"""Which spec edits start a new training generation (issue 13, finding 12).

The table is written out by hand, one edit per row, from what each field does to the trained
model: it is not derived from the implementation's own list of fields.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import FineTuneJobSpec
from kubetune.builders import naming
from kubetune.builders.meta import Owner, legacy_training_hash, training_hash
from kubetune.builders.training import training_job
from tests.unit.operator_fixtures import CONFIG, body

BASE: dict[str, Any] = {
    "model": {"source": "hf://acme/tiny", "secretRef": {"name": "hf-token"}},
    "dataset": {"source": "hf://acme/data", "secretRef": {"name": "data-token"}},
    "training": {"learningRate": "2e-4", "logEverySteps": 10},
    "checkpoint": {"everySteps": 200, "keep": 3},
    "storage": {"size": "20Gi"},
}


def _spec(**changes: dict[str, Any] | Any) -> FineTuneJobSpec:
    spec: dict[str, Any] = {key: dict(value) for key, value in BASE.items()}
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    return FineTuneJobSpec.model_validate(spec)


# (edit, new generation?) -- why, in the id.
TABLE = [
    # observed or stored differently, same model: in place
    pytest.param({"training": {"logEverySteps": 1}}, False, id="logEverySteps"),
    pytest.param({"training": {"evalEverySteps": 5}}, False, id="evalEverySteps"),
    pytest.param({"checkpoint": {"keep": 10}}, False, id="checkpoint.keep"),
    pytest.param({"checkpoint": {"everySteps": 50}}, False, id="checkpoint.everySteps"),
    pytest.param({"model": {"secretRef": {"name": "hf-token-v2"}}}, False, id="model secret"),
    pytest.param({"dataset": {"secretRef": {"name": "other"}}}, False, id="dataset secret"),
    pytest.param(
        {"model": {"secretRef": {"name": "hf-token", "key": "v2"}}}, False, id="secret key"
    ),
    pytest.param({"suspend": True}, False, id="suspend"),
    pytest.param({"activeDeadlineSeconds": 600}, False, id="deadline"),
    pytest.param({"storage": {"size": "40Gi"}}, False, id="storage.size"),
    pytest.param({"serving": {"replicas": 3}}, False, id="serving.replicas"),
    pytest.param({"serving": {"maxTokensLimit": 64}}, False, id="serving.maxTokensLimit"),
    pytest.param({"serving": {"gate": {"maxEvalLoss": "2"}}}, False, id="serving.gate"),
    pytest.param({"serving": {"apiKeySecretRef": {"name": "api-key"}}}, False,
                 id="serving.apiKeySecretRef"),
    pytest.param({"lora": {"rank": 16, "alpha": 32}}, False, id="lora defaults spelled out"),
    # a different model
    pytest.param({"training": {"learningRate": "1e-3"}}, True, id="learningRate"),
    pytest.param({"training": {"epochs": 1}}, True, id="epochs"),
    pytest.param({"training": {"maxSteps": 30}}, True, id="maxSteps"),
    pytest.param({"training": {"seed": 7}}, True, id="seed"),
    pytest.param({"training": {"batchSize": 32}}, True, id="batchSize"),
    pytest.param({"training": {"maxSeqLength": 512}}, True, id="maxSeqLength"),
    pytest.param({"training": {"packing": False}}, True, id="packing"),
    pytest.param({"method": "DoRA"}, True, id="method"),
    pytest.param({"lora": {"rank": 8}}, True, id="lora.rank"),
    pytest.param({"model": {"source": "hf://acme/other"}}, True, id="base model"),
    pytest.param({"model": {"revision": "v2"}}, True, id="model revision"),
    pytest.param({"dataset": {"source": "hf://acme/data2"}}, True, id="dataset"),
    pytest.param({"dataset": {"format": "Chat"}}, True, id="dataset format"),
    pytest.param({"dataset": {"validation": {"splitPercent": 10}}}, True, id="validation split"),
    pytest.param({"serving": {"precision": "FP32"}}, True, id="export precision"),
    pytest.param({"serving": {"precision": "INT8"}}, True, id="export precision INT8"),
    pytest.param({"serving": {"precision": "INT4", "quantization": "KQuant"}}, True,
                 id="INT4 quantization method"),
    # what the trainer measures and the gate reads (issue 29): re-measured by a new generation
    pytest.param({"evaluation": {"task": "Translation"}}, True, id="evaluation.task"),
    pytest.param({"evaluation": {"task": "Classification", "labels": ["a", "b"]}}, True,
                 id="evaluation labels"),
    pytest.param({"evaluation": {"metrics": ["exactMatch", "evalLoss"]}}, True,
                 id="evaluation.metrics"),
    pytest.param({"evaluation": {"task": "Chat",
                                 "judge": {"endpoint": "http://judge/v1", "model": "j"}}}, True,
                 id="evaluation.judge"),
    pytest.param({"evaluation": {"task": "Generation"}}, False,
                 id="evaluation default spelled out"),
    # the plan and the torchrun world: a running Job cannot change them
    pytest.param({"resources": {"gpusPerNode": 2}}, True, id="gpusPerNode"),
    pytest.param({"resources": {"nodes": 2}}, True, id="nodes"),
    pytest.param({"deepspeed": {"zeroStage": 3}}, True, id="zeroStage"),
    pytest.param({"storage": {"claimName": "mine"}}, True, id="claim (run directory)"),
]


@pytest.mark.parametrize(("edit", "new_generation"), TABLE)
def test_only_edits_that_change_the_model_start_a_new_generation(
    edit: dict[str, Any], new_generation: bool
) -> None:
    if "claimName" in edit.get("storage", {}):
        edit = {"storage": {"claimName": "mine"}}
        changed = FineTuneJobSpec.model_validate({**BASE, **edit})
    else:
        changed = _spec(**edit)
    assert (training_hash(changed) != training_hash(_spec())) is new_generation


def test_the_judges_secret_is_a_credential_not_what_is_measured() -> None:
    judge = {"endpoint": "http://judge/v1", "model": "j"}
    first = _spec(evaluation={"task": "Chat",
                              "judge": {**judge, "apiKeySecretRef": {"name": "judge-a"}}})
    second = _spec(evaluation={"task": "Chat",
                               "judge": {**judge, "apiKeySecretRef": {"name": "judge-b"}}})
    assert training_hash(first) == training_hash(second)
    # The judge itself is what is measured: adding one to a Chat job measures judgeWinRate.
    assert training_hash(first) != training_hash(_spec(evaluation={"task": "Chat"}))


def test_a_renamed_secret_leaves_the_running_jobs_applied_hash_alone() -> None:
    """The Secret is in the Job's immutable pod template: a new template could only be
    refused by the API server, so the Job is not applied again for it."""
    owner = Owner.from_body(body())

    def applied_hash(spec: FineTuneJobSpec) -> str:
        job = training_job(owner, 1, spec, CONFIG, training_hash(spec))
        return str(job["metadata"]["annotations"][naming.ANNOTATION_HASH])

    renamed = _spec(model={"secretRef": {"name": "hf-token-v2"}})
    assert applied_hash(renamed) == applied_hash(_spec())
    assert applied_hash(_spec(suspend=True)) != applied_hash(_spec())  # mutable: applied


def test_the_hash_older_operators_wrote_still_names_the_same_run() -> None:
    """Upgrading the operator must not start every running job over: the legacy hash is
    the one the previous operator computed over nearly the whole spec."""
    spec = _spec()
    assert legacy_training_hash(spec) != training_hash(spec)
    assert legacy_training_hash(_spec(training={"logEverySteps": 1})) != legacy_training_hash(
        spec
    )
