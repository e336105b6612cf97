"""The Serving condition says why the inference pods are not available, from the real
scheduler's own words (issue 28, item 7). Before, status said only "waiting for the first
inference pod" while the scheduler had long said why none would come."""

from __future__ import annotations

from cluster import Cluster

from .operator_harness import REPORT, condition, finetunejob, succeed, wait_ftj


def test_an_unschedulable_inference_pod_is_reported_with_the_schedulers_reason(
    cluster: Cluster, ns: str
) -> None:
    # Every fake node has 32 CPUs: an inference pod asking for 100 fits none.
    serving = {"resources": {"cpu": "100", "memory": "1Gi"}}
    cluster.apply(finetunejob("nofit", ns, train=succeed("1s", REPORT), serving=serving))

    stuck = wait_ftj(
        cluster, ns, "nofit",
        lambda o: condition(o, "Serving").get("reason") == "Unschedulable",
        timeout=120, what="the Serving condition to say the pod is unschedulable",
    )  # fmt: skip

    said = condition(stuck, "Serving")
    assert said["status"] == "Unknown"
    assert "Insufficient cpu" in said["message"], said
    ready = condition(stuck, "Ready")
    assert ready["status"] == "False" and "Insufficient cpu" in ready["message"], ready
