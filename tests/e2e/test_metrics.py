"""`/metrics` of a real operator against the real API server: the same counters the unit test
(tests/unit/operator/test_metrics.py, with a fake client) reads, here fed by real reconciles,
real TokenReviews and real status patches."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter

from cluster import Cluster, wait_for
from prometheus_client.parser import text_string_to_metric_families

from .operator_harness import (
    OperatorProcess,
    finetunejob,
    make_claim,
    pod_token,
    post_progress,
    succeed,
    wait_ftj,
    wait_items,
)

AUDIENCE = "kubetune.io/progress"
Sample = tuple[str, tuple[tuple[str, str], ...]]


def _samples(operator: OperatorProcess) -> dict[Sample, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{operator.progress_url}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_real_reconciles_reports_and_patches(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    make_claim(cluster, namespace)
    # No GPUs: the pod runs on until its namespace goes, and kwok leaves a deleted Job's pod
    # in place for a while; on a GPU node it would hold GPUs the next module's tests need.
    cluster.apply(finetunejob("counted", namespace, train=succeed("120s"),
                              resources={"gpusPerNode": 0}))  # fmt: skip
    [pod] = wait_items(
        cluster, "pods", namespace, "kubetune.io/job=counted,app.kubernetes.io/component=trainer",
        lambda ps: len(ps) == 1 and ps[0]["status"].get("phase") == "Running",
    )  # fmt: skip
    token = pod_token(cluster, namespace, pod["metadata"]["name"], AUDIENCE)
    report = {"step": 3, "totalSteps": 12, "trainLoss": 2.5}
    assert post_progress(operator.progress_url, namespace, "counted", "not-a-token", report) == 401
    assert post_progress(operator.progress_url, namespace, "counted", token, report) == 202
    wait_ftj(cluster, namespace, "counted",
             lambda o: (o["status"].get("progress") or {}).get("step") == 3)  # fmt: skip

    samples = _samples(operator)
    assert samples[("kubetune_reconciles_total", ())] >= 1
    assert samples[("kubetune_api_requests_total",
                    (("method", "PATCH"), ("resource", "finetunejobs")))] >= 1  # fmt: skip
    assert samples[("kubetune_progress_reports_total",
                    (("code", "202"), ("result", "accepted")))] == 1  # fmt: skip
    assert samples[("kubetune_progress_reports_total",
                    (("code", "401"), ("result", "refused")))] == 1  # fmt: skip
    assert samples[("kubetune_progress_status_patches_total", ())] >= 1
    assert samples[("kubetune_progress_tokenreviews_total", ())] >= 1
    # The gauge counts every FineTuneJob the operator watches, by phase: here, what the API
    # server lists (an earlier module's job may still be there while its namespace goes).
    def gauge_matches_the_cluster() -> bool:
        gauge = {labels: value for (name, labels), value in _samples(operator).items()
                 if name == "kubetune_finetunejobs" and value}  # fmt: skip
        listed = json.loads(cluster.kubectl("get", "finetunejobs", "-A", "-o", "json").stdout)
        phases = Counter((item.get("status") or {}).get("phase") for item in listed["items"])
        return gauge == {(("phase", phase),): count for phase, count in phases.items() if phase}

    wait_for(gauge_matches_the_cluster, timeout=30,
             what="kubetune_finetunejobs to count the cluster's jobs by phase")  # fmt: skip
    counted = cluster.get("finetunejob", "counted", namespace)
    assert counted is not None and counted["status"]["phase"] == "Training"

    # The job's training progress, as the gauges the chart's alerts and dashboards query:
    # the report's values, labelled with the generation the report's pod trains.
    generation = str(counted["status"]["progress"]["generation"])
    series = (("generation", generation), ("job", "counted"), ("namespace", namespace))
    samples = _samples(operator)
    assert samples[("kubetune_job_step", series)] == 3
    assert samples[("kubetune_job_total_steps", series)] == 12
    assert samples[("kubetune_job_train_loss", series)] == 2.5
    assert ("kubetune_job_eval_loss", series) not in samples  # the report had none
    assert samples[("kubetune_job_last_step_timestamp_seconds", series)] > 0
    assert samples[("kubetune_job_phase", (("job", "counted"), ("namespace", namespace),
                                           ("phase", "Training")))] == 1  # fmt: skip

    # Deleted: every series of the job leaves the next scrapes.
    cluster.kubectl("delete", "finetunejob", "counted", "-n", namespace, "--wait=false")

    def job_series_gone() -> bool:
        return not any(name.startswith("kubetune_job_") and ("job", "counted") in labels
                       and ("namespace", namespace) in labels
                       for name, labels in _samples(operator))  # fmt: skip

    wait_for(job_series_gone, timeout=60, what="the deleted job's kubetune_job_* series to go")
