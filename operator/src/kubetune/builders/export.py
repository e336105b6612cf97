"""The export Job: adapter merge -> ONNX Runtime GenAI model, after training succeeded."""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.api.dataplane import CONFIG_ERROR_EXIT_CODE
from kubetune.builders import naming, pod
from kubetune.builders.config import OperatorConfig
from kubetune.builders.meta import (
    Manifest,
    Owner,
    metadata,
    pod_metadata_overrides,
    with_job_hash,
)


def export_args(owner: Owner, generation: int, spec: FineTuneJobSpec) -> list[str]:
    run_dir = f"{naming.ARTIFACTS_MOUNT}/{naming.run_path(owner.name, generation)}"
    quantization = spec.serving.quantization
    return [
        "-m", "kubetune_trainer", "export",
        "--input", run_dir,
        "--output", f"{run_dir}/onnx",
        "--precision", spec.serving.precision.value,
        "--device", spec.serving.device.value,
        *([] if quantization is None else ["--quantization", quantization.value]),
    ]  # fmt: skip


def exporter_pod_spec(
    spec: FineTuneJobSpec,
    config: OperatorConfig,
    args: list[str],
    env: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """A pod that runs `kubetune_trainer` once in the trainer image, on the serving device's
    GPUs when there are any (an export for CUDA is built and checked on one)."""
    gpus = pod.serving_gpus(spec)
    container: dict[str, Any] = {
        "name": naming.EXPORTER_CONTAINER,
        "image": config.trainer_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python"],
        "args": args,
        "env": env,
        "volumeMounts": [*mounts, pod.tmp_mount()],
        "securityContext": pod.container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if gpus:
        amount = {spec.resources.gpu_resource: str(gpus)}
        container["resources"] = {"requests": dict(amount), "limits": dict(amount)}
    elif spec.resources.gpus_per_node == 0 and (requests := pod.trainer_cpu_and_memory(spec)):
        # Without requests the pod is BestEffort: on a node busy with Guaranteed trainers it
        # barely runs (a pool's base export waited 15 minutes behind two on 2 CPUs) and is
        # evicted first. Each CPU trainer pod's requests fit a node the trainers ran on, so
        # they fit once those are done. Not GPU trainers' amounts: those are sized for GPU
        # nodes, where a CPU export is not tolerated. No limits: a merge may need more.
        container["resources"] = {"requests": requests}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        **pod.base_pod_spec(config, config.trainer_service_account),
        "containers": [container],
        "volumes": [*volumes, pod.tmp_volume()],
    }
    tolerations = pod.gpu_tolerations(spec, gpus)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.resources.node_selector and gpus:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    return pod_spec


def export_failure_policy() -> dict[str, Any]:
    """A configuration error (exit code `CONFIG_ERROR_EXIT_CODE`) fails the Job at once: a
    retry would fail the same way. A pod evicted or preempted is retried without counting."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": naming.EXPORTER_CONTAINER,
                    "operator": "In",
                    "values": [CONFIG_ERROR_EXIT_CODE],
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def export_job(
    owner: Owner, generation: int, spec: FineTuneJobSpec, config: OperatorConfig
) -> Manifest:
    name = naming.export_job_name(owner.name, generation)
    extra_labels, extra_annotations = pod_metadata_overrides(owner, "export", config)
    pod_spec = exporter_pod_spec(
        spec, config, export_args(owner, generation, spec),
        env=[*pod.common_env(owner.name, generation), *pod.secret_env(spec)],
        mounts=[{"name": pod.ARTIFACTS_VOLUME, "mountPath": naming.ARTIFACTS_MOUNT}],
        volumes=[pod.artifacts_volume(pod.artifacts_claim(spec, owner.name))],
    )  # fmt: skip
    pod_labels = {**metadata(owner, name, naming.COMPONENT_EXPORTER, generation)["labels"]}
    return with_job_hash(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(owner, name, naming.COMPONENT_EXPORTER, generation),
            "spec": {
                "backoffLimit": config.export_backoff_limit,
                "podFailurePolicy": export_failure_policy(),
                "template": {
                    "metadata": {
                        "labels": {**pod_labels, **extra_labels},
                        "annotations": extra_annotations,
                    },
                    "spec": pod_spec,
                },
            },
        }
    )
