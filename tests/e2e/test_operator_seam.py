"""The seam between the operator and the trainer: the command of the training Job the
operator built, run here on the CPU with the ConfigMap's run.json, must train.

Only the paths change (the ConfigMap and artifact mounts become temporary directories) and
torchrun stays single-process. The kwok pod stands in for the real one: the trainer's progress
reports go to the operator's endpoint with a token bound to that pod, and its termination
message is read back with the operator's own parser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import Cluster

from kubetune.api.dataplane import TrainingReport
from kubetune.builders import naming

from .operator_harness import (
    OperatorProcess,
    finetunejob,
    make_claim,
    pod_token,
    succeed,
    wait_ftj,
    wait_items,
)

pytestmark = pytest.mark.slow


def _remap(args: list[str], mounts: dict[str, Path]) -> list[str]:
    remapped = []
    for arg in args:
        for mount, local in mounts.items():
            if arg.startswith(mount):
                arg = str(local) + arg[len(mount) :]
        remapped.append(arg)
    return remapped


def test_training_job_command_trains_with_the_config_map(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    make_claim(cluster, namespace)
    # A few short records and no validation set: the seam is the point, not the evaluation.
    data = tmp_path / "data.jsonl"
    records = [
        {"messages": [{"role": "user", "content": f"list pods in namespace team-{i}"},
                      {"role": "assistant", "content": f"kubectl get pods -n team-{i}"}]}
        for i in range(8)
    ]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cluster.apply(
        finetunejob(
            "seam", namespace,
            train=succeed("600s"),  # the kwok pod stays Running while the real one trains here
            dataset={"source": f"file://{data}", "format": "Chat"},
            resources={"gpusPerNode": 0},
            training={"maxSteps": 2, "logEverySteps": 1, "maxSeqLength": 128, "batchSize": 2},
            serving={"enabled": False},
        )
    )  # fmt: skip
    pod = wait_items(
        cluster, "pods", namespace, "kubetune.io/job=seam",
        lambda ps: len(ps) == 1 and ps[0]["status"].get("phase") == "Running",
    )[0]  # fmt: skip
    job = cluster.get("job", "seam-g1-train", namespace)
    config_map = cluster.get("configmap", "seam-g1-config", namespace)
    assert job is not None and config_map is not None
    container = job["spec"]["template"]["spec"]["containers"][0]

    config_dir, artifacts = tmp_path / "config", tmp_path / "artifacts"
    config_dir.mkdir()
    (config_dir / naming.RUN_CONFIG_KEY).write_text(config_map["data"][naming.RUN_CONFIG_KEY])
    token_file = tmp_path / "token"
    token_file.write_text(
        pod_token(cluster, namespace, pod["metadata"]["name"], "kubetune.io/progress")
    )
    termination_log = tmp_path / "termination-log"
    mounts = {naming.CONFIG_MOUNT: config_dir, naming.ARTIFACTS_MOUNT: artifacts}
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(
        HOME=str(tmp_path),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        KUBETUNE_REPORT_TOKEN_FILE=str(token_file),
        KUBETUNE_TERMINATION_LOG=str(termination_log),
        KUBETUNE_REPORT_INTERVAL_SECONDS="0",
        PATH="/usr/bin:/bin",
    )
    assert container["command"] == ["torchrun"]
    command = [sys.executable, "-m", "torch.distributed.run", *_remap(container["args"], mounts)]

    # Own process group: on a timeout, torchrun's worker goes too.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert proc.returncode == 0, output[-4000:]
    run_dir = artifacts / "seam" / "gen-1"
    report = TrainingReport.parse(termination_log.read_text())
    assert report is not None, termination_log.read_text()[:500]
    assert report.steps == 2
    assert (run_dir / "adapter").is_dir()
    progress = wait_ftj(
        cluster, namespace, "seam",
        lambda o: (o.get("status", {}).get("progress") or {}).get("step") == 2, timeout=30,
        what="the trainer's own progress report to reach status.progress",
    )["status"]["progress"]  # fmt: skip
    assert progress["totalSteps"] == 2 and progress["percent"] == 100
