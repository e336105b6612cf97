#!/usr/bin/env python3
"""Rollout benchmark: requests per second a client gets from a FineTuneJob's inference Service
while its Deployment rolls to a new generation, against the same client and server at rest.

The real-node tier (tests/realnode) checks that a rollout drops no request and keeps the model
name; how many requests per second get through is a figure of the machine, so it is measured
here instead. One run, one machine: a control plane with one real kubelet node
(`hack/cluster.py up --real-node`), KubeTune's images (`hack/images.py`), the chart installed as
a user would. A single-node LoRA job trains, exports INT4 and serves; then the same 8-thread
client (tests/realnode/client.py, one-token chat completions) runs for `--rest-seconds` against
the Ready server, then from a spec change (a new learning rate) while generation 2 trains on the
same node, then from the end of that training (export, gate, rollout) until generation 2 serves
alone. Prints the three rates and the ratios to the rate at rest (1.0: no cost to the client).

Needs root (the real node). `python bench/rollout.py [--rest-seconds 60]`
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT))

import cluster as controlplane  # noqa: E402  (hack/ is not a package)
import realnode  # noqa: E402

from tests.realnode.client import Load  # noqa: E402
from tests.realnode.conftest import (  # noqa: E402
    STORAGE_CLASS,
    condition,
    host_path_volume,
    import_images,
    install_chart,
    serves_alone,
)

JOB = "rollout-bench"
# One trainer (1000m) beside the operator (100m) and the server (900m); two servers (a surge)
# fit during the rollout. The single-node job the real-node tier ran before it shared a job.
SPEC: dict[str, Any] = {
    "model": {"source": "builtin://smollm2-135m-instruct"},
    "dataset": {"source": "builtin://kubectl-commands"},
    "method": "LoRA",
    "training": {"maxSteps": 30, "learningRate": "1e-3", "batchSize": 4, "maxSeqLength": 128},
    "resources": {"gpusPerNode": 0, "cpu": "1000m", "memory": "6Gi"},
    "storage": {"size": "2Gi", "storageClassName": STORAGE_CLASS},
    "serving": {
        "precision": "INT4",
        "device": "CPU",
        "resources": {"cpu": "900m", "memory": "2Gi"},
    },
}


def measure(cluster: controlplane.Cluster, ns: str, rest_seconds: float) -> dict[str, Any]:
    host_path_volume(cluster, f"{ns}-{JOB}")
    cluster.apply({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                   "metadata": {"name": JOB, "namespace": ns}, "spec": SPEC})  # fmt: skip
    applied = time.monotonic()
    controlplane.wait_for(lambda: serves_alone(cluster, ns, JOB, 1), timeout=1800,
                          what="generation 1 served", interval=1)  # fmt: skip
    apply_to_ready = time.monotonic() - applied
    service = cluster.get("service", f"{JOB}-server", ns) or {}
    url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"

    with Load(url, JOB) as rest:
        time.sleep(rest_seconds)
    with Load(url, JOB) as training:
        change = {"spec": {"training": {"learningRate": "8e-4"}}}
        cluster.kubectl("patch", "finetunejob", JOB, "-n", ns, "--type=merge",
                        "-p", json.dumps(change))  # fmt: skip
        train_job = f"{JOB}-g2-train"
        controlplane.wait_for(
            lambda: condition(cluster.get("job", train_job, ns) or {}, "Complete"),
            timeout=1800, what="generation 2 trained", interval=1,
        )  # fmt: skip
    with Load(url, JOB) as rollout:
        controlplane.wait_for(lambda: serves_alone(cluster, ns, JOB, 2), timeout=1800,
                              what="generation 2 served", interval=1)  # fmt: skip
    return {
        "apply_to_ready_s": round(apply_to_ready),
        **{name: {"ok": load.ok, "failed": len(load.failures), "seconds": round(load.seconds),
                  "requests_per_s": round(load.rate, 1), "first_failures": load.failures[:5]}
           for name, load in (("rest", rest), ("training", training), ("rollout", rollout))},
        "rollout_to_rest": round(rollout.rate / rest.rate, 2) if rest.rate else None,
        "training_to_rest": round(training.rate / rest.rate, 2) if rest.rate else None,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rest-seconds", type=float, default=60)
    args = parser.parse_args()
    reason = controlplane.unavailable_reason() or realnode.unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory(prefix="kubetune-rollout-") as workdir,
        controlplane.running(Path(workdir), real_node=True, timeout=300) as cluster,
    ):
        release = install_chart(cluster, import_images(cluster))
        result = measure(cluster, release.watched, args.rest_seconds)
    result["machine"] = {"cpu": platform.processor() or platform.machine(),
                         "python": platform.python_version()}  # fmt: skip
    print(json.dumps(result, indent=1))
    rest, training, rollout = result["rest"], result["training"], result["rollout"]
    print(f"at rest {rest['requests_per_s']}/s; while generation 2 trains beside the server "
          f"{training['requests_per_s']}/s (ratio {result['training_to_rest']}); during the "
          f"rollout {rollout['requests_per_s']}/s (ratio {result['rollout_to_rest']}); "
          f"failed: {training['failed'] + rollout['failed']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
