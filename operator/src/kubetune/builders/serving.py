"""Serving: one stable Deployment + Service per FineTuneJob, rolled to each passing model."""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders import naming, pod
from kubetune.builders.config import OperatorConfig
from kubetune.builders.meta import (
    Manifest,
    Owner,
    metadata,
    pod_metadata_overrides,
    selector_labels,
    with_hash,
)

DRAIN_SECONDS = 5
"""Seconds a terminating inference pod keeps serving while the Service's endpoints drop it
(kube-proxy and ingress controllers see the change within a few seconds)."""
GRACE_SECONDS = 30
"""Seconds it then gives requests already in flight to finish."""


def serve_args(owner: Owner, model_generation: int, spec: FineTuneJobSpec) -> list[str]:
    model_dir = f"{naming.ARTIFACTS_MOUNT}/{naming.run_path(owner.name, model_generation)}/onnx"
    return [
        "-m", "kubetune_trainer", "serve",
        "--model", model_dir,
        "--host", "0.0.0.0",
        "--port", str(naming.SERVING_PORT),
        # The FineTuneJob's name, the same for every generation: a client that worked before
        # a rollout keeps working after it (the generation is in status.serving).
        "--served-model-name", naming.served_model_name(owner.name),
        # The device the model was exported for: the server runs it on that device's
        # execution provider and stops with the reason where it cannot.
        "--device", spec.serving.device.value,
    ]  # fmt: skip


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def serving_deployment(
    owner: Owner,
    model_generation: int,
    model_eval_loss: str | None,
    spec: FineTuneJobSpec,
    config: OperatorConfig,
) -> Manifest:
    """The model generation sits in the pod template, so a new one rolls the Deployment;
    `maxUnavailable: 0` keeps the old pods answering until the new ones are Ready."""
    name = naming.serving_name(owner.name)
    resources = spec.serving.resources
    cpu, memory = (resources.cpu, resources.memory) if resources else ("2", "4Gi")
    gpus = pod.serving_gpus(spec)
    amounts = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts[spec.resources.gpu_resource] = str(gpus)
    extra_labels, extra_annotations = pod_metadata_overrides(owner, "serve", config)
    pod_labels = {
        **metadata(owner, name, naming.COMPONENT_SERVER, model_generation)["labels"],
        **extra_labels,
    }
    container = {
        "name": naming.SERVER_CONTAINER,
        "image": config.serving_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python"],
        "args": serve_args(owner, model_generation, spec),
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
            # The server reads every flag from KUBETUNE_SERVE_<FLAG> too: this is --max-tokens.
            {"name": "KUBETUNE_SERVE_MAX_TOKENS", "value": str(spec.serving.max_tokens_limit)},
            # After SIGTERM: not ready, still serving while endpoints drop the pod, then
            # in-flight requests finish within the grace period.
            {"name": "KUBETUNE_SERVE_DRAIN_SECONDS", "value": str(DRAIN_SECONDS)},
            {"name": "KUBETUNE_SERVE_GRACE_SECONDS", "value": str(GRACE_SECONDS)},
        ],
        "ports": [{"name": "http", "containerPort": naming.SERVING_PORT}],
        "readinessProbe": _probe("/readyz", 5, 3),
        "livenessProbe": {**_probe("/healthz", 10, 3), "initialDelaySeconds": 30},
        "startupProbe": _probe("/healthz", 5, 60),  # loading a model may take minutes
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": [
            {"name": pod.ARTIFACTS_VOLUME, "mountPath": naming.ARTIFACTS_MOUNT, "readOnly": True},
            pod.tmp_mount(),
        ],
        "securityContext": pod.container_security_context(),
    }
    pod_spec: dict[str, Any] = {
        **pod.base_pod_spec(config, config.serving_service_account),
        "containers": [container],
        "terminationGracePeriodSeconds": DRAIN_SECONDS + GRACE_SECONDS + 5,
        "volumes": [
            pod.artifacts_volume(pod.artifacts_claim(spec, owner.name), read_only=True),
            pod.tmp_volume(),
        ],
    }
    tolerations = pod.gpu_tolerations(spec, gpus)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    annotations = {naming.ANNOTATION_MODEL_GENERATION: str(model_generation)}
    if model_eval_loss is not None:
        annotations[naming.ANNOTATION_MODEL_EVAL_LOSS] = model_eval_loss
    return with_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(
                owner, name, naming.COMPONENT_SERVER, model_generation, annotations=annotations
            ),
            "spec": {
                "replicas": spec.serving.replicas,
                "selector": {"matchLabels": selector_labels(owner, naming.COMPONENT_SERVER)},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "template": {
                    "metadata": {
                        "labels": pod_labels,
                        "annotations": {
                            **extra_annotations,
                            naming.ANNOTATION_MODEL_GENERATION: str(model_generation),
                        },
                    },
                    "spec": pod_spec,
                },
            },
        }
    )


def serving_service(owner: Owner) -> Manifest:
    name = naming.serving_name(owner.name)
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(owner, name, naming.COMPONENT_SERVER, None),
            "spec": {
                "type": "ClusterIP",
                "selector": selector_labels(owner, naming.COMPONENT_SERVER),
                "ports": [
                    {
                        "name": "http",
                        "port": naming.SERVING_PORT,
                        "targetPort": "http",
                        "protocol": "TCP",
                    }
                ],
            },
        }
    )
