"""`FineTuneJob.status`: what KubeTune observed and decided.

Conditions are the contract (`kubectl wait --for=condition=Ready`); `phase` is a one-word
summary for `kubectl get`. Everything else gives the numbers behind the conditions.
"""

from __future__ import annotations

import types
import typing
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from kubetune.api.metrics import Metric, Task
from kubetune.api.rules import ApiModel

ShortString = Annotated[str, Field(max_length=1024)]
Message = Annotated[str, Field(max_length=32768)]


class ConditionType(StrEnum):
    VALIDATED = "Validated"
    TRAINED = "Trained"
    EXPORTED = "Exported"
    SERVING = "Serving"
    READY = "Ready"


class Phase(StrEnum):
    PENDING = "Pending"
    INVALID = "Invalid"
    SUSPENDED = "Suspended"
    TRAINING = "Training"
    EXPORTING = "Exporting"
    EVALUATING = "Evaluating"
    DEPLOYING = "Deploying"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Condition(ApiModel):
    """A condition in the standard Kubernetes shape (metav1.Condition)."""

    type: ShortString
    """One of Validated, Trained, Exported, Serving, Ready."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: ShortString
    """A CamelCase word for machines."""
    message: Message = ""
    """A sentence for people."""
    observed_generation: int | None = None
    """The spec generation this condition was computed for."""
    last_transition_time: ShortString | None = None
    """When `status` last changed (RFC 3339)."""


class PlanStatus(ApiModel):
    """The resolved run plan: what KubeTune chose for the `Auto` fields."""

    world_size: int
    """Training processes in all (nodes x GPUs per node; nodes when training on CPUs)."""
    zero_stage: int
    """DeepSpeed ZeRO stage used."""
    offload: Literal["None", "CPU"] = "None"
    """Where optimizer states live."""
    micro_batch_size: int
    """Sequences per process per forward pass."""
    gradient_accumulation_steps: int
    """Micro-batches accumulated before each optimizer step."""
    global_batch_size: int
    """Sequences per optimizer step (micro-batch x accumulation x world size)."""
    estimated_gpu_memory_gib: ShortString = Field(alias="estimatedGpuMemoryGiB")
    """Estimated peak memory per GPU (decimal string, GiB); "0" on CPUs."""
    estimated_host_memory_gib: ShortString | None = Field(None, alias="estimatedHostMemoryGiB")
    """CPU runs: estimated peak resident memory per training process (decimal string, GiB).
    The trainer's `report.json` records the measured peak (`peakMemoryMiB`)."""
    parameters: int | None = None
    """Parameters of the base model."""
    trainable_parameters: int | None = None
    """Parameters that are trained (adapter or all)."""
    hidden_size: int | None = None
    """Hidden size of the model the plan was made for: from its config.json (`kubetune
    run`), a published model's shape recognised by name, or estimated from the size. The
    trainer checks it, `layers` and `parameters` against config.json when it starts and
    reports a difference in the Trained condition."""
    layers: int | None = None
    """Decoder layers of the model the plan was made for (see `hiddenSize`)."""
    reason: Message = ""
    """Why this plan was chosen."""


class TrainingStatus(ApiModel):
    """The training generation: which generation trains the model, and what it trains.

    Recorded when the operator starts training a generation, and read back on every pass as
    the truth: the generation lives on when its Jobs are gone (deleted, garbage-collected)
    and across an invalid edit. An edit that changes `trainingHash` starts a new generation
    once the spec is valid; any other edit (serving, cadences, suspend) and a deleted Job go
    on under this generation, in its run directory, from its newest checkpoint."""

    generation: int
    """The training generation: the spec generation whose edit started it. It names the
    training Job (`<name>-g<generation>-train`) and the run directory (`gen-<generation>`)."""
    training_hash: ShortString
    """Identity of what this generation trains: a hash of the spec fields that change the
    trained model (model, dataset, method and hyperparameters, resources, DeepSpeed, the
    storage claim, the export's precision and device)."""


class ProgressStatus(ApiModel):
    """Live training progress reported by the trainer."""

    generation: int | None = None
    """The training generation this progress is of (see `evaluation.generation`)."""
    step: int = 0
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps the run will take."""
    epoch: ShortString | None = None
    """Epochs done, a decimal string."""
    percent: int | None = None
    """Percent of the steps done (0-100)."""
    train_loss: ShortString | None = None
    """Latest training loss."""
    eval_loss: ShortString | None = None
    """Latest validation loss."""
    tokens_per_second: ShortString | None = None
    """Training throughput over the last logging interval, all ranks together."""
    eta_seconds: int | None = None
    """Estimated seconds until training finishes."""
    update_time: ShortString | None = None
    """When this progress was reported (RFC 3339)."""


class ArtifactsStatus(ApiModel):
    """Where the results are, as paths on the artifact volume."""

    volume: ShortString | None = None
    """The PVC holding the artifacts."""
    adapter: ShortString | None = None
    """The PEFT adapter directory."""
    merged: ShortString | None = None
    """The merged model (transformers format, loadable without PEFT)."""
    onnx: ShortString | None = None
    """The ONNX Runtime GenAI model directory."""


class MetricStatus(ApiModel):
    """One metric of the task, base and fine-tuned side by side (decimal strings, in the
    metric's own scale: chrF and BLEU 0-100, shares and F1s 0-1, losses in nats)."""

    name: Metric
    """The metric (`spec.serving.gate.min`'s keys)."""
    base: ShortString | None = None
    """The base model's value on the validation records."""
    fine_tuned: ShortString | None = None
    """The fine-tuned model's value on the same records."""
    serving: ShortString | None = None
    """The value of the model serving now, while it is another generation than the one
    exported (the model `mustBeatServing` compares with)."""


class LabelF1Status(ApiModel):
    """`Classification`: one label's F1, base and fine-tuned."""

    label: ShortString
    """The label."""
    base: ShortString | None = None
    """The base model's F1 on this label."""
    fine_tuned: ShortString | None = None
    """The fine-tuned model's F1 on this label."""


PER_LABEL_F1_LIMIT = 64
"""Labels beyond which status leaves per-label F1 out (`report.json` keeps it)."""


class EvaluationStatus(ApiModel):
    """Evaluation of the newest generation and the gate's verdict."""

    generation: int | None = None
    """The spec generation these numbers belong to."""
    base_eval_loss: ShortString | None = None
    """Validation loss of the base model."""
    eval_loss: ShortString | None = None
    """Validation loss of the fine-tuned model."""
    base_accuracy: ShortString | None = None
    """Exact-match accuracy of the base model's greedy answers."""
    accuracy: ShortString | None = None
    """Exact-match accuracy of the fine-tuned model's greedy answers."""
    task: Task | None = None
    """The evaluation task (`spec.evaluation.task`) the metrics are of."""
    metrics: Annotated[list[MetricStatus], Field(max_length=16)] | None = None
    """The task's measured metrics: base, fine-tuned and the serving model's."""
    per_label_f1: Annotated[
        list[LabelF1Status], Field(max_length=PER_LABEL_F1_LIMIT)
    ] | None = None
    """`Classification` with at most 64 labels: each label's F1, base and fine-tuned."""
    exported_weights: ShortString | None = None
    """What the export built: INT4, INT4-GPTQ, INT8, FP16 or FP32 (with `precision: Auto`,
    what it chose)."""
    exported_accuracy: ShortString | None = None
    """With `precision: Auto`: the exported weights' exact match on the same answers as
    `accuracy` (FP32's, when it chose FP32)."""
    export_message: Message = ""
    """With `precision: Auto`: what it tried, each beside FP32, and the rule it chose by."""
    passed: bool | None = None
    """Whether the gate passed."""
    message: Message = ""
    """Why the gate passed or failed."""


class ServingStatus(ApiModel):
    """The inference Deployment."""

    deployment: ShortString | None = None
    """Name of the Deployment."""
    service: ShortString | None = None
    """Name of the Service."""
    endpoint: ShortString | None = None
    """Base URL of the OpenAI-compatible API inside the cluster."""
    model: ShortString | None = None
    """The name to pass as `model` in requests: the FineTuneJob's name, for every generation."""
    model_generation: int | None = None
    """The spec generation whose model the Deployment serves."""
    ready_replicas: int | None = None
    """Inference pods that are Ready."""
    pool: ShortString | None = None
    """The pool (`spec.serving.share`) whose shared Deployment serves this job's adapter."""
    not_shared_reason: Message | None = None
    """Why a job that names a pool is served on its own Deployment, or why the pool refused its
    adapter (the server's own message)."""


class FineTuneJobStatus(ApiModel):
    """Observed state of a FineTuneJob."""

    observed_generation: int | None = None
    """The spec generation this status describes."""
    phase: Phase | None = None
    """A one-word summary; conditions are the contract."""
    conditions: Annotated[list[Condition], Field(max_length=16)] | None = None
    """Validated, Trained, Exported, Serving, Ready."""
    plan: PlanStatus | None = None
    """The resolved plan."""
    training: TrainingStatus | None = None
    """The training generation and what it trains."""
    progress: ProgressStatus | None = None
    """Live training progress."""
    artifacts: ArtifactsStatus | None = None
    """Where the results are."""
    evaluation: EvaluationStatus | None = None
    """Evaluation and gate verdict."""
    serving: ServingStatus | None = None
    """The inference endpoint."""


def server_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """What the API server fills in for keys of a `model` object that are left out, by wire
    name, nested objects included: the scalar defaults the CRD's schema carries (a merge patch
    that sets one of them to null is undone on the next read). Items of lists are left out:
    a list is written and compared whole. Pure."""
    defaults: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        if isinstance(field.default, (str, int, bool)):
            defaults[key] = field.default
            continue
        for option in _options(field.annotation):
            if isinstance(option, type) and issubclass(option, BaseModel):
                nested = server_defaults(option)
                if nested:
                    defaults[key] = nested
    return defaults


def _options(annotation: Any) -> tuple[Any, ...]:
    """`X | None` -> (X, NoneType); `Annotated[X, ...]` -> (X,); anything else -> (it,)."""
    if typing.get_origin(annotation) is Annotated:
        return _options(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(o for arg in typing.get_args(annotation) for o in _options(arg))
    return (annotation,)


STATUS_DEFAULTS = server_defaults(FineTuneJobStatus)
"""`status` keys the API server fills in when left out (`evaluation.message`: "", ...)."""
