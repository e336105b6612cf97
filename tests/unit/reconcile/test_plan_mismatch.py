"""The trainer's finding that the plan was made for another model reaches the Trained
condition (and its Event), whether the run succeeded or failed."""

from __future__ import annotations

import json

from tests.unit.operator_fixtures import (
    applied,
    as_observed,
    body,
    condition,
    job_status,
    observe,
    pod,
)

MISMATCH = ("the plan was made for another model than config.json describes (parameters "
            "7.00B planned, 3.82B in config.json (+83%); hiddenSize 4096 planned, 3072 in "
            "config.json)")


def test_a_succeeded_run_says_the_plan_was_for_another_model() -> None:
    job_body = body()
    first = observe(job_body)
    train = as_observed(applied(first, "Job")[0], job_status("Complete", succeeded=1))
    report = {"status": "Succeeded", "steps": 20, "trainLoss": 1.2, "planMismatch": MISMATCH}
    children = [train, pod(train["metadata"]["name"], "Succeeded", message=json.dumps(report))]
    outcome = observe({**job_body, "status": first.status_patch}, children)
    trained = condition(outcome, "Trained")
    assert (trained["status"], trained["reason"]) == ("True", "Succeeded")
    assert trained["message"].startswith("training finished: steps 20")
    assert "hiddenSize 4096 planned, 3072 in config.json" in trained["message"]
    assert any("hiddenSize 4096 planned" in event.message for event in outcome.events)


def test_a_failed_run_names_the_mismatch_beside_its_error() -> None:
    job_body = body()
    train = as_observed(applied(observe(job_body), "Job")[0],
                        job_status("Failed", "BackoffLimitExceeded", failed=3))
    report = {"status": "Failed", "error": "OutOfMemoryError: CUDA out of memory",
              "planMismatch": MISMATCH}
    children = [train, pod(train["metadata"]["name"], "Failed", message=json.dumps(report),
                           exit_code=1)]
    trained = condition(observe(job_body, children), "Trained")
    assert trained["status"] == "False"
    assert "CUDA out of memory (the plan was made for another model" in trained["message"]
    assert "parameters 7.00B planned, 3.82B in config.json" in trained["message"]


def test_a_report_without_it_reads_as_before() -> None:
    job_body = body()
    first = observe(job_body)
    train = as_observed(applied(first, "Job")[0], job_status("Complete", succeeded=1))
    report = {"status": "Succeeded", "steps": 20, "trainLoss": 1.2}
    children = [train, pod(train["metadata"]["name"], "Succeeded", message=json.dumps(report))]
    trained = condition(observe({**job_body, "status": first.status_patch}, children), "Trained")
    assert trained["message"] == "training finished: steps 20, trainLoss 1.2"
