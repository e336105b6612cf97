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


def export_job(
    owner: Owner, generation: int, spec: FineTuneJobSpec, config: OperatorConfig
) -> Manifest:
    name = naming.export_job_name(owner.name, generation)
    extra_labels, extra_annotations = pod_metadata_overrides(owner, "export", config)
    gpus = pod.serving_gpus(spec)
    container: dict[str, Any] = {
        "name": naming.EXPORTER_CONTAINER,
        "image": config.trainer_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python"],
        "args": export_args(owner, generation, spec),
        "env": [*pod.common_env(owner.name, generation), *pod.secret_env(spec)],
        "volumeMounts": [
            {"name": pod.ARTIFACTS_VOLUME, "mountPath": naming.ARTIFACTS_MOUNT},
            pod.tmp_mount(),
        ],
        "securityContext": pod.container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if gpus:
        amount = {spec.resources.gpu_resource: str(gpus)}
        container["resources"] = {"requests": dict(amount), "limits": dict(amount)}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        **pod.base_pod_spec(config, config.trainer_service_account),
        "containers": [container],
        "volumes": [pod.artifacts_volume(pod.artifacts_claim(spec, owner.name)), pod.tmp_volume()],
    }
    tolerations = pod.gpu_tolerations(spec, gpus)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.resources.node_selector and gpus:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    pod_labels = {**metadata(owner, name, naming.COMPONENT_EXPORTER, generation)["labels"]}
    return with_job_hash(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(owner, name, naming.COMPONENT_EXPORTER, generation),
            "spec": {
                "backoffLimit": config.export_backoff_limit,
                "podFailurePolicy": {
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
                },
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
