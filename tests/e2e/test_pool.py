"""Shared serving pools on a real API server (kwok pods): two LoRA jobs naming one pool get one
Deployment and one ConfigMap listing both, each status names the shared endpoint and its own
model; a DoRA job naming the pool gets its own Deployment and says why; deleting a member
takes it out of the set while the pool stays (issue 30). kwok's pods run no server, so the
adapter loads themselves are tested in tests/unit/operator/test_adapters.py."""

from __future__ import annotations

import json
from typing import Any

from cluster import Cluster

from .operator_harness import (
    condition,
    finetunejob,
    items,
    make_claim,
    wait_ftj,
    wait_items,
)

POOL = "team"


def _adapters(cluster: Cluster, ns: str) -> list[dict[str, Any]] | None:
    found = items(cluster, "configmap", ns, f"kubetune.io/pool={POOL}")
    if not found:
        return None
    return list(json.loads(found[0]["data"]["adapters.json"])["adapters"])


def test_two_lora_jobs_share_one_server_and_a_dora_job_is_served_alone(
    cluster: Cluster, ns: str
) -> None:
    # kwok has no provisioner: the pool's claim binds to a PV made for it.
    make_claim(cluster, ns, claim=f"{POOL}-pool-store")
    share = {"share": POOL}
    cluster.apply(
        finetunejob("alpha", ns, serving=share),
        finetunejob("beta", ns, serving=share),
        finetunejob("delta", ns, method="DoRA", serving=share),
    )

    served: dict[str, dict[str, Any]] = {}
    for name in ("alpha", "beta"):
        served[name] = wait_ftj(
            cluster, ns, name, lambda o: condition(o, "Ready").get("status") == "True",
            timeout=180, what=f"{name} to be served by the pool",
        )  # fmt: skip
    endpoint = f"http://{POOL}-pool.{ns}.svc:8000/v1"
    for name, job in served.items():
        serving = job["status"]["serving"]
        assert (serving["endpoint"], serving["model"], serving["pool"]) == (endpoint, name, POOL)
        assert serving["deployment"] == f"{POOL}-pool"

    deployments = items(cluster, "deployment", ns, f"kubetune.io/pool={POOL}")
    assert [d["metadata"]["name"] for d in deployments] == [f"{POOL}-pool"]
    owners = {ref["name"] for ref in deployments[0]["metadata"]["ownerReferences"]}
    assert owners == {"alpha", "beta"}
    assert items(cluster, "deployment", ns, "kubetune.io/job in (alpha,beta)") == []
    # Every member's adapter is in the set the replicas load at start, at its generation,
    # with the metrics its next generation must beat under mustBeatServing.
    adapters = _adapters(cluster, ns) or []
    assert [(a["name"], a["path"]) for a in adapters] == [
        ("alpha", "/adapters/alpha/gen-1"), ("beta", "/adapters/beta/gen-1")]
    assert all("evalLoss" in a["metrics"] for a in adapters)

    delta = wait_ftj(
        cluster, ns, "delta", lambda o: condition(o, "Ready").get("status") == "True",
        timeout=180, what="the DoRA job to be served on its own",
    )  # fmt: skip
    assert "DoRA" in delta["status"]["serving"]["notSharedReason"]
    assert delta["status"]["serving"]["deployment"] == "delta-server"
    assert "pool" not in delta["status"]["serving"]

    cluster.kubectl("delete", "finetunejob", "alpha", "-n", ns)
    wait_items(
        cluster, "configmap", ns, f"kubetune.io/pool={POOL}",
        lambda found: bool(found) and [a["name"] for a in json.loads(
            found[0]["data"]["adapters.json"])["adapters"]] == ["beta"],
        timeout=90, what="alpha to leave the pool's adapter set",
    )  # fmt: skip
    deployments = items(cluster, "deployment", ns, f"kubetune.io/pool={POOL}")
    assert [d["metadata"]["name"] for d in deployments] == [f"{POOL}-pool"]
    beta = wait_ftj(cluster, ns, "beta", lambda o: condition(o, "Ready").get("status") == "True")
    assert beta["status"]["serving"]["endpoint"] == endpoint
