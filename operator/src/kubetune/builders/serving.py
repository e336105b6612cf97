"""Serving: one stable Deployment + Service per FineTuneJob, rolled to each passing model."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.api.dataplane import API_KEY_ENV
from kubetune.api.metrics import MetricScores
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


MODEL_VOLUME = "model"
MODEL_COPY_DEFAULT_SIZE = "50Gi"
"""`sizeLimit` of an inference pod's model copy when the artifact claim's size is not in the
spec (`storage.claimName`, a claim the user brings)."""


def serve_args(owner: Owner, model_generation: int, spec: FineTuneJobSpec) -> list[str]:
    """The server loads its own copy (see `model_copy`); the generation is the init
    container's business."""
    return [
        "-m", "kubetune_trainer", "serve",
        "--model", naming.MODEL_MOUNT,
        "--host", "0.0.0.0",
        "--port", str(naming.SERVING_PORT),
        # The FineTuneJob's name, the same for every generation: a client that worked before
        # a rollout keeps working after it (the generation is in status.serving).
        "--served-model-name", naming.served_model_name(owner.name),
        # The device the model was exported for: the server runs it on that device's
        # execution provider and stops with the reason where it cannot.
        "--device", spec.serving.device.value,
    ]  # fmt: skip


def api_key_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """The server's API key, from its Secret by a `secretKeyRef` (the value never passes
    through the operator, nor into the pod's args); none when the spec names no Secret."""
    ref = spec.serving.api_key_secret_ref
    if ref is None:
        return []
    secret = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
    return [{"name": API_KEY_ENV, "valueFrom": secret}]


def copy_container(
    source_mount: dict[str, Any], config: OperatorConfig, amounts: dict[str, str]
) -> dict[str, Any]:
    """The init container that copies the served export (mounted read-only by
    `source_mount` at `MODEL_SOURCE_MOUNT`) into the pod's own `MODEL_VOLUME`, with the
    server's CPU and memory and without its GPUs (see `model_copy` for why)."""
    copy_amounts = {key: value for key, value in amounts.items() if key in ("cpu", "memory")}
    return {
        "name": naming.MODEL_COPY_CONTAINER,
        "image": config.serving_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python"],
        "args": ["-m", "kubetune_trainer", "copy-model",
                 "--source", naming.MODEL_SOURCE_MOUNT, "--dest", naming.MODEL_MOUNT],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}],
        "resources": {"requests": dict(copy_amounts), "limits": dict(copy_amounts)},
        "volumeMounts": [
            {**source_mount, "mountPath": naming.MODEL_SOURCE_MOUNT, "readOnly": True},
            {"name": MODEL_VOLUME, "mountPath": naming.MODEL_MOUNT},
            pod.tmp_mount(),
        ],
        "securityContext": pod.container_security_context(),
        # A missing export is said in the termination message, which the pod's status shows.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def model_copy(
    owner: Owner,
    model_generation: int,
    spec: FineTuneJobSpec,
    config: OperatorConfig,
    amounts: dict[str, str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(init container, volumes): the served export, copied off the artifact claim into an
    emptyDir before the server starts, as KServe's storage initializer copies a model into
    an emptyDir for its server.

    The server container never mounts the claim: it reads a local copy, so it does not
    depend on the claim staying reachable, and a trainer writing the next generation shares
    nothing with it. Only the init container mounts the claim, read-only, and only this
    generation's export (`subPath`). Kubernetes still attaches a pod's volumes for the
    pod's whole life, not per container: on ReadWriteOnce storage the claim's node still
    decides where every pod that uses it can start (docs/storage.md), and a pod left waiting
    for it is reported (`kubetune.reconcile.attach`).

    The copy is on disk (no `medium: Memory`: a model would count against the pod's memory
    limit), limited to the claim's size (an export is no larger than the volume holding it),
    or `MODEL_COPY_DEFAULT_SIZE` for a claim the user brings. It runs in the server's image
    with the server's CPU and memory (the pod's request, the larger of the two, stays the
    same; a quota that wants limits admits it) and without its GPUs.
    """
    size = MODEL_COPY_DEFAULT_SIZE
    if not spec.storage.claim_name:
        size = spec.storage.size or config.default_storage_size
    source = {"name": pod.ARTIFACTS_VOLUME,
              "subPath": naming.export_path(owner.name, model_generation)}  # fmt: skip
    volumes = [
        pod.artifacts_volume(pod.artifacts_claim(spec, owner.name), read_only=True),
        {"name": MODEL_VOLUME, "emptyDir": {"sizeLimit": size}},
    ]
    return copy_container(source, config, amounts), volumes


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def server_amounts(spec: FineTuneJobSpec) -> dict[str, str]:
    """A server pod's CPU, memory and GPUs (requests = limits)."""
    resources = spec.serving.resources
    cpu, memory = (resources.cpu, resources.memory) if resources else ("2", "4Gi")
    amounts = {"cpu": cpu, "memory": memory}
    gpus = pod.serving_gpus(spec)
    if gpus:
        amounts[spec.resources.gpu_resource] = str(gpus)
    return amounts


def server_container(
    args: list[str],
    spec: FineTuneJobSpec,
    config: OperatorConfig,
    *,
    extra_env: list[dict[str, Any]],
    extra_mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    """The inference server's container, reading its model from `MODEL_VOLUME`."""
    amounts = server_amounts(spec)
    return {
        "name": naming.SERVER_CONTAINER,
        "image": config.serving_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python"],
        "args": args,
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
            # The server reads every flag from KUBETUNE_SERVE_<FLAG> too: this is --max-tokens.
            {"name": "KUBETUNE_SERVE_MAX_TOKENS", "value": str(spec.serving.max_tokens_limit)},
            # After SIGTERM: not ready, still serving while endpoints drop the pod, then
            # in-flight requests finish within the grace period.
            {"name": "KUBETUNE_SERVE_DRAIN_SECONDS", "value": str(DRAIN_SECONDS)},
            {"name": "KUBETUNE_SERVE_GRACE_SECONDS", "value": str(GRACE_SECONDS)},
            *extra_env,
        ],
        "ports": [{"name": "http", "containerPort": naming.SERVING_PORT}],
        # The probes send no API key: /readyz and /healthz never ask for one.
        "readinessProbe": _probe("/readyz", 5, 3),
        "livenessProbe": {**_probe("/healthz", 10, 3), "initialDelaySeconds": 30},
        "startupProbe": _probe("/healthz", 5, 60),  # loading a model may take minutes
        # The server writes why its model failed to load; a crash that wrote nothing leaves
        # the log's tail. Either is the pod's last termination message, in the status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": [
            {"name": MODEL_VOLUME, "mountPath": naming.MODEL_MOUNT, "readOnly": True},
            *extra_mounts,
            pod.tmp_mount(),
        ],
        "securityContext": pod.container_security_context(),
    }


def server_pod_spec(
    spec: FineTuneJobSpec,
    config: OperatorConfig,
    copy: dict[str, Any],
    server: dict[str, Any],
    volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """A server pod: the model copy, then the server, given time to drain on SIGTERM."""
    pod_spec: dict[str, Any] = {
        **pod.base_pod_spec(config, config.serving_service_account),
        "initContainers": [copy],
        "containers": [server],
        "terminationGracePeriodSeconds": DRAIN_SECONDS + GRACE_SECONDS + 5,
        "volumes": [*volumes, pod.tmp_volume()],
    }
    tolerations = pod.gpu_tolerations(spec, pod.serving_gpus(spec))
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return pod_spec


def rolling_deployment(
    meta: dict[str, Any],
    replicas: int,
    selector: dict[str, str],
    template_metadata: dict[str, Any],
    pod_spec: dict[str, Any],
) -> Manifest:
    """`maxUnavailable: 0`: the old pods answer until the new ones are Ready."""
    return with_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": selector},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "template": {"metadata": template_metadata, "spec": pod_spec},
            },
        }
    )


def http_service(meta: dict[str, Any], selector: dict[str, str]) -> Manifest:
    """The ClusterIP Service in front of server pods, on the OpenAI API's port."""
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "type": "ClusterIP",
                "selector": selector,
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


def serving_deployment(
    owner: Owner,
    model_generation: int,
    model_eval_loss: str | None,
    spec: FineTuneJobSpec,
    config: OperatorConfig,
    model_scores: MetricScores | None = None,
) -> Manifest:
    """The model generation sits in the pod template, so a new one rolls the Deployment;
    `maxUnavailable: 0` keeps the old pods answering until the new ones are Ready. The
    model's eval loss and metrics (`model_scores`) sit in the Deployment's own annotations
    (changing them rolls nothing), for the gate of the next generation."""
    name = naming.serving_name(owner.name)
    extra_labels, extra_annotations = pod_metadata_overrides(owner, "serve", config)
    pod_labels = {
        **metadata(owner, name, naming.COMPONENT_SERVER, model_generation)["labels"],
        **extra_labels,
    }
    server = server_container(serve_args(owner, model_generation, spec), spec, config,
                              extra_env=api_key_env(spec), extra_mounts=[])  # fmt: skip
    copy, copy_volumes = model_copy(owner, model_generation, spec, config, server_amounts(spec))
    annotations = {naming.ANNOTATION_MODEL_GENERATION: str(model_generation)}
    if model_eval_loss is not None:
        annotations[naming.ANNOTATION_MODEL_EVAL_LOSS] = model_eval_loss
    if model_scores is not None and model_scores.values:
        annotations[naming.ANNOTATION_MODEL_METRICS] = json.dumps(
            {str(metric): value for metric, value in sorted(model_scores.values.items())},
            separators=(",", ":"),
        )
    return rolling_deployment(
        metadata(owner, name, naming.COMPONENT_SERVER, model_generation, annotations=annotations),
        spec.serving.replicas,
        selector_labels(owner, naming.COMPONENT_SERVER),
        {
            "labels": pod_labels,
            "annotations": {
                **extra_annotations,
                naming.ANNOTATION_MODEL_GENERATION: str(model_generation),
            },
        },
        server_pod_spec(spec, config, copy, server, copy_volumes),
    )


def serving_service(owner: Owner) -> Manifest:
    name = naming.serving_name(owner.name)
    return http_service(
        metadata(owner, name, naming.COMPONENT_SERVER, None),
        selector_labels(owner, naming.COMPONENT_SERVER),
    )
