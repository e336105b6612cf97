"""The e2e control plane itself: real scheduler, Job controller and kwok stages, no mocks."""

from __future__ import annotations

import datetime
import json
from typing import Any

from cluster import Cluster

GPU = "nvidia.com/gpu"
GPU_NODES = {"kwok-gpu-0", "kwok-gpu-1"}
FAIL_LABEL = "pod-container-running-failed.stage.kwok.x-k8s.io"
COMPLETE_DELAY = "pod-complete.stage.kwok.x-k8s.io/delay"
TERMINATION_MESSAGE = "kubetune.io/fake-termination-message"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}


def _container(gpus: int = 0) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "registry.invalid/kubetune/trainer:0"}
    if gpus:
        # Extended resources must have requests equal to limits; limits alone imply that.
        container["resources"] = {"limits": {GPU: str(gpus)}}
    return container


def _pod(name: str, namespace: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [_container(gpus)], "tolerations": [GPU_TOLERATION]},
    }


def _job(
    name: str,
    namespace: str,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    gpus: int = 0,
) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels or {}, "annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [_container(gpus)],
                    "tolerations": [GPU_TOLERATION],
                },
            },
        },
    }


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in obj.get("status", {}).get("conditions", []):
        if condition["type"] == kind:
            return dict(condition)
    return None


def _has_condition(kind: str, status: str = "True") -> Any:
    def check(obj: dict[str, Any]) -> bool:
        condition = _condition(obj, kind)
        return condition is not None and condition["status"] == status

    return check


def _job_pod(cluster: Cluster, namespace: str, job: str) -> dict[str, Any]:
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", f"job-name={job}", "-o", "json"
        ).stdout
    )["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return dict(pods[0])


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["status"]["containerStatuses"][0]["state"]["terminated"])


def _time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _review(cluster: Cluster, token: str, audience: str) -> dict[str, Any]:
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    }
    created = cluster.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review))
    return dict(json.loads(created.stdout)["status"])


def test_server_is_the_built_kubernetes(cluster: Cluster) -> None:
    versions = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == "v1.36.4"
    assert versions["clientVersion"]["gitVersion"] == "v1.36.4"


def test_gpu_pod_is_scheduled_on_a_gpu_node_and_runs(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_pod("one-gpu", namespace, gpus=1))

    pod = cluster.wait_for(
        "pod",
        "one-gpu",
        lambda p: p.get("status", {}).get("phase") == "Running",
        namespace=namespace,
    )

    assert pod["spec"]["nodeName"] in GPU_NODES
    assert _has_condition("Ready")(pod)
    assert "running" in pod["status"]["containerStatuses"][0]["state"]


def test_pod_asking_more_gpus_than_a_node_has_stays_pending(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(_pod("nine-gpus", namespace, gpus=9))

    pod = cluster.wait_for(
        "pod", "nine-gpus", _has_condition("PodScheduled", "False"), namespace=namespace
    )

    scheduled = _condition(pod, "PodScheduled")
    assert scheduled is not None
    assert scheduled["reason"] == "Unschedulable"
    assert f"Insufficient {GPU}" in scheduled["message"]
    assert pod["status"]["phase"] == "Pending"
    assert "nodeName" not in pod["spec"]


def test_job_pod_succeeds_after_the_annotated_delay(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_job("train", namespace, annotations={COMPLETE_DELAY: "3s"}, gpus=2))

    cluster.wait_for("job", "train", _has_condition("Complete"), namespace=namespace)

    pod = _job_pod(cluster, namespace, "train")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["spec"]["nodeName"] in GPU_NODES
    terminated = _terminated(pod)
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    # API times have one-second resolution: a 3 s delay shows as at least 2 s.
    ran_for = _time(terminated["finishedAt"]) - _time(pod["status"]["startTime"])
    assert ran_for >= datetime.timedelta(seconds=2)


def test_job_pod_told_to_fail_fails_with_its_exit_code(cluster: Cluster, namespace: str) -> None:
    annotations = {
        f"{FAIL_LABEL}/exit-code": "42",
        f"{FAIL_LABEL}/reason": "Error",
        f"{FAIL_LABEL}/message": "CUDA out of memory: tried to allocate 2.00 GiB",
    }
    cluster.apply(_job("doomed", namespace, labels={FAIL_LABEL: "true"}, annotations=annotations))

    job = cluster.wait_for("job", "doomed", _has_condition("Failed"), namespace=namespace)

    failed = _condition(job, "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    pod = _job_pod(cluster, namespace, "doomed")
    assert pod["status"]["phase"] == "Failed"
    terminated = _terminated(pod)
    assert terminated["exitCode"] == 42
    assert terminated["reason"] == "Error"
    assert terminated["message"] == "CUDA out of memory: tried to allocate 2.00 GiB"


def test_termination_message_annotation_reaches_the_container_status(
    cluster: Cluster, namespace: str
) -> None:
    # Shaped like a trainer's final report: JSON with quotes, a colon and a newline.
    report = json.dumps({"step": 120, "loss": "0.4312", "note": 'said "done":\nok'})
    cluster.apply(_job("report", namespace, annotations={TERMINATION_MESSAGE: report}))

    cluster.wait_for("job", "report", _has_condition("Complete"), namespace=namespace)

    pod = _job_pod(cluster, namespace, "report")
    assert json.loads(_terminated(pod)["message"]) == json.loads(report)


def test_deployment_pods_become_ready_and_stay_running(cluster: Cluster, namespace: str) -> None:
    labels = {"app": "server"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "server", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [_container()]}},
        },
    }
    cluster.apply(deployment)
    cluster.wait_for("deployment", "server", _has_condition("Available"), namespace=namespace)

    # A Job with the same completion delay finishing proves the pod-complete stage had its
    # chance at the Deployment's pods, without sleeping for a fixed time.
    cluster.apply(_job("marker", namespace, annotations={COMPLETE_DELAY: "1s"}))
    cluster.wait_for("job", "marker", _has_condition("Complete"), namespace=namespace)

    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=server", "-o", "json").stdout
    )["items"]
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert _has_condition("Ready")(pod)


def test_token_review_accepts_a_projected_token_with_a_custom_audience(
    cluster: Cluster, namespace: str
) -> None:
    audience = "kubetune-progress"
    cluster.kubectl("create", "serviceaccount", "trainer", "-n", namespace)
    token = cluster.kubectl(
        "create", "token", "trainer", "-n", namespace, "--audience", audience
    ).stdout.strip()

    status = _review(cluster, token, audience)
    other = _review(cluster, token, "some-other-audience")

    assert status["authenticated"] is True
    assert status["audiences"] == [audience]
    assert status["user"]["username"] == f"system:serviceaccount:{namespace}:trainer"
    assert not other.get("authenticated")


def test_apply_keeps_strings_that_look_like_numbers(cluster: Cluster, namespace: str) -> None:
    # "1e-3" is a float to kubectl's YAML 1.2 reader but not to PyYAML's 1.1 writer, which
    # leaves it unquoted: a FineTuneJob's learningRate was refused as "expected string".
    data = {"lr": "1e-3", "steps": "30", "flag": "yes"}
    cluster.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "strings",
         "namespace": namespace}, "data": data}
    )  # fmt: skip
    assert (cluster.get("configmap", "strings", namespace) or {}).get("data") == data
