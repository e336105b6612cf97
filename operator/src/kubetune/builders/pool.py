"""A shared serving pool's objects (`spec.serving.share`): one Deployment and Service for every
member, the ConfigMap holding its `AdapterSet`, the pool claim, the Job that exports the base
onto it, and each member's Job that publishes its adapter there.

Where things live (docs/storage.md, "Shared pools"): the pool claim `<pool>-pool-store` holds
the base export (`base/onnx`) and every member's adapter (`adapters/<job>/gen-N`). A pool pod
copies the base into its emptyDir at start, as a FineTuneJob's own server does, and mounts
the claim's `adapters/` read-only: an adapter published after the pod started is readable
there when the operator asks the server to load it, with no restart. Members' own artifact
claims are never mounted by the pool (a pod's volumes are fixed at start, and a member added
later would need one).

Ownership: the pool's objects carry an owner reference to every member, none of them the
controller. The garbage collector deletes them once the last member is gone, and a member's
deletion takes nothing of the pool with it while another uses it; no object of its own means
nothing for a user to create or forget to delete, and no finalizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api import API_VERSION, KIND, FineTuneJobSpec
from kubetune.api.dataplane import AdapterSet, resolve_precision
from kubetune.builders import naming, pod
from kubetune.builders.config import OperatorConfig
from kubetune.builders.export import export_failure_policy, exporter_pod_spec
from kubetune.builders.meta import Manifest, Owner, metadata, with_hash, with_job_hash
from kubetune.builders.serving import (
    MODEL_VOLUME,
    copy_container,
    http_service,
    rolling_deployment,
    server_amounts,
    server_container,
    server_pod_spec,
)

POOL_VOLUME = "pool"
POOL_CONFIG_VOLUME = "pool-config"
POOL_MOUNT = "/mnt/pool"
ADAPTER_SOURCE_MOUNT = "/mnt/adapter"


@dataclass(frozen=True)
class PoolOwners:
    """A pool's name, namespace and the members that own its objects."""

    pool: str
    namespace: str
    members: tuple[Owner, ...]

    def owner_references(self) -> list[dict[str, Any]]:
        return [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": member.name,
                "uid": member.uid,
                # Several owners, none the controller: the garbage collector keeps the pool
                # while any of them exists, and a member's foreground deletion does not wait.
                "controller": False,
                "blockOwnerDeletion": False,
            }
            for member in sorted(self.members, key=lambda m: m.name)
        ]


def pool_labels(pool: str, component: str) -> dict[str, str]:
    return {
        naming.LABEL_NAME: naming.APP_NAME,
        naming.LABEL_INSTANCE: pool,
        naming.LABEL_COMPONENT: component,
        naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
        naming.LABEL_POOL: pool,
    }


def pool_selector(pool: str) -> dict[str, str]:
    return {naming.LABEL_POOL: pool, naming.LABEL_COMPONENT: naming.COMPONENT_POOL_SERVER}


def pool_metadata(
    owners: PoolOwners, name: str, component: str, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owners.namespace,
        "labels": pool_labels(owners.pool, component),
        "ownerReferences": owners.owner_references(),
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def pool_claim(owners: PoolOwners, founder: FineTuneJobSpec, config: OperatorConfig) -> Manifest:
    """The pool claim, ReadWriteMany: the base-export Job, every member's publish Job and
    every replica use it, on whatever nodes they land; sized and classed as the founder's
    artifact claim."""
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {
            "requests": {"storage": founder.storage.size or config.default_storage_size}
        },
    }
    if founder.storage.storage_class_name:
        claim_spec["storageClassName"] = founder.storage.storage_class_name
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": pool_metadata(
                owners, naming.pool_claim_name(owners.pool), naming.COMPONENT_POOL_STORAGE
            ),
            "spec": claim_spec,
        }
    )


def pool_volume(pool: str, read_only: bool) -> dict[str, Any]:
    return {
        "name": POOL_VOLUME,
        "persistentVolumeClaim": {"claimName": naming.pool_claim_name(pool), "readOnly": read_only},
    }


def base_export_args(founder: FineTuneJobSpec) -> list[str]:
    """The base alone, exported as a member's merged model is, except that `Auto` is its
    device's default (no held-out records to measure candidates on: a pool has no single
    dataset)."""
    precision = resolve_precision(founder.serving.precision, founder.serving.device)
    quantization = founder.serving.quantization
    return [
        "-m", "kubetune_trainer", "export",
        "--input", founder.model.source,
        "--output", f"{POOL_MOUNT}/{naming.POOL_BASE_EXPORT_PATH}",
        "--precision", precision.value,
        "--device", founder.serving.device.value,
        *([] if quantization is None else ["--quantization", quantization.value]),
    ]  # fmt: skip


def base_export_job(
    owners: PoolOwners, founder: FineTuneJobSpec, config: OperatorConfig
) -> Manifest:
    """Exports the pool's base onto the pool claim, once per pool."""
    name = naming.pool_base_export_job_name(owners.pool)
    source_volumes, source_mounts = pod.pvc_source_volumes(founder)
    pod_spec = exporter_pod_spec(
        founder, config, base_export_args(founder),
        env=[
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
            {"name": "KUBETUNE_PVC_ROOT", "value": naming.PVC_MOUNT_ROOT},
            *pod.secret_env(founder),
        ],
        mounts=[{"name": POOL_VOLUME, "mountPath": POOL_MOUNT}, *source_mounts],
        volumes=[pool_volume(owners.pool, read_only=False), *source_volumes],
    )  # fmt: skip
    return with_job_hash(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": pool_metadata(owners, name, naming.COMPONENT_POOL_BASE),
            "spec": {
                "backoffLimit": config.export_backoff_limit,
                "podFailurePolicy": export_failure_policy(),
                "template": {
                    "metadata": {"labels": pool_labels(owners.pool, naming.COMPONENT_POOL_BASE)},
                    "spec": pod_spec,
                },
            },
        }
    )


def publish_job(
    owner: Owner, generation: int, spec: FineTuneJobSpec, config: OperatorConfig
) -> Manifest:
    """A member's own Job (owned by it alone): copies its generation's adapter from its
    artifact claim onto the pool claim (`copy-model --adapter`, which checks the adapter's
    files), after training succeeded and before its gate lets the pool load it."""
    assert spec.serving.share is not None
    name = naming.publish_job_name(owner.name, generation)
    dest = f"{POOL_MOUNT}/{naming.pool_adapter_path(owner.name, generation)}"
    container: dict[str, Any] = {
        "name": naming.EXPORTER_CONTAINER,
        "image": config.serving_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python"],
        "args": ["-m", "kubetune_trainer", "copy-model", "--adapter",
                 "--source", ADAPTER_SOURCE_MOUNT, "--dest", dest],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}],
        "volumeMounts": [
            {
                "name": pod.ARTIFACTS_VOLUME,
                "mountPath": ADAPTER_SOURCE_MOUNT,
                "subPath": f"{naming.run_path(owner.name, generation)}/adapter",
                "readOnly": True,
            },
            {"name": POOL_VOLUME, "mountPath": POOL_MOUNT},
            pod.tmp_mount(),
        ],
        "securityContext": pod.container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        **pod.base_pod_spec(config, config.trainer_service_account),
        "containers": [container],
        "volumes": [
            pod.artifacts_volume(pod.artifacts_claim(spec, owner.name), read_only=True),
            pool_volume(spec.serving.share, read_only=False),
            pod.tmp_volume(),
        ],
    }
    labels = metadata(owner, name, naming.COMPONENT_PUBLISHER, generation)["labels"]
    return with_job_hash(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(owner, name, naming.COMPONENT_PUBLISHER, generation),
            "spec": {
                "backoffLimit": config.export_backoff_limit,
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        }
    )


def adapter_config_map(owners: PoolOwners, adapters: AdapterSet) -> Manifest:
    """The set a replica loads at start (`serve --lora-modules-file`): a replica that
    restarts serves the current set; one that runs gets changes by the operator's calls."""
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": pool_metadata(
                owners, naming.pool_config_map_name(owners.pool), naming.COMPONENT_POOL_ADAPTERS
            ),
            "data": {naming.ADAPTER_SET_KEY: adapters.to_json()},
        }
    )


def pool_serve_args(pool: str, founder: FineTuneJobSpec) -> list[str]:
    return [
        "-m", "kubetune_trainer", "serve",
        "--model", naming.MODEL_MOUNT,
        "--host", "0.0.0.0",
        "--port", str(naming.SERVING_PORT),
        # The base answers under the pool's name; each member under its own (the adapters').
        "--served-model-name", naming.pool_server_name(pool),
        "--device", founder.serving.device.value,
        "--engine", "batch",  # the engine that serves adapters
        "--enable-runtime-lora",
        "--lora-modules-file", f"{naming.POOL_CONFIG_MOUNT}/{naming.ADAPTER_SET_KEY}",
    ]  # fmt: skip


def pool_deployment(
    owners: PoolOwners, founder: FineTuneJobSpec, config: OperatorConfig
) -> Manifest:
    """The pool's server: the founder's serving settings (replicas, resources, max tokens,
    device). Nothing in its template names a member or a generation, so adding, replacing
    or removing an adapter never rolls it: those go through the operator's load calls."""
    size = founder.storage.size or config.default_storage_size
    copy = copy_container({"name": POOL_VOLUME, "subPath": naming.POOL_BASE_EXPORT_PATH},
                          config, server_amounts(founder))  # fmt: skip
    server = server_container(
        pool_serve_args(owners.pool, founder), founder, config, extra_env=[],
        extra_mounts=[
            # Read only when the operator asks for a load: the adapters published so far.
            {"name": POOL_VOLUME, "mountPath": naming.POOL_ADAPTERS_MOUNT,
             "subPath": naming.POOL_ADAPTERS_PATH, "readOnly": True},
            {"name": POOL_CONFIG_VOLUME, "mountPath": naming.POOL_CONFIG_MOUNT, "readOnly": True},
        ],
    )  # fmt: skip
    volumes = [
        pool_volume(owners.pool, read_only=True),
        {"name": MODEL_VOLUME, "emptyDir": {"sizeLimit": size}},
        {"name": POOL_CONFIG_VOLUME,
         "configMap": {"name": naming.pool_config_map_name(owners.pool)}},
    ]  # fmt: skip
    return rolling_deployment(
        pool_metadata(owners, naming.pool_server_name(owners.pool), naming.COMPONENT_POOL_SERVER),
        founder.serving.replicas,
        pool_selector(owners.pool),
        {"labels": pool_labels(owners.pool, naming.COMPONENT_POOL_SERVER)},
        server_pod_spec(founder, config, copy, server, volumes),
    )


def pool_service(owners: PoolOwners) -> Manifest:
    return http_service(
        pool_metadata(
            owners, naming.pool_server_name(owners.pool), naming.COMPONENT_POOL_SERVER
        ),
        pool_selector(owners.pool),
    )


def pool_objects(
    owners: PoolOwners,
    founder: FineTuneJobSpec,
    adapters: AdapterSet,
    config: OperatorConfig,
    base_exported: bool,
) -> list[Manifest]:
    """Everything a pool is, in the order to apply it (the claim and the ConfigMap before the
    pods that mount them). The Deployment and Service only once the base export succeeded:
    before that its pods' copy would find nothing and restart in a loop."""
    objects = [
        pool_claim(owners, founder, config),
        base_export_job(owners, founder, config),
        adapter_config_map(owners, adapters),
    ]
    if base_exported:
        objects += [pool_deployment(owners, founder, config), pool_service(owners)]
    return objects
