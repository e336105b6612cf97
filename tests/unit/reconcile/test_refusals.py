"""A child the API server refuses (400/422 on apply) is reported in the FineTuneJob's
conditions with the server's own message, instead of a status that waits forever
(issue 28, item 5)."""

from __future__ import annotations

import json
from typing import Any

from kubetune.builders import naming
from kubetune.reconcile.refusals import Refusal
from tests.unit.operator_fixtures import (
    applied,
    as_observed,
    body,
    condition,
    job_status,
    observe,
    pod,
)

SERVER_SAYS = (
    'Job.batch "demo-g1-train" is invalid: spec.template.spec.nodeSelector: Invalid value: '
    '"bad key!": name part must consist of alphanumeric characters'
)


def _refusal_of(manifest: dict[str, Any], message: str = SERVER_SAYS) -> Refusal:
    return Refusal(
        kind=manifest["kind"],
        name=manifest["metadata"]["name"],
        digest=manifest["metadata"]["annotations"][naming.ANNOTATION_HASH],
        message=message,
    )


def _trained_world() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A FineTuneJob whose training and export Jobs have succeeded: serving is next."""
    job_body = body()
    train = as_observed(applied(observe(job_body), "Job")[0], job_status("Complete", succeeded=1))
    report = {"status": "Succeeded", "steps": 20, "evalLoss": 1.1, "baseEvalLoss": 1.9}
    children = [train, pod(train["metadata"]["name"], "Succeeded", message=json.dumps(report))]
    export = next(
        m for m in applied(observe(job_body, children), "Job")
        if m["metadata"]["name"].endswith("export")
    )
    children.append(as_observed(export, job_status("Complete", succeeded=1)))
    return job_body, children


def test_refused_training_job_fails_training_with_the_servers_message() -> None:
    job_body = body()
    first = observe(job_body)
    train = applied(first, "Job")[0]
    outcome = observe(job_body, refused=[_refusal_of(train)])
    trained = condition(outcome, "Trained")
    assert (trained["status"], trained["reason"]) == ("False", "Refused")
    assert 'the API server refused Job "demo-g1-train"' in trained["message"]
    assert SERVER_SAYS in trained["message"]
    ready = condition(outcome, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "TrainingFailed")
    assert SERVER_SAYS in ready["message"]
    assert outcome.status_patch["phase"] == "Failed"
    assert any(e.type == "Warning" and e.reason == "Refused" for e in outcome.events)


def test_a_refusal_of_an_older_manifest_no_longer_counts() -> None:
    """The spec was edited since: the new manifest has another hash and is sent again."""
    first = observe(body())
    train = applied(first, "Job")[0]
    stale = {**_refusal_of(train).__dict__, "digest": "an-older-hash"}
    outcome = observe(body(), refused=[Refusal(**stale)])
    assert condition(outcome, "Trained")["status"] == "Unknown"
    assert outcome.status_patch["phase"] != "Failed"


def test_refused_run_config_map_fails_training_too() -> None:
    first = observe(body())
    config_map = applied(first, "ConfigMap")[0]
    outcome = observe(body(), refused=[_refusal_of(config_map, "ConfigMap too long")])
    trained = condition(outcome, "Trained")
    assert (trained["status"], trained["reason"]) == ("False", "Refused")
    assert f'ConfigMap "{config_map["metadata"]["name"]}": ConfigMap too long' in trained["message"]


def test_refused_deployment_says_so_in_serving_and_ready() -> None:
    job_body, children = _trained_world()
    deploying = observe(job_body, children)
    deployment = applied(deploying, "Deployment")[0]
    message = 'Deployment.apps "demo-server" is invalid: spec.replicas: Invalid value'
    outcome = observe(job_body, children, refused=[_refusal_of(deployment, message)])
    serving = condition(outcome, "Serving")
    assert (serving["status"], serving["reason"]) == ("False", "Refused")
    assert message in serving["message"]
    ready = condition(outcome, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ServingFailed")
    assert message in ready["message"]


def test_refused_export_job_fails_export() -> None:
    job_body, children = _trained_world()
    export = next(
        child for child in children if child["metadata"]["name"].endswith("export")
    )
    children = [child for child in children if child is not export]
    outcome = observe(job_body, children, refused=[_refusal_of(export, "export refused")])
    exported = condition(outcome, "Exported")
    assert (exported["status"], exported["reason"]) == ("False", "Refused")
    assert "export refused" in exported["message"]
    assert condition(outcome, "Ready")["reason"] == "ExportFailed"


def test_nothing_refused_changes_nothing() -> None:
    first = observe(body())
    train = as_observed(applied(first, "Job")[0])
    assert condition(observe(body(), [train], refused=[]), "Trained")["status"] == "Unknown"
