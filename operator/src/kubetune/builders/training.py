"""Per-generation training children: run-config ConfigMap, headless Service, Indexed Job, PVC."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kubetune.api import FineTuneJobSpec, PlanStatus, RunConfig
from kubetune.api.dataplane import CONFIG_ERROR_EXIT_CODE, JUDGE_API_KEY_ENV
from kubetune.builders import naming, pod
from kubetune.builders.config import OperatorConfig
from kubetune.builders.meta import (
    Manifest,
    Owner,
    metadata,
    pod_metadata_overrides,
    with_hash,
    with_job_hash,
)

STOP_GRACE_SECONDS = 300
"""How long a trainer pod has after SIGTERM (eviction, preemption, its Job deleted) to reach
the next step boundary and write its checkpoint; the kubelet's default 30 s is shorter than
one step plus a checkpoint of a large model."""
TORCHRUN_SHUTDOWN_SECONDS = STOP_GRACE_SECONDS - 15
"""torchrun waits this long for its workers after passing SIGTERM on, then SIGKILLs them
(its own default is 30 s). Shorter than the pod's grace, so torchrun ends first, not the
kubelet's SIGKILL."""


def artifacts_claim(
    owner: Owner,
    spec: FineTuneJobSpec,
    config: OperatorConfig,
    existing_access_modes: Sequence[str] | None = None,
) -> Manifest:
    """The artifact PVC KubeTune creates when `spec.storage.claimName` is not set.

    ReadWriteMany only for multi-node jobs (every rank writes checkpoints); single-node jobs
    work with the ReadWriteOnce volumes every cluster (kind included) can provision. A claim
    that exists keeps its `existing_access_modes`: the API server refuses to change them, so a
    job edited from two nodes to one goes on with its ReadWriteMany claim.
    """
    access = ["ReadWriteMany" if spec.resources.nodes > 1 else "ReadWriteOnce"]
    claim_spec: dict[str, Any] = {
        "accessModes": list(existing_access_modes or access),
        "resources": {"requests": {"storage": spec.storage.size or config.default_storage_size}},
    }
    if spec.storage.storage_class_name:
        claim_spec["storageClassName"] = spec.storage.storage_class_name
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": metadata(
                owner, naming.artifacts_claim_name(owner.name), naming.COMPONENT_STORAGE, None
            ),
            "spec": claim_spec,
        }
    )


def run_config_map(
    owner: Owner,
    generation: int,
    spec: FineTuneJobSpec,
    plan: PlanStatus,
    deepspeed: dict[str, Any],
) -> Manifest:
    """The resolved run config (spec + plan + DeepSpeed config). It holds no secret."""
    run_config = RunConfig(
        name=owner.name,
        namespace=owner.namespace,
        generation=generation,
        spec=spec,
        plan=plan,
        deepspeed=deepspeed,
    )
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(
                owner,
                naming.config_map_name(owner.name, generation),
                naming.COMPONENT_CONFIG,
                generation,
            ),
            "data": {naming.RUN_CONFIG_KEY: json.dumps(run_config.to_wire(), indent=2)},
        }
    )


def rendezvous_service(owner: Owner, generation: int) -> Manifest:
    """Headless Service giving rank 0 a DNS name before it is Ready (publishNotReadyAddresses)."""
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(
                owner,
                naming.rendezvous_service_name(owner.name, generation),
                naming.COMPONENT_RENDEZVOUS,
                generation,
            ),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {
                    naming.LABEL_JOB: owner.name,
                    naming.LABEL_COMPONENT: naming.COMPONENT_TRAINER,
                    naming.LABEL_GENERATION: str(generation),
                },
                "ports": [{"name": "rendezvous", "port": naming.RENDEZVOUS_PORT}],
            },
        }
    )


def torchrun_args(owner: Owner, generation: int, spec: FineTuneJobSpec) -> list[str]:
    """torchrun flags: rank from the completion index, rank 0 via the headless Service."""
    job = naming.training_job_name(owner.name, generation)
    service = naming.rendezvous_service_name(owner.name, generation)
    processes = max(spec.resources.gpus_per_node, 1)  # 0 GPUs: one CPU process (gloo) per pod
    trainer = [
        "-m", "kubetune_trainer", "train",
        "--config", f"{naming.CONFIG_MOUNT}/{naming.RUN_CONFIG_KEY}",
        "--output", f"{naming.ARTIFACTS_MOUNT}/{naming.run_path(owner.name, generation)}",
    ]  # fmt: skip
    if spec.resources.nodes == 1:
        # One pod: a local rendezvous, no DNS needed.
        return ["--standalone", "--nnodes", "1", "--nproc_per_node", str(processes), *trainer]
    return [
        "--nnodes", str(spec.resources.nodes),
        "--nproc_per_node", str(processes),
        "--node_rank", "$(NODE_RANK)",
        "--master_addr", f"{job}-0.{service}",
        "--master_port", str(naming.RENDEZVOUS_PORT),
        *trainer,
    ]  # fmt: skip


def _resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    # Requests equal limits: extended resources demand it, and it gives Guaranteed QoS.
    amounts: dict[str, str] = {}
    if spec.resources.gpus_per_node > 0:
        amounts[spec.resources.gpu_resource] = str(spec.resources.gpus_per_node)
    amounts.update(pod.trainer_cpu_and_memory(spec))
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _trainer_env(
    owner: Owner, generation: int, spec: FineTuneJobSpec, config: OperatorConfig
) -> list[dict[str, Any]]:
    index_ref = f"metadata.annotations['{naming.JOB_COMPLETION_INDEX_ANNOTATION}']"
    return [
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": index_ref}}},
        *pod.common_env(owner.name, generation),
        {
            "name": "KUBETUNE_REPORT_URL",
            "value": f"{config.progress_url.rstrip('/')}/v1/progress/"
            f"{owner.namespace}/{owner.name}",
        },
        {"name": "KUBETUNE_REPORT_TOKEN_FILE", "value": f"{naming.PROGRESS_TOKEN_DIR}/token"},
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(TORCHRUN_SHUTDOWN_SECONDS)},
        *pod.secret_env(spec),
        *judge_key_env(spec),
    ]


def judge_key_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """The LLM judge's API key (`evaluation.judge.apiKeySecretRef`), on the trainer only (it
    asks the judge), by a `secretKeyRef`: the value never passes through the operator, the
    run config or the pod's args. None when the judge needs no key or there is no judge."""
    judge = spec.evaluation.judge
    if judge is None or judge.api_key_secret_ref is None:
        return []
    ref = judge.api_key_secret_ref
    secret = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
    return [{"name": JUDGE_API_KEY_ENV, "valueFrom": secret}]


def _volumes(
    owner: Owner, generation: int, spec: FineTuneJobSpec, config: OperatorConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    source_volumes, source_mounts = pod.pvc_source_volumes(spec)
    volumes = [
        {
            "name": "run-config",
            "configMap": {"name": naming.config_map_name(owner.name, generation)},
        },
        pod.artifacts_volume(pod.artifacts_claim(spec, owner.name)),
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory},
        },
        {
            # A token only the operator's progress endpoint accepts (audience), bound to
            # this pod: the operator checks that the pod belongs to this FineTuneJob.
            "name": "progress-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": config.progress_audience,
                            "expirationSeconds": 3600,
                            "path": "token",
                        }
                    }
                ]
            },
        },
        pod.tmp_volume(),
        *source_volumes,
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "run-config", "mountPath": naming.CONFIG_MOUNT, "readOnly": True},
        {"name": pod.ARTIFACTS_VOLUME, "mountPath": naming.ARTIFACTS_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "progress-token", "mountPath": naming.PROGRESS_TOKEN_DIR, "readOnly": True},
        pod.tmp_mount(),
        *source_mounts,
    ]
    return volumes, mounts


def training_job(
    owner: Owner,
    generation: int,
    spec: FineTuneJobSpec,
    config: OperatorConfig,
    training_hash: str,
) -> Manifest:
    """The Indexed Job: `nodes` pods, each running torchrun with `gpusPerNode` processes."""
    name = naming.training_job_name(owner.name, generation)
    queue_labels = {k: v for k, v in owner.labels.items() if k in naming.KUEUE_LABELS}
    extra_labels, extra_annotations = pod_metadata_overrides(owner, "train", config)
    pod_labels = {
        **metadata(owner, name, naming.COMPONENT_TRAINER, generation)["labels"],
        **extra_labels,
    }
    volumes, mounts = _volumes(owner, generation, spec, config)
    container: dict[str, Any] = {
        "name": naming.TRAINER_CONTAINER,
        "image": config.trainer_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["torchrun"],
        "args": torchrun_args(owner, generation, spec),
        "env": _trainer_env(owner, generation, spec, config),
        "ports": [{"name": "rendezvous", "containerPort": naming.RENDEZVOUS_PORT}],
        "volumeMounts": mounts,
        "securityContext": pod.container_security_context(),
        # The final report (JSON) is the termination message; logs only when the trainer
        # died without writing one.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job retries instead
        "terminationGracePeriodSeconds": STOP_GRACE_SECONDS,
        "subdomain": naming.rendezvous_service_name(owner.name, generation),
        **pod.base_pod_spec(config, config.trainer_service_account),
        "containers": [container],
        "volumes": volumes,
    }
    tolerations = pod.gpu_tolerations(spec, spec.resources.gpus_per_node)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    # Kueue admits a suspended Job by unsuspending it; `suspend-requested` makes the user's
    # own suspend change the hash (and so reach the Job) even when Kueue already wants it.
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.resources.nodes,
        "parallelism": spec.resources.nodes,
        "backoffLimit": config.training_backoff_limit,
        "suspend": spec.suspend or naming.KUEUE_QUEUE_LABEL in queue_labels,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": naming.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [CONFIG_ERROR_EXIT_CODE],
                    },
                },
                # Preemption, eviction, node drain: not the trainer's fault, not counted.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {"labels": pod_labels, "annotations": extra_annotations},
            "spec": pod_spec,
        },
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return with_job_hash(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(
                owner,
                name,
                naming.COMPONENT_TRAINER,
                generation,
                extra_labels=queue_labels,
                annotations={
                    naming.ANNOTATION_TRAINING_HASH: training_hash,
                    naming.ANNOTATION_SUSPEND_REQUESTED: str(spec.suspend).lower(),
                },
            ),
            "spec": job_spec,
        }
    )
