"""Pure manifest builders: the children a FineTuneJob turns into."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api import FineTuneJobSpec, RunConfig
from kubetune.api.dataplane import API_KEY_ENV, JUDGE_API_KEY_ENV
from kubetune.builders import naming
from kubetune.builders.config import OperatorConfig
from kubetune.builders.export import export_job
from kubetune.builders.meta import Owner, manifest_hash, training_hash
from kubetune.builders.pod import referenced_secrets
from kubetune.builders.serving import serving_deployment, serving_service
from kubetune.builders.training import (
    artifacts_claim,
    rendezvous_service,
    run_config_map,
    training_job,
)
from tests.unit.operator_fixtures import CONFIG, body, plan, spec_dict

STANDARD_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "kubetune.io/job",
}


def _owner(**meta: Any) -> Owner:
    return Owner.from_body(body(**meta))


def _spec(**overrides: object) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(spec_dict(**overrides))


def _job(
    spec: FineTuneJobSpec, owner: Owner | None = None, config: OperatorConfig = CONFIG
) -> dict:
    return training_job(owner or _owner(), 3, spec, config, "hash")


def _pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def test_every_child_has_owner_reference_and_standard_labels() -> None:
    owner, spec = _owner(), _spec()
    children = [
        artifacts_claim(owner, spec, CONFIG),
        run_config_map(owner, 3, spec, plan(), {}),
        rendezvous_service(owner, 3),
        training_job(owner, 3, spec, CONFIG, "hash"),
        export_job(owner, 3, spec, CONFIG),
        serving_deployment(owner, 3, "0.5", spec, CONFIG),
        serving_service(owner),
    ]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "team"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "demo",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert set(meta["labels"]) >= STANDARD_LABELS, child["kind"]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
        assert naming.ANNOTATION_HASH in meta["annotations"]
    per_generation = [c for c in children if c["kind"] in ("ConfigMap", "Job", "Deployment")]
    assert all(c["metadata"]["labels"]["kubetune.io/generation"] == "3" for c in per_generation)


def test_training_job_is_indexed_with_gpu_requests_equal_to_limits() -> None:
    spec = _spec(resources={"nodes": 2, "gpusPerNode": 4, "cpu": "8", "memory": "64Gi"})
    job = _job(spec)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    resources = _pod_spec(job)["containers"][0]["resources"]
    assert (
        resources["requests"]
        == resources["limits"]
        == {
            "nvidia.com/gpu": "4",
            "cpu": "8",
            "memory": "64Gi",
        }
    )
    assert _pod_spec(job)["subdomain"] == "demo-g3-rdzv"


def test_multi_node_torchrun_takes_rank_from_completion_index_and_rank0_via_service() -> None:
    job = _job(_spec(resources={"nodes": 2, "gpusPerNode": 8}))
    container = _pod_spec(job)["containers"][0]
    args = container["args"]
    assert container["command"] == ["torchrun"]
    assert args[args.index("--nnodes") + 1] == "2"
    assert args[args.index("--nproc_per_node") + 1] == "8"
    assert args[args.index("--node_rank") + 1] == "$(NODE_RANK)"
    assert args[args.index("--master_addr") + 1] == "demo-g3-train-0.demo-g3-rdzv"
    assert args[args.index("--master_port") + 1] == "29500"
    assert args[args.index("-m") :] == [
        "-m", "kubetune_trainer", "train",
        "--config", "/etc/kubetune/run.json", "--output", "/artifacts/demo/gen-3",
    ]  # fmt: skip
    rank = next(e for e in container["env"] if e["name"] == "NODE_RANK")
    assert "job-completion-index" in rank["valueFrom"]["fieldRef"]["fieldPath"]


def test_single_node_uses_a_standalone_rendezvous_and_cpu_training_one_process() -> None:
    args = _pod_spec(_job(_spec(resources={"gpusPerNode": 0})))["containers"][0]["args"]
    assert args[:5] == ["--standalone", "--nnodes", "1", "--nproc_per_node", "1"]


def test_tolerations_node_selector_shm_and_artifact_volume() -> None:
    spec = _spec(
        resources={
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            "sharedMemory": "16Gi",
        }
    )
    pod_spec = _pod_spec(_job(spec))
    assert pod_spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists", "effect": "NoSchedule"},
    ]
    assert pod_spec["nodeSelector"] == {"gpu": "a100"}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == "demo-artifacts"
    token = volumes["progress-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "kubetune.io/progress"


def test_restricted_security_context_and_failure_policy() -> None:
    job = _job(_spec())
    pod_spec = _pod_spec(job)
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec["automountServiceAccountToken"] is False
    container = pod_spec["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert pod_spec["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == [2]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert job["spec"]["backoffLimit"] == CONFIG.training_backoff_limit


def test_data_plane_pods_run_as_the_configured_service_accounts() -> None:
    config = OperatorConfig(
        trainer_service_account="kubetune-trainer", serving_service_account="kubetune-serving"
    )
    spec = _spec()
    trainer = _pod_spec(_job(spec, config=config))
    exporter = _pod_spec(export_job(_owner(), 3, spec, config))
    server = _pod_spec(serving_deployment(_owner(), 3, None, spec, config))
    assert trainer["serviceAccountName"] == "kubetune-trainer"
    assert exporter["serviceAccountName"] == "kubetune-trainer"
    assert server["serviceAccountName"] == "kubetune-serving"
    for pod_spec in (trainer, exporter, server):
        assert pod_spec["automountServiceAccountToken"] is False
    # The progress token is a projected volume: it needs no automounted API token.
    [progress] = [v for v in trainer["volumes"] if v["name"] == "progress-token"]
    [source] = progress["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == config.progress_audience


def test_no_service_account_configured_leaves_the_namespace_default() -> None:
    spec = _spec()
    pod_specs = [
        _pod_spec(_job(spec, config=OperatorConfig())),
        _pod_spec(export_job(_owner(), 3, spec, OperatorConfig())),
        _pod_spec(serving_deployment(_owner(), 3, None, spec, OperatorConfig())),
    ]
    for pod_spec in pod_specs:
        assert "serviceAccountName" not in pod_spec
        assert pod_spec["automountServiceAccountToken"] is False


def test_deadline_and_suspend_reach_the_job() -> None:
    job = _job(_spec(activeDeadlineSeconds=600, suspend=True))
    assert job["spec"]["activeDeadlineSeconds"] == 600
    assert job["spec"]["suspend"] is True


def test_kueue_queue_label_is_passed_on_and_job_created_suspended() -> None:
    owner = _owner(labels={"kueue.x-k8s.io/queue-name": "gpus", "team": "x"})
    job = _job(_spec(), owner)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    assert "team" not in job["metadata"]["labels"]
    assert job["spec"]["suspend"] is True


def test_secrets_only_as_secret_key_ref_env() -> None:
    spec = _spec(model={"source": "hf://org/m", "secretRef": {"name": "hf", "key": "tok"}})
    job = _job(spec)
    env = {e["name"]: e for e in _pod_spec(job)["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}
    config_map = run_config_map(_owner(), 3, spec, plan(), {})
    assert "valueFrom" not in json.dumps(config_map)


def test_the_api_key_reaches_only_the_server_and_only_as_a_secret_key_ref() -> None:
    spec = _spec(serving={"apiKeySecretRef": {"name": "inference-key", "key": "api-key"}})
    deployment = serving_deployment(_owner(), 3, None, spec, CONFIG)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[API_KEY_ENV] == {
        "name": API_KEY_ENV,
        "valueFrom": {"secretKeyRef": {"name": "inference-key", "key": "api-key"}},
    }
    assert not any("api-key" in arg for arg in container["args"])  # not in `ps`, not in args
    # The kubelet's probes send no key: they stay on the routes that need none.
    assert {container[probe]["httpGet"]["path"] for probe in
            ("readinessProbe", "livenessProbe", "startupProbe")} <= {"/readyz", "/healthz"}
    for other in (_job(spec), export_job(_owner(), 3, spec, CONFIG),
                  run_config_map(_owner(), 3, spec, plan(), {})):
        assert API_KEY_ENV not in json.dumps(other)  # trainers never hold it
    assert "inference-key" in referenced_secrets(spec)  # looked up before training starts
    unsecured = serving_deployment(_owner(), 3, None, _spec(), CONFIG)
    assert API_KEY_ENV not in json.dumps(unsecured)


def test_the_judges_key_reaches_only_the_trainer_and_only_as_a_secret_key_ref() -> None:
    judge = {"endpoint": "https://judge.example/v1", "model": "judge",
             "apiKeySecretRef": {"name": "judge-key", "key": "token"}}
    spec = _spec(evaluation={"task": "Chat", "judge": judge})
    job = _job(spec)
    [container] = _pod_spec(job)["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[JUDGE_API_KEY_ENV] == {
        "name": JUDGE_API_KEY_ENV,
        "valueFrom": {"secretKeyRef": {"name": "judge-key", "key": "token"}},
    }
    assert not any("judge-key" in arg for arg in [*container.get("command", []),
                                                  *container.get("args", [])])
    config_map = run_config_map(_owner(), 3, spec, plan(), {})
    assert JUDGE_API_KEY_ENV not in json.dumps(config_map)
    # The run config names the Secret (the spec), never holds its value.
    assert "valueFrom" not in json.dumps(config_map)
    for other in (export_job(_owner(), 3, spec, CONFIG),
                  serving_deployment(_owner(), 3, None, spec, CONFIG)):
        assert JUDGE_API_KEY_ENV not in json.dumps(other)  # only the trainer asks the judge
    assert "judge-key" in referenced_secrets(spec)  # looked up before training starts
    keyless = _spec(evaluation={"task": "Chat", "judge": {"endpoint": judge["endpoint"],
                                                           "model": "judge"}})
    assert JUDGE_API_KEY_ENV not in json.dumps(_job(keyless))
    assert JUDGE_API_KEY_ENV not in json.dumps(_job(_spec()))


def test_config_map_holds_a_valid_run_config() -> None:
    spec = _spec(training={"maxSteps": 7})
    config_map = run_config_map(_owner(), 3, spec, plan(), {"train_batch_size": 4})
    run = RunConfig.model_validate_json(config_map["data"]["run.json"])
    assert run.name == "demo" and run.namespace == "team" and run.generation == 3
    assert run.spec.training.max_steps == 7
    assert run.deepspeed == {"train_batch_size": 4}


def test_headless_service_publishes_not_ready_addresses() -> None:
    service = rendezvous_service(_owner(), 3)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_pvc_only_rwx_for_multi_node_and_uses_size_and_class() -> None:
    one = artifacts_claim(_owner(), _spec(storage={"size": "5Gi"}), CONFIG)
    assert one["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one["spec"]["resources"]["requests"]["storage"] == "5Gi"
    many = artifacts_claim(
        _owner(), _spec(resources={"nodes": 2}, storage={"storageClassName": "nfs"}), CONFIG
    )
    assert many["spec"]["accessModes"] == ["ReadWriteMany"]
    assert many["spec"]["storageClassName"] == "nfs"


def test_export_job_command() -> None:
    job = export_job(_owner(), 3, _spec(serving={"precision": "INT4"}), CONFIG)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        "-m", "kubetune_trainer", "export",
        "--input", "/artifacts/demo/gen-3", "--output", "/artifacts/demo/gen-3/onnx",
        "--precision", "INT4", "--device", "CPU",
    ]  # fmt: skip
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    chosen = export_job(
        _owner(), 3, _spec(serving={"precision": "INT4", "quantization": "KQuantMixed"}), CONFIG
    )
    args = chosen["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--quantization", "KQuantMixed"]


def test_deployment_rolls_with_zero_unavailable_and_generation_in_template() -> None:
    deployment = serving_deployment(
        _owner(), 3, "0.5", _spec(serving={"replicas": 2}), CONFIG
    )
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["kubetune.io/model-generation"] == "3"
    assert "kubetune.io/generation" not in deployment["spec"]["selector"]["matchLabels"]
    container = template["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    [copy] = template["spec"]["initContainers"]  # the server loads generation 3's export
    assert copy["volumeMounts"][0]["subPath"] == "demo/gen-3/onnx"
    service = serving_service(_owner())
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8000


def test_pod_metadata_annotation_only_when_allowed() -> None:
    extra = {"train": {"labels": {"fail": "true"}, "annotations": {"delay": "3s"}}}
    owner = _owner(annotations={naming.ANNOTATION_POD_METADATA: json.dumps(extra)})
    allowed = _job(_spec(), owner)["spec"]["template"]["metadata"]
    assert allowed["labels"]["fail"] == "true" and allowed["annotations"] == {"delay": "3s"}
    refused = _job(_spec(), owner, OperatorConfig())["spec"]["template"]["metadata"]
    assert "fail" not in refused["labels"] and refused["annotations"] == {}


def test_hash_changes_with_content_only() -> None:
    spec = _spec()
    assert manifest_hash(_job(spec)) == manifest_hash(_job(spec))
    assert manifest_hash(_job(spec)) != manifest_hash(_job(_spec(suspend=True)))


@pytest.mark.parametrize(
    ("change", "new_generation"),
    [
        ({"suspend": True}, False),
        ({"activeDeadlineSeconds": 60}, False),
        ({"serving": {"replicas": 3}}, False),
        ({"serving": {"precision": "INT4"}}, True),
        ({"training": {"epochs": 1}}, True),
    ],
)
def test_training_hash_ignores_what_needs_no_new_training(
    change: dict[str, object], new_generation: bool
) -> None:
    before = training_hash(_spec())
    assert (training_hash(_spec(**change)) != before) is new_generation


def test_long_names_stay_valid_dns_labels() -> None:
    name = "x" * 63
    assert len(naming.training_job_name(name, 12)) <= 59
    assert len(naming.rendezvous_service_name(name, 12)) <= 63
    assert naming.training_job_name(name, 12) != naming.training_job_name(name, 13)


def test_a_trainer_pod_has_time_to_checkpoint_after_sigterm() -> None:
    """On SIGTERM the trainer checkpoints at its next step boundary (kubetune_trainer's
    train.stop): the pod's grace must outlast torchrun's wait for its workers, and both must
    be well beyond the kubelet's and torchrun's 30 s defaults."""
    pod_spec = _pod_spec(_job(_spec()))
    grace = pod_spec["terminationGracePeriodSeconds"]
    env = {e["name"]: e.get("value") for e in pod_spec["containers"][0]["env"]}
    torchrun_wait = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert 30 < torchrun_wait < grace
    assert grace == 300


@pytest.mark.parametrize(
    ("serving", "gpus"),
    [
        pytest.param({"device": "CUDA"}, "1", id="cuda-default-resources"),
        pytest.param({"device": "CUDA", "resources": {"gpus": 2}}, "2", id="cuda-two-gpus"),
        pytest.param({"device": "CPU", "resources": {"gpus": 2}}, None, id="cpu-ignores-gpus"),
        pytest.param({}, None, id="cpu-default"),
    ],
)
def test_a_cuda_inference_pod_requests_its_gpus_and_tells_the_server_its_device(
    serving: dict[str, object], gpus: str | None
) -> None:
    """`serving.device: CUDA` without `serving.resources` used to render no GPU at all: the
    pod landed on a CPU node and a CUDA export could not run there. The exporter, which builds
    for the same device, gets the same GPUs."""
    spec = _spec(serving=serving)
    server = _pod_spec(serving_deployment(_owner(), 3, None, spec, CONFIG))
    exporter = _pod_spec(export_job(_owner(), 3, spec, CONFIG))
    [container] = server["containers"]
    [export_container] = exporter["containers"]
    for pod_spec, resources in ((server, container["resources"]),
                                (exporter, export_container.get("resources", {}))):
        for amounts in (resources.get("requests", {}), resources.get("limits", {})):
            assert amounts.get("nvidia.com/gpu") == gpus
        tolerated = {t["key"] for t in pod_spec.get("tolerations", [])}
        assert ("nvidia.com/gpu" in tolerated) is (gpus is not None)
    args = container["args"]
    assert args[args.index("--device") + 1] == spec.serving.device.value


@pytest.mark.parametrize(
    ("resources", "requests"),
    [
        pytest.param(
            {"gpusPerNode": 0, "cpu": "800m", "memory": "5Gi"},
            {"cpu": "800m", "memory": "5Gi"},
            id="cpu-trainers",
        ),
        pytest.param({"gpusPerNode": 0, "cpu": "2"}, {"cpu": "2"}, id="cpu-only"),
        pytest.param({"gpusPerNode": 0}, None, id="nothing-to-go-on"),
        pytest.param({"gpusPerNode": 1, "cpu": "16", "memory": "64Gi"}, None, id="gpu-trainers"),
    ],
)
def test_a_cpu_export_asks_for_what_a_cpu_trainer_pod_asked(
    resources: dict[str, object], requests: dict[str, str] | None
) -> None:
    """A BestEffort export starved behind the node's Guaranteed trainers (a pool's base export
    waited 15 minutes on the real node). It asks for a trainer pod's CPU and memory, which fit
    where the trainers ran, never a limit, and nothing sized for GPU nodes."""
    spec = _spec(resources=resources, serving={"device": "CPU"})
    [container] = _pod_spec(export_job(_owner(), 3, spec, CONFIG))["containers"]
    if requests is None:
        assert "resources" not in container
    else:
        assert container["resources"] == {"requests": requests}
