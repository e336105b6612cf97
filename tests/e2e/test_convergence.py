"""The operator converges on the real control plane (issue 13, findings 6 and 12).

Finding 6: a child someone deletes comes back and one someone edits is put back, without any
spec change. Finding 12: an edit that does not change the trained model (log cadence,
checkpoint retention) keeps the running training Job (same uid) and its generation, and
reaches the generation's run ConfigMap; an edit that does (the learning rate) starts a new
generation.
"""

from __future__ import annotations

import json
from typing import Any

from cluster import Cluster, wait_for

from .operator_harness import (
    REPORT,
    finetunejob,
    has_condition,
    succeed,
    wait_ftj,
)

CONVERGE_SECONDS = 60
"""Generous bound for the operator to notice and repair a change (the watch delivers it in
well under a second; a 2-core machine running the whole control plane can be slow)."""


def _uid(obj: dict[str, Any] | None) -> str | None:
    return None if obj is None else str(obj["metadata"]["uid"])


def _recreated(cluster: Cluster, kind: str, name: str, ns: str, old_uid: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        obj = cluster.get(kind, name, ns)
        return obj if obj is not None and _uid(obj) != old_uid else None

    return wait_for(found, timeout=CONVERGE_SECONDS, what=f"{kind} {name} to be created again")


def _image(deployment: dict[str, Any] | None) -> str:
    assert deployment is not None
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def test_deleted_children_come_back(cluster: Cluster, ns: str) -> None:
    cluster.apply(finetunejob("heal", ns))
    wait_ftj(cluster, ns, "heal", has_condition("Ready"), timeout=120)

    service = cluster.get("service", "heal-server", ns)
    assert service is not None
    cluster.kubectl("delete", "service", "heal-server", "-n", ns)
    back = _recreated(cluster, "service", "heal-server", ns, str(_uid(service)))
    assert back["spec"]["selector"] == service["spec"]["selector"]

    config_map = cluster.get("configmap", "heal-g1-config", ns)
    assert config_map is not None
    cluster.kubectl("delete", "configmap", "heal-g1-config", "-n", ns)
    restored = _recreated(cluster, "configmap", "heal-g1-config", ns, str(_uid(config_map)))
    assert restored["data"] == config_map["data"]

    rendezvous = cluster.get("service", "heal-g1-rdzv", ns)
    assert rendezvous is not None
    cluster.kubectl("delete", "service", "heal-g1-rdzv", "-n", ns)
    _recreated(cluster, "service", "heal-g1-rdzv", ns, str(_uid(rendezvous)))


def test_a_hand_edited_deployment_is_put_back(cluster: Cluster, ns: str) -> None:
    cluster.apply(finetunejob("mend", ns))
    wait_ftj(cluster, ns, "mend", has_condition("Ready"), timeout=120)
    deployment = cluster.get("deployment", "mend-server", ns)
    image = _image(deployment)
    cluster.kubectl("set", "image", "deployment/mend-server", "server=other:tag", "-n", ns)
    wait_for(
        lambda: _image(cluster.get("deployment", "mend-server", ns)) == image,
        timeout=CONVERGE_SECONDS,
        what=f"the serving Deployment's image to be {image} again",
    )
    cluster.kubectl("scale", "deployment/mend-server", "--replicas=3", "-n", ns)
    wait_for(
        lambda: (cluster.get("deployment", "mend-server", ns) or {})["spec"]["replicas"] == 1,
        timeout=CONVERGE_SECONDS,
        what="the serving Deployment's replicas to be spec.serving.replicas again",
    )


def _run_config(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    config_map = cluster.get("configmap", name, ns)
    assert config_map is not None
    return dict(json.loads(config_map["data"]["run.json"]))


def _patch(cluster: Cluster, ns: str, name: str, spec: dict[str, Any]) -> None:
    cluster.kubectl("patch", "ftj", name, "-n", ns, "--type=merge",
                    "-p", json.dumps({"spec": spec}))  # fmt: skip


def test_edits_that_do_not_change_the_model_keep_the_running_job(
    cluster: Cluster, ns: str
) -> None:
    # The trainer pod runs for five minutes (kwok): long enough for both edits below. It
    # holds a fake GPU, so the job is deleted at the end, not left to the namespace's
    # deletion: later modules' tests need every GPU of the kwok nodes.
    cluster.apply(finetunejob("steady", ns, train=succeed("300s", REPORT)))
    try:
        _keeps_the_running_job(cluster, ns)
    finally:
        cluster.kubectl("delete", "ftj", "steady", "-n", ns, "--wait=true", check=False)
        wait_for(
            lambda: not cluster.kubectl(
                "get", "pods", "-n", ns, "-l", "kubetune.io/job=steady", "-o", "name"
            ).stdout.strip(),
            timeout=CONVERGE_SECONDS,
            what="the training pods to be gone",
        )


def _keeps_the_running_job(cluster: Cluster, ns: str) -> None:
    wait_ftj(cluster, ns, "steady", has_condition("Trained", "Unknown", "Running"))
    job = cluster.get("job", "steady-g1-train", ns)
    assert job is not None

    _patch(cluster, ns, "steady", {"training": {"logEverySteps": 1}, "checkpoint": {"keep": 7}})
    # The pass that observes spec generation 2 has applied (or deleted) what it decided.
    observed = wait_ftj(cluster, ns, "steady", lambda o: o["status"]["observedGeneration"] == 2)
    still = cluster.get("job", "steady-g1-train", ns)
    assert _uid(still) == _uid(job), "the running training Job was replaced"
    assert has_condition("Trained", "Unknown", "Running")(observed)
    jobs = cluster.kubectl("get", "jobs", "-n", ns, "-l", "kubetune.io/job=steady",
                           "-o", "jsonpath={.items[*].metadata.name}").stdout.split()  # fmt: skip
    assert jobs == ["steady-g1-train"]

    def applied_in_place() -> dict[str, Any] | None:
        run = _run_config(cluster, ns, "steady-g1-config")
        spec = run["spec"]
        done = spec["training"]["logEverySteps"] == 1 and spec["checkpoint"]["keep"] == 7
        return run if done else None

    run = wait_for(applied_in_place, timeout=CONVERGE_SECONDS, what="the run config to change")
    assert run["generation"] == 1
    assert _uid(cluster.get("job", "steady-g1-train", ns)) == _uid(job)

    _patch(cluster, ns, "steady", {"training": {"learningRate": "1e-3"}})
    wait_for(
        lambda: cluster.get("job", "steady-g3-train", ns),
        timeout=CONVERGE_SECONDS,
        what="a new generation's training Job after a learning-rate edit",
    )
    wait_for(
        lambda: cluster.get("job", "steady-g1-train", ns) is None,
        timeout=CONVERGE_SECONDS,
        what="the old generation's training Job to be deleted",
    )
    assert _run_config(cluster, ns, "steady-g3-config")["spec"]["training"]["learningRate"] == (
        "1e-3"
    )
