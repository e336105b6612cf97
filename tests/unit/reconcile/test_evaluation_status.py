"""Task metrics through reconcile: `status.evaluation.metrics` (base, fine-tuned, serving),
the gate on them between generations, and the serving model's scores kept on its
Deployment. No cluster: each pass's status patch is applied as the API server applies it."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.metrics import Metric
from kubetune.reconcile.status import served_scores
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

LABELS = ["billing", "access", "outage"]
CLASSIFICATION = {"task": "Classification", "labels": LABELS}
METRICS_ANNOTATION = "kubetune.io/model-metrics"


def _report(macro_f1: float, base_macro_f1: float = 0.2) -> dict[str, Any]:
    return {
        "status": "Succeeded", "steps": 20, "trainLoss": 1.2, "evalLoss": 0.7,
        "baseEvalLoss": 1.9, "task": "Classification",
        "metrics": {"values": {"accuracy": 0.8, "macroF1": macro_f1, "outOfLabels": 0.05,
                               "evalLoss": 0.7},
                    "perLabelF1": {"billing": 0.9, "access": 0.7, "outage": 0.5}},
        "baseMetrics": {"values": {"accuracy": 0.3, "macroF1": base_macro_f1,
                                   "outOfLabels": 0.4, "evalLoss": 1.9},
                        "perLabelF1": {"billing": 0.4, "access": 0.1, "outage": 0.1}},
    }  # fmt: skip


def _status_after(job_body: dict[str, Any], children: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(merge_patched(job_body.get("status") or {},
                              observe(job_body, children).status_patch))


def _trained(report: dict[str, Any], generation: int, gate: dict[str, Any] | None = None,
             epochs: int = 1) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A Classification job whose training and export of `generation` succeeded."""
    serving = {"gate": gate} if gate else {}
    spec = spec_dict(evaluation=CLASSIFICATION, serving=serving, training={"epochs": epochs})
    job_body = body(spec, generation=generation)
    train = as_observed(applied(observe(job_body), "Job")[0], job_status("Complete", succeeded=1))
    name = train["metadata"]["name"]
    children = [train, pod(name, "Succeeded", message=json.dumps(report), generation=generation)]
    export = next(m for m in applied(observe(job_body, children), "Job")
                  if m["metadata"]["name"].endswith("export"))
    children.append(as_observed(export, job_status("Complete", succeeded=1)))
    return job_body, children


def _generation_1_serving() -> tuple[dict[str, Any], dict[str, Any]]:
    """Generation 1 (macroF1 0.7) passed and serves: its status and its Deployment."""
    job_body, children = _trained(_report(0.7), generation=1)
    status = _status_after(job_body, children)
    deployment = applied(observe({**job_body, "status": status}, children), "Deployment")[0]
    served = as_observed(deployment, deployment_status())
    status = _status_after({**job_body, "status": status}, [*children, served])
    return status, served


def test_status_shows_each_metric_base_and_fine_tuned_and_per_label_f1() -> None:
    status, _ = _generation_1_serving()
    evaluation = status["evaluation"]
    assert evaluation["task"] == "Classification"
    assert evaluation["metrics"] == [
        {"name": "accuracy", "base": "0.3", "fineTuned": "0.8"},
        {"name": "macroF1", "base": "0.2", "fineTuned": "0.7"},
        {"name": "outOfLabels", "base": "0.4", "fineTuned": "0.05"},
        {"name": "evalLoss", "base": "1.9", "fineTuned": "0.7"},
        {"name": "perplexity", "base": "6.68589", "fineTuned": "2.01375"},
    ]
    assert evaluation["perLabelF1"] == [
        {"label": "billing", "base": "0.4", "fineTuned": "0.9"},
        {"label": "access", "base": "0.1", "fineTuned": "0.7"},
        {"label": "outage", "base": "0.1", "fineTuned": "0.5"},
    ]


def test_the_served_models_metrics_are_kept_on_its_deployment() -> None:
    _, served = _generation_1_serving()
    recorded = json.loads(served["metadata"]["annotations"][METRICS_ANNOTATION])
    assert recorded["macroF1"] == 0.7 and recorded["evalLoss"] == 0.7
    assert served_scores(json.dumps(recorded), None).values[Metric.MACRO_F1] == 0.7


def test_a_gate_on_macro_f1_blocks_generation_2_which_does_not_beat_the_serving_one() -> None:
    """Generation 2 passes its own bounds and beats the base, but not generation 1 on
    macroF1 (its loss is the same): generation 1 keeps serving, and status shows the three
    models side by side."""
    status, served = _generation_1_serving()
    gate = {"min": {"macroF1": "0.5"}, "mustBeatServing": True}
    g2_body, g2_children = _trained(_report(0.6), generation=2, gate=gate, epochs=2)
    outcome = observe({**g2_body, "status": status}, [*g2_children, served])
    status = dict(merge_patched(status, outcome.status_patch))
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "GateFailed")
    assert "macroF1 0.6 does not beat the serving model's 0.7" in ready["message"]
    assert "generation 1 keeps serving" in ready["message"]
    macro_f1 = next(row for row in status["evaluation"]["metrics"] if row["name"] == "macroF1")
    assert macro_f1 == {"name": "macroF1", "base": "0.2", "fineTuned": "0.6", "serving": "0.7"}
    assert all(d["spec"]["template"]["metadata"]["annotations"]["kubetune.io/model-generation"]
               == "1" for d in applied(outcome, "Deployment"))  # fmt: skip

    # The trainer pod is gone: the report rebuilt from status still has generation 2's
    # metrics, so the verdict and every number stay as they were.
    without_pod = [c for c in [*g2_children, served] if c["kind"] != "Pod"]
    again = observe({**g2_body, "status": status}, without_pod, now="2026-01-01T02:00:00Z")
    assert again.status_patch == {}


def test_a_better_generation_2_rolls_out_with_its_metrics_on_the_deployment() -> None:
    status, served = _generation_1_serving()
    gate = {"min": {"macroF1": "0.5"}, "mustBeatServing": True}
    g2_body, g2_children = _trained(_report(0.85), generation=2, gate=gate, epochs=2)
    outcome = observe({**g2_body, "status": status}, [*g2_children, served])
    (deployment,) = applied(outcome, "Deployment")
    assert deployment["spec"]["template"]["metadata"]["annotations"][
        "kubetune.io/model-generation"] == "2"  # fmt: skip
    assert json.loads(deployment["metadata"]["annotations"][METRICS_ANNOTATION])[
        "macroF1"] == 0.85  # fmt: skip
    assert "macroF1 0.85 beats the serving model's 0.7" in (
        outcome.status_patch["evaluation"]["message"])


def test_a_bound_on_a_metric_the_trainer_did_not_report_fails() -> None:
    report = _report(0.9)
    del report["metrics"]["values"]["outOfLabels"]
    job_body, children = _trained(report, generation=1, gate={"max": {"outOfLabels": "0.1"}})
    status = _status_after(job_body, children)
    assert status["evaluation"]["passed"] is False
    assert "outOfLabels was not measured" in status["evaluation"]["message"]
    assert condition(status, "Ready")["reason"] == "GateFailed"


def test_per_label_f1_is_left_out_of_status_for_many_labels() -> None:
    report = _report(0.7)
    report["metrics"]["perLabelF1"] = {f"label-{n}": 0.5 for n in range(65)}
    report["baseMetrics"]["perLabelF1"] = {}
    job_body, children = _trained(report, generation=1)
    evaluation = _status_after(job_body, children)["evaluation"]
    assert "perLabelF1" not in evaluation
    assert any(row["name"] == "macroF1" for row in evaluation["metrics"])


def test_a_deployment_from_before_metrics_counts_its_eval_loss_only() -> None:
    assert served_scores(None, "0.9").values == {Metric.EVAL_LOSS: 0.9}
    # Unknown names, non-numbers and a broken annotation are skipped, not trusted.
    mixed = json.dumps({"chrF": 51.5, "meteor": 0.3, "bleu": "n/a", "rougeL": float("nan")})
    assert served_scores(mixed, None).values == {Metric.CHRF: 51.5}
    assert served_scores("{not json", "x").values == {}
