"""A two-node CPU job on real pods, and what a cluster does to it mid-run: the operator pod is
deleted (its replacement carries on), then the trainer pods are (the Job's retry resumes from
the newest checkpoint and ends at the same step count)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cluster import Cluster, wait_for
from realnode import NODE_NAME

from .conftest import STORAGE_CLASS, Release, delete_job, describe, host_path_volume

JOB = "two-ranks"
MAX_STEPS = 24
TRAINER = "app.kubernetes.io/component=trainer"
# Two ranks of 800m, the operator's 100m: within the node's 2 CPUs.
JOB_SPEC: dict[str, Any] = {
    "model": {"source": "builtin://smollm2-135m-instruct"},
    "dataset": {"source": "builtin://kubectl-commands"},
    "method": "LoRA",
    "training": {
        "maxSteps": MAX_STEPS,
        "learningRate": "1e-3",
        "batchSize": 4,
        "maxSeqLength": 128,
        "logEverySteps": 1,
    },
    "resources": {"gpusPerNode": 0, "nodes": 2, "cpu": "800m", "memory": "5Gi"},
    "deepspeed": {"zeroStage": 2},
    "checkpoint": {"everySteps": 3},
    "storage": {"size": "2Gi", "storageClassName": STORAGE_CLASS},
    "serving": {
        "precision": "INT4",
        "device": "CPU",
        "resources": {"cpu": "500m", "memory": "2Gi"},
    },
}


def pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def running(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods that run (a first start that failed, which the Job retried, is not one)."""
    return [
        p for p in items
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]  # fmt: skip


def test_two_node_job_survives_losing_its_operator_and_its_trainer_pods(
    real_cluster: Cluster, release: Release, request: pytest.FixtureRequest
) -> None:
    cluster, ns = real_cluster, release.watched
    request.addfinalizer(lambda: delete_job(cluster, ns, JOB))
    volume = f"{ns}-{JOB}"
    host_path_volume(cluster, volume)
    cluster.apply(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": JOB, "namespace": ns},
            "spec": JOB_SPEC,
        }
    )

    def step() -> int:
        job = cluster.get("finetunejob", JOB, ns) or {}
        return int((job.get("status", {}).get("progress") or {}).get("step", 0))

    def wait_step(at_least: int, what: str) -> int:
        try:
            return wait_for(lambda: step() >= at_least and step(), timeout=900, what=what)
        except TimeoutError:
            pytest.fail(f"{what}:\n{describe(cluster, release, JOB)}")

    # Two ranks rendezvous through the headless Service's DNS name and train together.
    wait_step(2, "two ranks training")
    def two_running() -> list[dict[str, Any]] | None:
        live = running(pods(cluster, ns, TRAINER))
        return live if len(live) == 2 else None

    first = wait_for(two_running, timeout=120, what="two trainer pods Running")
    assert {p["spec"]["nodeName"] for p in first} == {NODE_NAME}

    # The operator pod goes; the Deployment's next one takes over the Lease and the reports.
    [operator] = pods(cluster, release.namespace, "app.kubernetes.io/component=operator")
    cluster.kubectl("delete", "pod", "-n", release.namespace, operator["metadata"]["name"])
    before = step()
    wait_for(
        lambda: any(
            p["metadata"]["name"] != operator["metadata"]["name"]
            and any(c["type"] == "Ready" and c["status"] == "True"
                    for c in p["status"].get("conditions", []))
            for p in pods(cluster, release.namespace, "app.kubernetes.io/component=operator")
        ),
        timeout=180,
        what="a new operator pod Ready",
    )  # fmt: skip
    wait_step(before + 2, "progress through the new operator")

    # Both trainer pods go (as on a node failure): they stop at a step boundary with a
    # checkpoint, and the Job's retry resumes from the newest one.
    stopped_near = step()
    cluster.kubectl("delete", "pod", "-n", ns, "-l", TRAINER, "--wait=false")
    old = {p["metadata"]["uid"] for p in first}
    wait_for(
        lambda: len(running([p for p in pods(cluster, ns, TRAINER)
                             if p["metadata"]["uid"] not in old])) == 2,
        timeout=300,
        what="the Job's replacement trainer pods Running",
    )  # fmt: skip

    train_job = f"{JOB}-g1-train"
    try:
        finished = cluster.wait_for(
            "job", train_job, lambda j: any(
                c["type"] == "Complete" and c["status"] == "True"
                for c in j.get("status", {}).get("conditions", [])
            ), namespace=ns, timeout=1200, what=f"Job {train_job} Complete",
        )  # fmt: skip
    except TimeoutError:
        pytest.fail(describe(cluster, release, JOB))
    assert finished["status"].get("failed", 0) >= 1 or finished["status"].get("succeeded") == 2

    job = cluster.get("finetunejob", JOB, ns)
    assert job is not None
    status = job["status"]
    wait_for(lambda: step() == MAX_STEPS, timeout=60, what=f"status at step {MAX_STEPS}")
    assert status["plan"]["worldSize"] == 2 and status["plan"]["zeroStage"] == 2
    # The trainer's own report (on the artifact volume, seen from the host): it resumed.
    report_path = cluster.workdir / "volumes" / volume / JOB / "gen-1" / "report.json"
    report = json.loads(report_path.read_text())
    assert 0 < report["resumedFromStep"] <= stopped_near + 1, report
    assert report["steps"] == MAX_STEPS

    # No duplicate children from two operators: one training Job, one rendezvous Service.
    jobs = cluster.kubectl("get", "jobs", "-n", ns, "-l", f"kubetune.io/job={JOB}", "-o", "json")
    components = [j["metadata"]["labels"]["app.kubernetes.io/component"]
                  for j in json.loads(jobs.stdout)["items"]]  # fmt: skip
    assert components.count("trainer") == 1, components
    services = cluster.kubectl(
        "get", "services", "-n", ns, "-l", "app.kubernetes.io/component=rendezvous", "-o", "name"
    ).stdout.split()
    assert services == [f"service/{JOB}-g1-rdzv"]
