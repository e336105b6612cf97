"""The operator against the real control plane: kube-apiserver, the Job and Deployment
controllers, the garbage collector, the scheduler and kwok's fake GPU nodes. No mocks.

One operator process serves the whole module (tests that restart it leave it running).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from cluster import Cluster, wait_for

from .operator_harness import (
    GPU,
    REPORT,
    OperatorProcess,
    condition,
    events,
    fail,
    finetunejob,
    has_condition,
    items,
    make_claim,
    pod_metadata,
    pod_token,
    post_progress,
    succeed,
    wait_ftj,
    wait_items,
)

GPU_NODES = {"kwok-gpu-0", "kwok-gpu-1"}
AUDIENCE = "kubetune.io/progress"


def _selector(name: str, component: str | None = None) -> str:
    selector = f"kubetune.io/job={name}"
    return f"{selector},app.kubernetes.io/component={component}" if component else selector


def _ready(cluster: Cluster, ns: str, name: str, timeout: float = 90) -> dict[str, Any]:
    return wait_ftj(cluster, ns, name, has_condition("Ready"), timeout=timeout)


def test_lifecycle_trains_exports_and_serves(
    cluster: Cluster, ns: str, operator: OperatorProcess
) -> None:
    cluster.kubectl("create", "secret", "generic", "hf-token", "-n", ns,
                    "--from-literal=token=hf_very_secret_value")  # fmt: skip
    h100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    spec: dict[str, Any] = {
        "model": {"source": "hf://acme/tiny-llama", "secretRef": {"name": "hf-token"},
                  "parameterCount": 135000000},
        "resources": {"gpusPerNode": 2, "gpuMemoryGiB": 80, "nodeSelector": h100},
        "storage": {"size": "20Gi"},  # the operator creates the PVC
    }  # fmt: skip
    make_claim(cluster, ns, claim="life-artifacts")
    cluster.apply(finetunejob("life", ns, train=succeed("3s", REPORT), **spec))

    trained = wait_ftj(cluster, ns, "life", has_condition("Trained"))
    assert trained["status"]["plan"]["worldSize"] == 2

    job = cluster.get("job", "life-g1-train", ns)
    assert job is not None
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["resources"]["requests"][GPU] == container["resources"]["limits"][GPU] == "2"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    assert pod_spec["nodeSelector"] == h100
    assert container["command"] == ["torchrun"]
    assert container["args"][:5] == ["--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    assert "/artifacts/life/gen-1" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBETUNE_REPORT_URL"]["value"].endswith(f"/v1/progress/{ns}/life")
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    pods = items(cluster, "pods", ns, _selector("life", "trainer"))
    assert {p["spec"]["nodeName"] for p in pods} <= GPU_NODES
    assert cluster.get("pvc", "life-artifacts", ns) is not None

    ready = _ready(cluster, ns, "life")
    cluster.kubectl("wait", "--for=condition=Ready", "ftj/life", "-n", ns, "--timeout=10s")
    status = ready["status"]
    assert status["phase"] == "Succeeded"
    assert status["serving"]["endpoint"] == f"http://life-server.{ns}.svc:8000/v1"
    assert status["serving"]["modelGeneration"] == 1
    assert status["evaluation"]["evalLoss"] == "1.05" and status["evaluation"]["passed"] is True
    assert status["progress"]["percent"] == 100
    assert status["artifacts"]["onnx"] == "life/gen-1/onnx"
    for cond in status["conditions"]:
        assert cond["observedGeneration"] == 1 and cond["lastTransitionTime"]
    deployment = cluster.get("deployment", "life-server", ns)
    assert deployment is not None
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    for child in [job, deployment, cluster.get("configmap", "life-g1-config", ns)]:
        assert child is not None
        labels = child["metadata"]["labels"]
        assert (
            labels["kubetune.io/job"] == "life"
            and labels["app.kubernetes.io/managed-by"] == "kubetune"
        )
        assert child["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
        full = json.loads(cluster.kubectl(
            "get", child["kind"], child["metadata"]["name"], "-n", ns, "-o", "json",
            "--show-managed-fields").stdout)  # fmt: skip
        appliers = {
            m["manager"] for m in full["metadata"]["managedFields"] if m["operation"] == "Apply"
        }
        assert appliers == {"kubetune"}
    reasons = {e["reason"] for e in events(cluster, ns, "life")}
    assert {"Valid", "Succeeded", "Available", "Serving"} <= reasons
    # The secret's value is nowhere but in the Secret: not in what KubeTune wrote, not in the
    # pods it made, not in the operator's log.
    written = cluster.kubectl(
        "get", "configmaps,ftj,events,jobs,deployments,services,pods", "-n", ns, "-o", "json"
    ).stdout
    assert '"secretKeyRef"' in written  # the check reads the objects that name the Secret
    operator_log = operator.logs()
    assert f"{ns}/life: Serving" in operator_log  # ... and a log that followed this job
    for text in (written, operator_log):
        assert "hf_very_secret_value" not in text


def test_configuration_error_fails_at_once_without_retry(cluster: Cluster, ns: str) -> None:
    message = json.dumps({"status": "Failed", "error": "dataset line 3: no 'messages' field"})
    cluster.apply(finetunejob("bad", ns, train=fail(2, message)))

    failed = wait_ftj(cluster, ns, "bad", has_condition("Trained", "False"))

    trained = condition(failed, "Trained")
    assert trained["reason"] == "ConfigurationError"
    assert "no 'messages' field" in trained["message"]
    assert failed["status"]["phase"] == "Failed"
    assert condition(failed, "Ready")["reason"] == "TrainingFailed"
    job = cluster.get("job", "bad-g1-train", ns)
    assert job is not None and job["status"].get("failed") == 1
    assert len(items(cluster, "pods", ns, _selector("bad", "trainer"))) == 1
    assert items(cluster, "jobs", ns, _selector("bad", "exporter")) == []
    assert any(e["type"] == "Warning" for e in events(cluster, ns, "bad"))


def test_disruption_is_retried_and_not_counted(cluster: Cluster, ns: str) -> None:
    cluster.apply(finetunejob("disrupted", ns, train=succeed("8s", REPORT)))
    first = wait_items(
        cluster, "pods", ns, _selector("disrupted", "trainer"),
        lambda ps: len(ps) == 1 and ps[0]["status"].get("phase") == "Running",
    )[0]  # fmt: skip
    # What the kubelet does to a preempted pod: DisruptionTarget, then phase Failed.
    patch = {
        "status": {
            "phase": "Failed",
            "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
            ],
        }
    }
    cluster.kubectl("patch", "pod", first["metadata"]["name"], "-n", ns, "--subresource=status",
                    "--type=merge", "-p", json.dumps(patch))  # fmt: skip

    wait_ftj(cluster, ns, "disrupted", has_condition("Trained"))

    pods = items(cluster, "pods", ns, _selector("disrupted", "trainer"))
    assert len(pods) == 2
    job = cluster.get("job", "disrupted-g1-train", ns)
    assert job is not None and not job["status"].get("failed")


def test_spec_change_rolls_a_new_generation_without_downtime(cluster: Cluster, ns: str) -> None:
    cluster.apply(finetunejob("roll", ns))
    _ready(cluster, ns, "roll")

    cluster.kubectl("patch", "ftj", "roll", "-n", ns, "--type=merge",
                    "-p", json.dumps({"spec": {"training": {"epochs": 1}}}))  # fmt: skip
    seen_generations = set()

    def rolled(obj: dict[str, Any]) -> bool:
        ready_pods = [
            p
            for p in items(cluster, "pods", ns, _selector("roll", "server"))
            if has_condition("Ready")(p) and p["status"]["phase"] == "Running"
        ]
        assert ready_pods, "no inference pod was Ready during the rollout"
        seen_generations.add(obj["status"].get("serving", {}).get("modelGeneration"))
        return bool(
            has_condition("Ready")(obj) and obj["status"]["serving"]["modelGeneration"] == 2
        )

    done = wait_ftj(cluster, ns, "roll", rolled, timeout=120)

    assert seen_generations <= {1, 2}
    assert done["status"]["observedGeneration"] == 2
    wait_items(cluster, "jobs", ns, _selector("roll", "trainer"),
               lambda js: [j["metadata"]["name"] for j in js] == ["roll-g2-train"])  # fmt: skip
    assert cluster.get("configmap", "roll-g1-config", ns) is None
    assert cluster.get("service", "roll-g1-rdzv", ns) is None
    deployment = cluster.get("deployment", "roll-server", ns)
    assert deployment is not None
    template = deployment["spec"]["template"]["metadata"]["annotations"]
    assert template["kubetune.io/model-generation"] == "2"


def test_failing_gate_keeps_the_old_model(cluster: Cluster, ns: str) -> None:
    cluster.apply(finetunejob("gated", ns))
    _ready(cluster, ns, "gated")

    worse = {**REPORT, "evalLoss": 2.5}
    patch = {
        "metadata": {"annotations": {"kubetune.io/pod-metadata": pod_metadata(
            train=succeed("1s", worse), export=succeed("1s"))}},
        "spec": {"serving": {"gate": {"maxEvalLoss": "2.0"}}, "training": {"epochs": 2}},
    }  # fmt: skip
    cluster.kubectl("patch", "ftj", "gated", "-n", ns, "--type=merge", "-p", json.dumps(patch))

    failed = wait_ftj(cluster, ns, "gated", has_condition("Ready", "False", "GateFailed"))

    ready = condition(failed, "Ready")
    assert "maxEvalLoss" in ready["message"] and "generation 1 keeps serving" in ready["message"]
    assert failed["status"]["evaluation"]["passed"] is False
    assert failed["status"]["serving"]["modelGeneration"] == 1
    assert condition(failed, "Serving")["status"] == "True"
    deployment = cluster.get("deployment", "gated-server", ns)
    assert deployment is not None
    assert deployment["spec"]["template"]["metadata"]["annotations"][
        "kubetune.io/model-generation"] == "1"  # fmt: skip


def test_a_generation_that_measures_nothing_is_not_passed_on_the_last_ones_numbers(
    cluster: Cluster, ns: str
) -> None:
    """Generation 1 passes `minAccuracy`; generation 2's trainer measures nothing, and its pod
    is gone (garbage-collected, a drained node) before the export ends, so the report is
    rebuilt from status. Status must hold only what generation 2 measured: the gate fails
    and generation 1 keeps serving."""
    gate = {"minAccuracy": "0.5"}
    cluster.apply(finetunejob("unmeasured", ns, serving={"gate": gate}))
    first = _ready(cluster, ns, "unmeasured")
    assert first["status"]["evaluation"]["accuracy"] == "0.8"

    nothing = {"status": "Succeeded", "steps": 20, "trainLoss": 1.3}
    patch = {
        "metadata": {"annotations": {"kubetune.io/pod-metadata": pod_metadata(
            train=succeed("1s", nothing), export=succeed("15s"))}},
        "spec": {"training": {"epochs": 2}},
    }  # fmt: skip
    cluster.kubectl("patch", "ftj", "unmeasured", "-n", ns, "--type=merge", "-p", json.dumps(patch))

    def trained_2(obj: dict[str, Any]) -> bool:
        evaluation = (obj.get("status") or {}).get("evaluation") or {}
        return evaluation.get("generation") == 2

    trained = wait_ftj(cluster, ns, "unmeasured", trained_2, what="generation 2 trained")
    evaluation = trained["status"]["evaluation"]
    assert {"accuracy", "evalLoss", "baseEvalLoss", "baseAccuracy", "passed"}.isdisjoint(
        evaluation
    ), evaluation
    trainers = "batch.kubernetes.io/job-name=unmeasured-g2-train"
    cluster.kubectl("delete", "pods", "-n", ns, "-l", trainers, "--wait=true", "--timeout=30s")

    failed = wait_ftj(cluster, ns, "unmeasured", has_condition("Ready", "False", "GateFailed"),
                      timeout=60)  # fmt: skip
    evaluation = failed["status"]["evaluation"]
    assert evaluation["generation"] == 2 and evaluation["passed"] is False
    assert "accuracy was not measured" in evaluation["message"], evaluation
    assert "accuracy" not in evaluation
    assert failed["status"]["serving"]["modelGeneration"] == 1
    deployment = cluster.get("deployment", "unmeasured-server", ns)
    assert deployment is not None
    assert deployment["spec"]["template"]["metadata"]["annotations"][
        "kubetune.io/model-generation"] == "1"  # fmt: skip


def test_deleting_the_job_garbage_collects_every_child(cluster: Cluster, ns: str) -> None:
    cluster.apply(finetunejob("doomed", ns, storage={"size": "1Gi"}))
    make_claim(cluster, ns, claim="doomed-artifacts")
    _ready(cluster, ns, "doomed")
    kinds = "jobs,pods,deployments,services,configmaps,pvc"
    assert items(cluster, kinds, ns, _selector("doomed"))

    cluster.kubectl("delete", "ftj", "doomed", "-n", ns, "--wait=true", "--timeout=60s")

    wait_items(cluster, kinds, ns, _selector("doomed"), lambda found: found == [], timeout=90,
               what="the garbage collector to remove every child")  # fmt: skip


def test_operator_restarted_mid_run_creates_no_duplicates(
    cluster: Cluster, ns: str, operator: OperatorProcess
) -> None:
    cluster.apply(finetunejob("restart", ns, train=succeed("10s", REPORT)))
    running = wait_ftj(cluster, ns, "restart", has_condition("Trained", "Unknown", "Running"))
    validated_at = condition(running, "Validated")["lastTransitionTime"]

    operator.restart(hard=True)  # SIGKILL: no clean shutdown, no Lease release

    ready = _ready(cluster, ns, "restart", timeout=120)
    assert condition(ready, "Validated")["lastTransitionTime"] == validated_at
    assert [j["metadata"]["name"] for j in items(cluster, "jobs", ns, _selector("restart"))] == [
        "restart-g1-export", "restart-g1-train"]  # fmt: skip
    assert len(items(cluster, "pods", ns, _selector("restart", "trainer"))) == 1
    assert len(items(cluster, "deployments", ns, _selector("restart"))) == 1


def test_suspend_and_resume_continue_the_same_generation(cluster: Cluster, ns: str) -> None:
    cluster.apply(finetunejob("pause", ns, train=succeed("6s", REPORT), serving={"enabled": False}))
    wait_ftj(cluster, ns, "pause", has_condition("Trained", "Unknown", "Running"))

    cluster.kubectl(
        "patch", "ftj", "pause", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    suspended = wait_ftj(cluster, ns, "pause", has_condition("Trained", "Unknown", "Suspended"))
    assert suspended["status"]["phase"] == "Suspended"
    wait_items(cluster, "pods", ns, _selector("pause", "trainer"),
               lambda ps: all(p["status"].get("phase") != "Running" for p in ps))  # fmt: skip
    job = cluster.get("job", "pause-g1-train", ns)
    assert job is not None and job["spec"]["suspend"] is True

    cluster.kubectl(
        "patch", "ftj", "pause", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    done = _ready(cluster, ns, "pause")

    assert done["status"]["observedGeneration"] == 3
    assert [j["metadata"]["name"] for j in items(cluster, "jobs", ns, _selector("pause"))] == [
        "pause-g1-train"]  # fmt: skip


def _gpu_holders(cluster: Cluster) -> list[str]:
    """Pods (of any test) that hold GPUs on the fake GPU nodes, terminating ones included."""
    pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    return [
        f"{p['metadata']['namespace']}/{p['metadata']['name']} on {p['spec']['nodeName']}"
        for p in pods
        if p["spec"].get("nodeName") in GPU_NODES
        and p["status"].get("phase") in ("Pending", "Running")
        and any(GPU in (c.get("resources") or {}).get("requests", {})
                for c in p["spec"]["containers"])
    ]


def test_two_node_job_lands_on_two_gpu_nodes(cluster: Cluster, ns: str) -> None:
    # Both nodes must be free of earlier tests' pods (their namespaces go in the background):
    # with one GPU taken on a node, the second 8-GPU pod can only follow the first onto the
    # other node once it finishes.
    wait_for(lambda: _gpu_holders(cluster) == [] or None, timeout=180,
             what="the GPU nodes to be free of other tests' pods", interval=1)
    # Each pod runs 15 s: long enough that both hold their 8 GPUs at once however slowly the
    # scheduler places the second (with 2 s, a loaded machine let the first finish and free
    # its node for the second).
    cluster.apply(finetunejob("wide", ns, resources={"nodes": 2, "gpusPerNode": 8},
                              train=succeed("15s", REPORT),
                              serving={"enabled": False}))  # fmt: skip
    wait_ftj(cluster, ns, "wide", has_condition("Trained"))

    job = cluster.get("job", "wide-g1-train", ns)
    assert job is not None
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["status"]["succeeded"] == 2
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--master_addr") + 1] == "wide-g1-train-0.wide-g1-rdzv"
    service = cluster.get("service", "wide-g1-rdzv", ns)
    assert service is not None and service["spec"]["publishNotReadyAddresses"] is True
    pods = items(cluster, "pods", ns, _selector("wide", "trainer"))
    assert {p["spec"]["nodeName"] for p in pods} == GPU_NODES, _gpu_holders(cluster)
    assert {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods
    } == {"0", "1"}


def test_more_gpus_than_any_node_has_is_reported(cluster: Cluster, ns: str) -> None:
    cluster.apply(finetunejob("greedy", ns, resources={"gpusPerNode": 16}))

    stuck = wait_ftj(cluster, ns, "greedy", has_condition("Trained", "Unknown", "Unschedulable"))

    assert f"Insufficient {GPU}" in condition(stuck, "Trained")["message"]
    assert stuck["status"]["phase"] == "Pending"


def test_missing_secret_blocks_training_until_it_exists(cluster: Cluster, ns: str) -> None:
    spec: dict[str, Any] = {
        "model": {"source": "builtin://smollm2-135m-instruct", "secretRef": {"name": "later"}}
    }
    cluster.apply(finetunejob("waits", ns, **spec))

    invalid = wait_ftj(
        cluster, ns, "waits", has_condition("Validated", "False", "MissingReference")
    )
    assert 'Secret "later" not found' in condition(invalid, "Validated")["message"]
    assert invalid["status"]["phase"] == "Invalid"
    assert items(cluster, "jobs", ns, _selector("waits")) == []

    cluster.kubectl("create", "secret", "generic", "later", "-n", ns, "--from-literal=token=x")

    wait_ftj(cluster, ns, "waits", has_condition("Validated"), timeout=60)
    assert cluster.get("job", "waits-g1-train", ns) is not None


def test_kueue_queue_label_creates_a_suspended_job(cluster: Cluster, ns: str) -> None:
    cluster.apply(finetunejob("queued", ns, labels={"kueue.x-k8s.io/queue-name": "gpu-queue"}))

    queued = wait_ftj(cluster, ns, "queued", has_condition("Trained", "Unknown", "Queued"))

    job = cluster.get("job", "queued-g1-train", ns)
    assert job is not None and job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert queued["status"]["phase"] == "Pending"


def test_progress_is_accepted_only_from_the_jobs_own_pods(
    cluster: Cluster, ns: str, operator: OperatorProcess
) -> None:
    for name in ("mine", "theirs"):
        cluster.apply(finetunejob(name, ns, train=succeed("120s", REPORT)))
    pods = {
        name: wait_items(cluster, "pods", ns, _selector(name, "trainer"),
                         lambda ps: len(ps) == 1 and ps[0]["status"].get("phase") == "Running")[0]
        for name in ("mine", "theirs")
    }  # fmt: skip
    token = pod_token(cluster, ns, pods["mine"]["metadata"]["name"], AUDIENCE)
    report = {"step": 30, "totalSteps": 120, "epoch": 0.75, "trainLoss": 1.4,
              "tokensPerSecond": 2100.5, "etaSeconds": 270}  # fmt: skip

    assert post_progress(operator.progress_url, ns, "mine", token, report) == 202
    assert post_progress(operator.progress_url, ns, "theirs", token, report) == 403
    # A token for another audience: tests/e2e/test_progress_auth.py, with one the API server
    # itself accepts, so that only KubeTune's audience check can refuse it.
    unbound = cluster.kubectl(
        "create", "token", "default", "-n", ns, "--audience", AUDIENCE
    ).stdout.strip()
    assert post_progress(operator.progress_url, ns, "mine", unbound, report) == 403

    mine = wait_ftj(
        cluster, ns, "mine", lambda o: (o["status"].get("progress") or {}).get("step") == 30
    )
    progress = mine["status"]["progress"]
    assert progress["percent"] == 25 and progress["totalSteps"] == 120
    assert progress["trainLoss"] == "1.4" and progress["tokensPerSecond"] == "2100.5"
    assert progress["etaSeconds"] == 270 and progress["updateTime"]
    theirs = cluster.get("ftj", "theirs", ns)
    assert theirs is not None and "progress" not in theirs["status"]


def test_a_second_operator_waits_for_the_lease(
    cluster: Cluster, operator: OperatorProcess, tmp_path: Any
) -> None:
    log = tmp_path / "second.log"
    second = OperatorProcess(cluster, tmp_path)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            second.argv(), stdout=out, stderr=subprocess.STDOUT, env=cluster.env
        )
    try:
        wait_for(lambda: "another operator holds lease" in log.read_text(), timeout=30,
                 what="the second operator to wait for the lease")  # fmt: skip
        lease = cluster.get("lease", "kubetune-operator", "default")
        assert lease is not None
        assert proc.poll() is None
        assert "Initial authentication" not in log.read_text()  # it never started kopf
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _job_uids(cluster: Cluster, ns: str, name: str) -> dict[str, str]:
    return {
        j["metadata"]["name"]: j["metadata"]["uid"]
        for j in items(cluster, "jobs", ns, _selector(name, "trainer"))
    }


def test_an_invalid_edit_and_a_deleted_job_keep_the_training_generation(
    cluster: Cluster, ns: str
) -> None:
    """At spec generation > 1 (a serving-only edit first): an invalid edit (the dataset on a
    claim that does not exist) leaves the running trainer Job and its children in place and
    says so; reverting it goes on with the same Job. A deleted trainer Job comes back under
    its own generation (recorded in status.training), not under the spec's."""
    cluster.apply(finetunejob("kept", ns, train=succeed("120s", REPORT)))
    wait_ftj(cluster, ns, "kept", has_condition("Trained", "Unknown", "Running"))
    serving_only = {"spec": {"serving": {"replicas": 2}}}
    cluster.kubectl("patch", "ftj", "kept", "-n", ns, "--type=merge",
                    "-p", json.dumps(serving_only))  # fmt: skip
    at_2 = wait_ftj(cluster, ns, "kept", lambda o: o["status"].get("observedGeneration") == 2)
    assert at_2["status"]["training"]["generation"] == 1
    running = _job_uids(cluster, ns, "kept")
    assert list(running) == ["kept-g1-train"]

    invalid = {"spec": {"dataset": {"source": "pvc://missing/train.jsonl"}}}
    cluster.kubectl("patch", "ftj", "kept", "-n", ns, "--type=merge", "-p", json.dumps(invalid))
    refused = wait_ftj(cluster, ns, "kept", has_condition("Validated", "False", "MissingReference"))

    message = condition(refused, "Validated")["message"]
    assert 'PersistentVolumeClaim "missing" not found' in message
    assert "generation 1 keeps running" in message, message
    assert refused["status"]["training"]["generation"] == 1
    assert _job_uids(cluster, ns, "kept") == running
    for kind, child in (("configmap", "kept-g1-config"), ("service", "kept-g1-rdzv")):
        assert cluster.get(kind, child, ns) is not None, child

    cluster.kubectl("patch", "ftj", "kept", "-n", ns, "--type=merge", "-p",
                    json.dumps({"spec": {"dataset": {"source": "builtin://kubectl-commands"}}}))
    reverted = wait_ftj(cluster, ns, "kept", lambda o: has_condition("Validated")(o)
                        and condition(o, "Validated")["observedGeneration"] == 4)  # fmt: skip
    assert reverted["status"]["training"]["generation"] == 1
    assert condition(reverted, "Trained")["reason"] == "Running"
    assert _job_uids(cluster, ns, "kept") == running

    # The Job's next pods end at once; then the trainer Job is deleted.
    quick = {"metadata": {"annotations": {"kubetune.io/pod-metadata": pod_metadata(
        train=succeed("1s", REPORT), export=succeed("1s"))}}}  # fmt: skip
    cluster.kubectl("patch", "ftj", "kept", "-n", ns, "--type=merge", "-p", json.dumps(quick))
    cluster.kubectl("delete", "job", "kept-g1-train", "-n", ns, "--wait=true", "--timeout=30s")
    back = wait_items(cluster, "jobs", ns, _selector("kept", "trainer"),
                      lambda js: bool(js) and js[0]["metadata"]["uid"] != running["kept-g1-train"],
                      what="the trainer Job to come back")  # fmt: skip
    assert [j["metadata"]["name"] for j in back] == ["kept-g1-train"]
    ready = _ready(cluster, ns, "kept", timeout=120)
    assert ready["status"]["serving"]["modelGeneration"] == 1
    assert ready["status"]["training"]["generation"] == 1
    assert sorted(j["metadata"]["name"] for j in items(cluster, "jobs", ns, _selector("kept"))) == [
        "kept-g1-export", "kept-g1-train"]  # fmt: skip
