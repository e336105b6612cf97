"""reconcile: observed FineTuneJob + children -> desired children + status. No cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api.dataplane import AutoChoice, CandidateScore, ExportReport
from kubetune.reconcile.decide import ChildRef, needs_reference_check
from kubetune.reconcile.runs import slim
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

REPORT = {
    "status": "Succeeded",
    "steps": 20,
    "trainLoss": 1.2,
    "evalLoss": 1.1,
    "baseEvalLoss": 1.9,
}


def _status_after(job_body: dict[str, Any], children: list[dict[str, Any]]) -> dict[str, Any]:
    """Run reconcile and return the resulting status: the previous status with the pass's
    patch applied as the API server applies a merge patch."""
    outcome = observe(job_body, children)
    return dict(merge_patched(job_body.get("status") or {}, outcome.status_patch))


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7386, Appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_the_status_helper_merges_as_rfc_7386_says(target: Any, patch: Any, result: Any) -> None:
    assert merge_patched(target, patch) == result


def _trained_world(
    gate: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    generation: int = 1,
    training: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A FineTuneJob whose training and export Jobs of `generation` have succeeded."""
    serving = {"gate": gate} if gate else {}
    spec = spec_dict(serving=serving, **({"training": training} if training else {}))
    job_body = body(spec, generation=generation)
    first = observe(job_body)
    train = as_observed(applied(first, "Job")[0], job_status("Complete", succeeded=1))
    name = train["metadata"]["name"]
    children = [
        train,
        pod(name, "Succeeded", message=json.dumps(report or REPORT), generation=generation),
    ]
    second = observe(job_body, children)
    export = next(m for m in applied(second, "Job") if m["metadata"]["name"].endswith("export"))
    children.append(as_observed(export, job_status("Complete", succeeded=1)))
    return job_body, children


def test_missing_secret_fails_validation_and_creates_nothing() -> None:
    spec = spec_dict(model={"source": "hf://org/m", "secretRef": {"name": "hf-token"}})
    outcome = observe(body(spec), missing=['Secret "hf-token"'])
    validated = condition(outcome, "Validated")
    assert validated["status"] == "False"
    assert validated["reason"] == "MissingReference"
    assert 'Secret "hf-token" not found' in validated["message"]
    assert outcome.apply == []
    assert outcome.status_patch["phase"] == "Invalid"
    assert {e.type for e in outcome.events} == {"Warning"}
    assert "MissingReference" in {e.reason for e in outcome.events}


def test_plan_that_does_not_fit_is_reported() -> None:
    outcome = observe(body(), plan_error="needs 160 GiB per GPU; 80 GiB available: use ZeRO-3")
    validated = condition(outcome, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "DoesNotFit")
    assert "ZeRO-3" in validated["message"]
    assert outcome.apply == []


def test_valid_job_gets_pvc_config_service_and_training_job() -> None:
    outcome = observe(body())
    kinds = [m["kind"] for m in outcome.apply]
    assert kinds == ["PersistentVolumeClaim", "ConfigMap", "Service", "Job"]
    assert condition(outcome, "Validated")["status"] == "True"
    assert condition(outcome, "Trained")["status"] == "Unknown"
    assert outcome.status_patch["plan"]["worldSize"] == 1
    assert outcome.status_patch["observedGeneration"] == 1


def test_existing_claim_is_used_not_created() -> None:
    outcome = observe(body(spec_dict(storage={"claimName": "shared"})))
    assert not applied(outcome, "PersistentVolumeClaim")
    volumes = applied(outcome, "Job")[0]["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "artifacts",
        "persistentVolumeClaim": {"claimName": "shared", "readOnly": False},
    } in volumes


def test_running_then_unchanged_status_is_not_patched_again() -> None:
    job_body = body()
    first = observe(job_body)
    train = as_observed(applied(first, "Job")[0], job_status(active=1))
    children = [train, pod(train["metadata"]["name"], "Running")]
    status = _status_after({**job_body, "status": first.status_patch}, children)
    assert condition(status, "Trained")["reason"] == "Running"
    assert status["phase"] == "Training"
    again = observe({**job_body, "status": status}, children, now="2026-01-01T01:00:00Z")
    assert again.status_patch == {}
    assert again.events == []


def test_success_reads_report_from_termination_message_and_starts_export() -> None:
    job_body = body()
    first = observe(job_body)
    train = as_observed(applied(first, "Job")[0], job_status("Complete", succeeded=1))
    children = [train, pod(train["metadata"]["name"], "Succeeded", message=json.dumps(REPORT))]
    outcome = observe({**job_body, "status": first.status_patch}, children)
    assert condition(outcome, "Trained")["status"] == "True"
    assert "steps 20" in condition(outcome, "Trained")["message"]
    assert outcome.status_patch["progress"]["percent"] == 100
    assert outcome.status_patch["evaluation"]["evalLoss"] == "1.1"
    export = [m for m in applied(outcome, "Job") if m["metadata"]["name"] == "demo-g1-export"]
    assert len(export) == 1
    assert outcome.status_patch["phase"] == "Exporting"


def test_configuration_error_fails_with_the_trainers_message() -> None:
    job_body = body()
    train = as_observed(
        applied(observe(job_body), "Job")[0], job_status("Failed", "PodFailurePolicy", failed=1)
    )
    message = json.dumps({"status": "Failed", "error": "dataset: record 3 has no messages"})
    children = [train, pod(train["metadata"]["name"], "Failed", message=message, exit_code=2)]
    outcome = observe(job_body, children)
    trained = condition(outcome, "Trained")
    assert (trained["status"], trained["reason"]) == ("False", "ConfigurationError")
    assert "record 3 has no messages" in trained["message"]
    assert "exit code 2" in trained["message"]
    assert outcome.status_patch["phase"] == "Failed"
    assert condition(outcome, "Ready")["reason"] == "TrainingFailed"
    assert not [m for m in applied(outcome, "Job") if "export" in m["metadata"]["name"]]


def test_unschedulable_pods_are_reported() -> None:
    job_body = body(spec_dict(resources={"gpusPerNode": 16}))
    train = as_observed(applied(observe(job_body), "Job")[0], job_status(active=1))
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    children = [train, pod(train["metadata"]["name"], "Pending", unschedulable=message)]
    trained = condition(observe(job_body, children), "Trained")
    assert trained["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in trained["message"]


def test_suspend_keeps_the_generation_and_suspends_the_job() -> None:
    first = observe(body())
    train = as_observed(applied(first, "Job")[0], job_status(active=1))
    suspended = body(spec_dict(suspend=True), generation=2)
    outcome = observe(suspended, [train])
    job = applied(outcome, "Job")[0]
    assert job["metadata"]["name"] == "demo-g1-train"
    assert job["spec"]["suspend"] is True
    assert outcome.delete == []
    observed = as_observed(job, job_status(active=0))
    status = _status_after(suspended, [observed])
    assert status["phase"] == "Suspended"
    assert condition(status, "Trained")["reason"] == "Suspended"


def test_kueue_job_waiting_for_admission_is_queued() -> None:
    job_body = body(labels={"kueue.x-k8s.io/queue-name": "gpus"})
    train = as_observed(applied(observe(job_body), "Job")[0])
    assert condition(observe(job_body, [train]), "Trained")["reason"] == "Queued"


def test_spec_change_starts_new_generation_and_removes_old_training_children() -> None:
    _job_body, children = _trained_world()
    changed = body(
        spec_dict(training={"epochs": 1}), generation=2, status={"progress": {"step": 20}}
    )
    outcome = observe(changed, children)
    names = {m["metadata"]["name"] for m in applied(outcome, "Job")}
    assert "demo-g2-train" in names
    assert set(outcome.delete) >= {
        ChildRef("batch/v1", "Job", "demo-g1-train"),
        ChildRef("batch/v1", "Job", "demo-g1-export"),
        ChildRef("v1", "ConfigMap", "demo-g1-config"),
        ChildRef("v1", "Service", "demo-g1-rdzv"),
    }
    assert outcome.status_patch["progress"] is None  # the new generation starts from zero


def test_passing_gate_deploys_and_ready_waits_for_rollout() -> None:
    job_body, children = _trained_world()
    outcome = observe(job_body, children)
    deployment = applied(outcome, "Deployment")[0]
    assert (
        deployment["spec"]["template"]["metadata"]["annotations"]["kubetune.io/model-generation"]
        == "1"
    )
    assert applied(outcome, "Service")[-1]["metadata"]["name"] == "demo-server"
    assert condition(outcome, "Ready")["status"] == "False"
    children.append(as_observed(deployment, deployment_status()))
    status = _status_after(job_body, children)
    assert condition(status, "Ready")["status"] == "True"
    assert status["serving"]["endpoint"] == "http://demo-server.team.svc:8000/v1"
    assert status["serving"]["modelGeneration"] == 1
    assert status["serving"]["model"] == "demo"  # what clients pass as `model`
    assert status["phase"] == "Succeeded"


def test_failing_gate_keeps_the_old_model_serving() -> None:
    # Generation 1 serves; generation 2 comes out worse than the bound.
    _, children = _trained_world(generation=1)
    old = as_observed(applied(observe(body(), children), "Deployment")[0], deployment_status())
    worse = {**REPORT, "evalLoss": 3.0}
    job_body, new_children = _trained_world(gate={"maxEvalLoss": "2.0"}, report=worse, generation=2)
    status = {"serving": {"modelGeneration": 1}}
    outcome = observe({**job_body, "status": status}, [*new_children, old])
    ready = condition(outcome, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "GateFailed")
    assert "maxEvalLoss" in ready["message"] and "generation 1 keeps serving" in ready["message"]
    assert outcome.status_patch["evaluation"]["passed"] is False
    assert outcome.status_patch["phase"] == "Failed"
    assert condition(outcome, "Serving")["status"] == "True"
    # The Deployment is not rolled to generation 2 (nothing to apply: it is unchanged).
    assert all(
        d["spec"]["template"]["metadata"]["annotations"]["kubetune.io/model-generation"] == "1"
        for d in applied(outcome, "Deployment")
    )


def test_serving_switches_only_after_the_new_generation_is_rolled_out() -> None:
    _, children = _trained_world(generation=1)
    old = as_observed(applied(observe(body(), children), "Deployment")[0], deployment_status())
    job_body, new_children = _trained_world(generation=2)
    previous = {"serving": {"modelGeneration": 1}}
    outcome = observe({**job_body, "status": previous}, [*new_children, old])
    rolled = applied(outcome, "Deployment")[0]
    assert (
        rolled["spec"]["template"]["metadata"]["annotations"]["kubetune.io/model-generation"] == "2"
    )
    assert merge_patched(previous, outcome.status_patch)["serving"]["modelGeneration"] == 1
    assert condition(outcome, "Ready")["reason"] == "Deploying"
    # Mid-rollout: old and new pods, not every replica updated yet.
    mid = as_observed(rolled, deployment_status(replicas=2, available=1, updated=1))
    status = _status_after({**job_body, "status": previous}, [*new_children, mid])
    assert status["serving"]["modelGeneration"] == 1
    done = as_observed(rolled, deployment_status())
    status = _status_after({**job_body, "status": previous}, [*new_children, done])
    assert status["serving"]["modelGeneration"] == 2
    assert status["serving"]["model"] == "demo"  # unchanged by the rollout
    assert condition(status, "Ready")["status"] == "True"


def test_serving_disabled_stops_after_training() -> None:
    job_body = body(spec_dict(serving={"enabled": False}))
    train = as_observed(applied(observe(job_body), "Job")[0], job_status("Complete", succeeded=1))
    outcome = observe(
        job_body, [train, pod(train["metadata"]["name"], "Succeeded", message=json.dumps(REPORT))]
    )
    assert not [m for m in applied(outcome, "Job") if "export" in m["metadata"]["name"]]
    assert condition(outcome, "Ready")["status"] == "True"
    assert condition(outcome, "Exported")["reason"] == "Disabled"


def test_reference_check_only_until_validated_for_this_generation() -> None:
    assert needs_reference_check(body())
    validated = {"conditions": [{"type": "Validated", "status": "True", "observedGeneration": 1}]}
    assert not needs_reference_check(body(status=validated))
    assert needs_reference_check(body(status=validated, generation=2))


def test_a_spec_the_models_refuse_is_invalid_with_the_field_named() -> None:
    from pydantic import ValidationError

    from kubetune.api import FineTuneJobSpec
    from kubetune.reconcile.decide import invalid_spec_status

    with pytest.raises(ValidationError) as refused:
        FineTuneJobSpec.model_validate({"model": {"source": "builtin://x"}, "method": "Magic"})
    body = {"metadata": {"name": "bad", "generation": 4}}
    status = invalid_spec_status(body, refused.value, "2026-01-01T00:00:00Z")
    assert status["phase"] == "Invalid" and status["observedGeneration"] == 4
    (condition,) = status["conditions"]
    assert condition["type"] == "Validated" and condition["status"] == "False"
    assert condition["reason"] == "InvalidSpec" and "method" in condition["message"]


AUTO_EXPORT = ExportReport(
    ok=True, requested="Auto", precision="INT4", quantization="GPTQ",
    auto=AutoChoice(
        rule="exact match at most 0.01 below FP32's", held_out_records=40, answers=40,
        fp32=CandidateScore(precision="FP32", accuracy=0.825, agreement=1.0, loss=0.03),
        candidates=[CandidateScore(precision="INT4", quantization="GPTQ", accuracy=0.85,
                                   agreement=0.97, loss=0.04, passed=True,
                                   reason="exact match 0.850 >= FP32's 0.825 - 0.01")],
    ),
)


def test_status_says_what_auto_exported_beside_fp32_and_keeps_it_when_the_pod_is_gone() -> None:
    job_body, children = _trained_world()
    export_job_name = next(c for c in children if c["kind"] == "Job"
                           and c["metadata"]["name"].endswith("export"))["metadata"]["name"]
    message = AUTO_EXPORT.short_form()
    assert len(message.encode()) <= 4096 and "kept FP32" not in message
    with_pod = [*children, pod(export_job_name, "Succeeded", message=message)]
    status = _status_after(job_body, with_pod)
    evaluation = status["evaluation"]
    assert evaluation["exportedWeights"] == "INT4-GPTQ"
    assert evaluation["exportedAccuracy"] == "0.85"
    assert "FP32 exact match 82.5%" in evaluation["exportMessage"]
    assert "INT4-GPTQ exact match 85.0%" in evaluation["exportMessage"]
    # the export pod is deleted (TTL, a node drain): status keeps what it said
    again = observe({**job_body, "status": status}, children)
    assert "evaluation" not in again.status_patch


def test_a_named_precision_is_reported_without_a_choice() -> None:
    job_body, children = _trained_world()
    export_job_name = next(c for c in children if c["kind"] == "Job"
                           and c["metadata"]["name"].endswith("export"))["metadata"]["name"]
    plain = ExportReport(ok=True, precision="INT8").short_form()
    status = _status_after(job_body, [*children, pod(export_job_name, "Succeeded",
                                                     message=plain)])
    assert status["evaluation"]["exportedWeights"] == "INT8"
    assert "exportMessage" not in status["evaluation"]


# Two generations, each pass's status patch applied as the API server applies it.

GATE = {"minAccuracy": "0.8"}


def _serving_generation_1() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Generation 1 trained (accuracy 0.85), passed `GATE` and serves: its status, after
    every pass, its children, and the rolled-out Deployment."""
    job_body, children = _trained_world(gate=GATE, report={**REPORT, "accuracy": 0.85})
    status = _status_after(job_body, children)
    deployment = applied(observe({**job_body, "status": status}, children), "Deployment")[0]
    served = as_observed(deployment, deployment_status())
    status = _status_after({**job_body, "status": status}, [*children, served])
    assert status["evaluation"]["accuracy"] == "0.85" and status["evaluation"]["passed"] is True
    assert status["serving"]["modelGeneration"] == 1
    return status, children, served


def _model_generation(outcome: Any) -> set[str]:
    return {
        d["spec"]["template"]["metadata"]["annotations"]["kubetune.io/model-generation"]
        for d in applied(outcome, "Deployment")
    }


def test_a_generation_that_measured_no_accuracy_never_passes_on_the_one_before() -> None:
    status, g1_children, served = _serving_generation_1()
    g2_body, g2_children = _trained_world(
        gate=GATE, report=REPORT, generation=2, training={"epochs": 1}
    )
    # The edit is seen: generation 2 starts, generation 1's children are still there.
    status = _status_after({**g2_body, "status": status}, [*g1_children, served])
    assert "evaluation" not in status  # generation 1's numbers say nothing of generation 2
    # Generation 2 trained; its report has no accuracy (its validation had no answers).
    g2_train, g2_pod, g2_export = g2_children
    status = _status_after({**g2_body, "status": status}, [g2_train, g2_pod, served])
    assert status["evaluation"]["generation"] == 2
    assert "accuracy" not in status["evaluation"]
    assert "passed" not in status["evaluation"]  # no export yet: no verdict
    # The trainer pod is gone (garbage-collected) when the export finishes: the report is
    # rebuilt from status, which must hold only what generation 2 measured.
    last = observe({**g2_body, "status": status}, [g2_train, g2_export, served])
    status = dict(merge_patched(status, last.status_patch))
    assert "accuracy" not in status["evaluation"]
    assert status["evaluation"]["passed"] is False
    assert "accuracy was not measured" in status["evaluation"]["message"]
    assert condition(status, "Ready")["reason"] == "GateFailed"
    assert _model_generation(last) == {"1"}  # generation 1 keeps serving


def test_a_finished_job_is_not_patched_again_for_what_the_progress_endpoint_left() -> None:
    """The progress endpoint writes `epoch` and `updateTime`, which the final progress does not
    have: they are removed once, not compared (and patched) on every later pass."""
    job_body = body()
    train = as_observed(applied(observe(job_body), "Job")[0], job_status(active=1))
    running = {**job_body, "status": _status_after(job_body, [train])}
    running["status"]["progress"] = {"step": 10, "totalSteps": 20, "epoch": "0.5",
                                     "percent": 50, "updateTime": "2026-01-01T00:10:00Z"}
    done = as_observed(train, job_status("Complete", succeeded=1))
    children = [done, pod("demo-g1-train", "Succeeded", message=json.dumps(REPORT))]
    status = _status_after(running, children)
    assert "epoch" not in status["progress"] and "updateTime" not in status["progress"]
    assert status["progress"]["percent"] == 100
    again = observe({**job_body, "status": status}, children, now="2026-01-01T02:00:00Z")
    assert again.status_patch == {}


def test_the_trainer_pod_going_away_changes_nothing_in_status() -> None:
    """Once the pod is gone, the report is what status kept of it: every number stays, and
    the pass sends no patch."""
    measured = {**REPORT, "accuracy": 0.85, "baseAccuracy": 0.4, "tokensPerSecond": 900.0}
    job_body, children = _trained_world(gate=GATE, report=measured)
    status = _status_after(job_body, children)
    assert status["evaluation"]["baseAccuracy"] == "0.4"
    assert status["progress"]["trainLoss"] == "1.2"
    without_pod = [c for c in children if c["kind"] != "Pod"]
    again = observe({**job_body, "status": status}, without_pod, now="2026-01-01T02:00:00Z")
    assert again.status_patch == {}


def test_a_new_generation_does_not_show_the_last_ones_progress() -> None:
    """The controller decides the pass that creates generation 2's Job again with that Job as
    the API server answered (Pending): generation 1's final progress (100 %) must not stay
    as generation 2's; generation 2's own, once its trainer reports, stays."""
    status, g1_children, served = _serving_generation_1()
    assert status["progress"]["percent"] == 100
    g2_body = body(spec_dict(serving={"gate": GATE}, training={"epochs": 1}), generation=2)
    first = observe({**g2_body, "status": status}, [*g1_children, served])
    (g2_job,) = applied(first, "Job")
    children = [*g1_children, served, as_observed(g2_job)]
    status = _status_after({**g2_body, "status": status}, children)
    assert condition(status, "Trained")["reason"] == "Pending"
    assert "progress" not in status
    reported = {"step": 1, "totalSteps": 40, "percent": 2, "generation": 2,
                "updateTime": "2026-01-01T00:01:00Z"}
    again = observe({**g2_body, "status": {**status, "progress": reported}}, children)
    assert "progress" not in again.status_patch


def test_the_artifact_claim_keeps_the_access_modes_it_was_created_with() -> None:
    """A claim's access modes are immutable. A two-node job's claim is ReadWriteMany; when an
    edit makes the job single-node (ReadWriteOnce for a new claim), KubeTune must not ask the
    API server to change the existing claim: it refuses (422, "spec is immutable"), and the
    refusal fails the new generation (seen on the real-node tier's generation 2)."""
    two_nodes = spec_dict(resources={"nodes": 2, "gpusPerNode": 0})
    [created] = applied(observe(body(two_nodes)), "PersistentVolumeClaim")
    assert created["spec"]["accessModes"] == ["ReadWriteMany"]
    one_node = spec_dict(resources={"nodes": 1, "gpusPerNode": 0})
    stored = as_observed(created, {"phase": "Bound"})
    indexed = slim(stored, "PersistentVolumeClaim", "v1")  # what the operator's index keeps
    outcome = observe(body(one_node, generation=2), [indexed])
    for claim in applied(outcome, "PersistentVolumeClaim"):
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # A new claim for a single-node job is still ReadWriteOnce.
    [fresh] = applied(observe(body(one_node)), "PersistentVolumeClaim")
    assert fresh["spec"]["accessModes"] == ["ReadWriteOnce"]
