"""The artifact claim across nodes, against the real control plane (scheduler, Deployment
controller, kwok's nodes): the trainer runs on a GPU node, two inference replicas on another,
and no server container mounts the ReadWriteOnce claim: each reads its own copy of the export,
made by an init container that alone mounts the claim (read-only, that export only)."""

from __future__ import annotations

from typing import Any

from cluster import Cluster

from .operator_harness import (
    REPORT,
    finetunejob,
    has_condition,
    items,
    make_claim,
    succeed,
    wait_ftj,
)

GPU_NODES = {"kwok-gpu-0", "kwok-gpu-1"}


def _claim_volumes(pod: dict[str, Any], claim: str) -> set[str]:
    return {
        v["name"]
        for v in pod["spec"]["volumes"]
        if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim
    }


def test_server_pods_on_another_node_than_the_trainer_do_not_mount_the_claim(
    cluster: Cluster, ns: str
) -> None:
    make_claim(cluster, ns, claim="spread-artifacts")  # the PV the operator's claim binds to
    cluster.apply(finetunejob("spread", ns, train=succeed("3s", REPORT),
                              storage={"size": "20Gi"}, serving={"replicas": 2}))  # fmt: skip

    wait_ftj(cluster, ns, "spread", has_condition("Ready"), timeout=120)

    claim = cluster.get("pvc", "spread-artifacts", ns)
    assert claim is not None and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    selector = "kubetune.io/job=spread,app.kubernetes.io/component="
    trainers = items(cluster, "pods", ns, selector + "trainer")
    trainer_nodes = {p["spec"]["nodeName"] for p in trainers}
    assert trainer_nodes and trainer_nodes <= GPU_NODES
    servers = [
        p for p in items(cluster, "pods", ns, selector + "server")
        if p["status"].get("phase") == "Running" and has_condition("Ready")(p)
    ]  # fmt: skip
    assert len(servers) == 2
    # Two nodes: the inference pods are not where the trainer ran (the GPU nodes' taint).
    assert not {p["spec"]["nodeName"] for p in servers} & trainer_nodes
    for pod in servers:
        from_claim = _claim_volumes(pod, "spread-artifacts")
        [server] = pod["spec"]["containers"]
        assert not from_claim & {m["name"] for m in server.get("volumeMounts") or []}
        assert server["args"][server["args"].index("--model") + 1] == "/model"
        [copy] = pod["spec"]["initContainers"]
        [source] = [m for m in copy["volumeMounts"] if m["name"] in from_claim]
        assert source["readOnly"] is True and source["subPath"] == "spread/gen-1/onnx"
        assert copy["args"][:3] == ["-m", "kubetune_trainer", "copy-model"]
