"""Names, labels and annotations of the objects the operator creates.

Every child's name is a pure function of the FineTuneJob's name and the training generation,
so a restarted operator finds (and server-side applies onto) the same objects instead of
creating duplicates.
"""

from __future__ import annotations

import hashlib

APP_NAME = "kubetune"
MANAGED_BY = "kubetune"
FIELD_MANAGER = "kubetune"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "kubetune.io/job"
LABEL_GENERATION = "kubetune.io/generation"
LABEL_POOL = "kubetune.io/pool"
"""On a pool's objects (`serving.share`) instead of `kubetune.io/job`: they serve several jobs."""

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_LABELS = (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)

ANNOTATION_HASH = "kubetune.io/applied-hash"
"""sha256 of the manifest as the operator last applied it: equal hash, nothing to apply."""
ANNOTATION_TRAINING_HASH = "kubetune.io/training-hash"
"""sha256 of the training-relevant spec: a different one starts a new generation."""
ANNOTATION_MODEL_GENERATION = "kubetune.io/model-generation"
ANNOTATION_MODEL_EVAL_LOSS = "kubetune.io/model-eval-loss"
ANNOTATION_MODEL_METRICS = "kubetune.io/model-metrics"
"""JSON `{metric: value}`: the served model's validation metrics, on the Deployment beside its
eval loss, so `mustBeatServing` compares a new model with it on the task's primary metric."""
ANNOTATION_SUSPEND_REQUESTED = "kubetune.io/suspend-requested"
ANNOTATION_POD_METADATA = "kubetune.io/pod-metadata"
"""JSON `{"train"|"export"|"serve": {"labels": {...}, "annotations": {...}}}` copied onto the
pods' templates when the operator runs with `--allow-pod-metadata` (tests drive kwok with it)."""
JOB_COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

COMPONENT_TRAINER = "trainer"
COMPONENT_EXPORTER = "exporter"
COMPONENT_SERVER = "server"
COMPONENT_STORAGE = "storage"
COMPONENT_CONFIG = "run-config"
COMPONENT_RENDEZVOUS = "rendezvous"
COMPONENT_POOL_SERVER = COMPONENT_SERVER
"""A pool's server is an inference server like any other (the chart's serving NetworkPolicy
selects it by this component); its `kubetune.io/pool` label, and no `kubetune.io/job`, tell
it apart from a job's own."""
COMPONENT_POOL_ADAPTERS = "pool-adapters"
COMPONENT_POOL_STORAGE = "pool-storage"
COMPONENT_POOL_BASE = "pool-base-export"
COMPONENT_PUBLISHER = "adapter-publisher"

TRAINER_CONTAINER = "trainer"
EXPORTER_CONTAINER = "exporter"
SERVER_CONTAINER = "server"
MODEL_COPY_CONTAINER = "copy-model"
"""The inference pods' init container: copies the served export into the pod's emptyDir."""

RENDEZVOUS_PORT = 29500
SERVING_PORT = 8000
ARTIFACTS_MOUNT = "/artifacts"
CONFIG_MOUNT = "/etc/kubetune"
RUN_CONFIG_KEY = "run.json"
PROGRESS_TOKEN_DIR = "/var/run/secrets/kubetune/progress"
PVC_MOUNT_ROOT = "/mnt/pvc"
MODEL_MOUNT = "/model"
"""Where an inference pod's copy of its model lives (an emptyDir) and the server loads it."""
MODEL_SOURCE_MOUNT = "/mnt/export"
"""Where the copy container sees the served export (the artifact claim's `<job>/gen-N/onnx`)."""

POOL_ADAPTERS_MOUNT = "/adapters"
"""Where a pool server sees the pool claim's `adapters/` (read-only): each member's adapter
at `<job>/gen-N`, read when the operator asks the server to load it."""
POOL_CONFIG_MOUNT = "/etc/kubetune/pool"
ADAPTER_SET_KEY = "adapters.json"
"""The pool ConfigMap's key: the `AdapterSet` a pool server loads at start."""
POOL_BASE_EXPORT_PATH = "base/onnx"
"""The pool's base export on the pool claim (what `copy-model` copies into each pod)."""
POOL_ADAPTERS_PATH = "adapters"

MAX_NAME = 63


def bounded(name: str, limit: int = MAX_NAME) -> str:
    """`name` if it fits a DNS label, else a prefix plus a short hash (still unique, stable)."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def training_job_name(job: str, generation: int) -> str:
    # Pod hostnames are `<job>-<index>`: leave room for the index within 63 characters.
    return bounded(f"{job}-g{generation}-train", MAX_NAME - 4)


def rendezvous_service_name(job: str, generation: int) -> str:
    return bounded(f"{job}-g{generation}-rdzv")


def config_map_name(job: str, generation: int) -> str:
    return bounded(f"{job}-g{generation}-config", 253)


def export_job_name(job: str, generation: int) -> str:
    return bounded(f"{job}-g{generation}-export", MAX_NAME - 4)


def artifacts_claim_name(job: str) -> str:
    return bounded(f"{job}-artifacts", 253)


def serving_name(job: str) -> str:
    """The stable Deployment and Service of a FineTuneJob (one per job, all generations)."""
    return bounded(f"{job}-server")


def pool_server_name(pool: str) -> str:
    """A pool's Deployment and Service (`serving.share`), shared by its members."""
    return bounded(f"{pool}-pool")


def pool_config_map_name(pool: str) -> str:
    return bounded(f"{pool}-pool-adapters", 253)


def pool_claim_name(pool: str) -> str:
    return bounded(f"{pool}-pool-store", 253)


def pool_base_export_job_name(pool: str) -> str:
    return bounded(f"{pool}-pool-base-export", MAX_NAME - 4)


def publish_job_name(job: str, generation: int) -> str:
    """The Job that copies a pool member's adapter onto the pool claim."""
    return bounded(f"{job}-g{generation}-publish", MAX_NAME - 4)


def pool_adapter_path(job: str, generation: int) -> str:
    """A member's published adapter, relative to the pool claim's root; generations side by
    side, so a new one is loaded while requests in flight finish on the old one."""
    return f"{POOL_ADAPTERS_PATH}/{job}/gen-{generation}"


def served_adapter_path(job: str, generation: int) -> str:
    """The same adapter as the pool server sees it (`POOL_ADAPTERS_MOUNT`)."""
    return f"{POOL_ADAPTERS_MOUNT}/{job}/gen-{generation}"


def adapter_generation(served_path: str) -> int | None:
    """The generation of a `served_adapter_path`, or None for another path."""
    _, _, last = served_path.rpartition("/gen-")
    return int(last) if last.isdigit() and served_path.startswith(POOL_ADAPTERS_MOUNT) else None


def run_path(job: str, generation: int) -> str:
    """A generation's run directory, relative to the artifact volume's root."""
    return f"{job}/gen-{generation}"


def export_path(job: str, generation: int) -> str:
    """A generation's exported (ONNX) model, relative to the artifact volume's root."""
    return f"{run_path(job, generation)}/onnx"


def endpoint_url(service: str, namespace: str) -> str:
    return f"http://{service}.{namespace}.svc:{SERVING_PORT}/v1"


def served_model_name(job: str) -> str:
    """What the inference server answers to as `model`: the job's name, stable across
    generations (a rollout must not break clients that name the model)."""
    return job
