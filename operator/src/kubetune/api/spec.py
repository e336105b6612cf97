"""`FineTuneJob.spec`: what the user asks for.

Conventions (Kubernetes API conventions): camelCase fields, CamelCase enum values, no floats
(decimal strings such as `"2e-4"`), units in names (`activeDeadlineSeconds`, `gpuMemoryGiB`).
Every field has a docstring: it becomes the CRD description and `docs/api.md`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, field_validator

from kubetune.api.metrics import COMPARED_METRIC, TASK_METRICS, Metric, Task
from kubetune.api.names import (
    DNS1123_LABEL_PATTERN,
    DNS1123_SUBDOMAIN,
    DNS1123_SUBDOMAIN_MAX,
    DNS1123_SUBDOMAIN_PATTERN,
    EXTENDED_RESOURCE_NAME,
    EXTENDED_RESOURCE_NAME_MAX,
    LABEL_VALUE,
    LABEL_VALUE_MAX,
    LABEL_VALUE_PATTERN,
    QUALIFIED_NAME,
    QUALIFIED_NAME_MAX,
    SECRET_KEY,
    NameRule,
)
from kubetune.api.rules import ApiModel, Rule

MODEL_SCHEMES = ("hf", "pvc", "builtin", "file")
DATASET_SCHEMES = ("hf", "pvc", "builtin", "file")
BUILTIN_MODELS = ("smollm2-135m-instruct",)
BUILTIN_DATASETS = (
    "kubectl-commands", "support-tickets", "contact-extraction", "short-qa", "english-to-veltish",
)

DECIMAL_PATTERN = r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"

Decimal = Annotated[str, Field(pattern=DECIMAL_PATTERN, max_length=32)]
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=32)]
ShortString = Annotated[str, Field(max_length=253)]
Uri = Annotated[str, Field(min_length=1, max_length=2048)]
POOL_NAME_MAX = 40
"""A pool's name becomes its Deployment's, Service's, ConfigMap's and claim's names
(`<pool>-pool...`); pod names add a ReplicaSet hash and a suffix within 63 characters."""
PoolName = Annotated[
    str, Field(min_length=1, max_length=POOL_NAME_MAX, pattern=f"^{DNS1123_LABEL_PATTERN}$")
]


PVC_SOURCE = NameRule(
    (
        f"pvc://{DNS1123_SUBDOMAIN_PATTERN}(/.*)?",
        f"pvc://[^/]{{1,{DNS1123_SUBDOMAIN_MAX}}}(/.*)?",
    )
)
"""`pvc://<claim>[/path]`: the claim must be a PersistentVolumeClaim name. `pvc:///path` (an
empty claim) would mount no claim, make the existence check read the collection, and let the
trainer read another path."""


def _scheme_rule(
    field: str, schemes: tuple[str, ...], builtins: tuple[str, ...], optional: bool = False
) -> Rule:
    """`field` must be `<scheme>://...`, `pvc://<claim>[/path]` or `builtin://<one of builtins>`;
    an `optional` field may be left out."""
    # Names are plain [a-z0-9-] so the regex needs no escaping inside a CEL string literal.
    other = "|".join(scheme for scheme in schemes if scheme != "builtin")
    pattern = rf"(({other})://.+|builtin://({'|'.join(builtins)}))"
    listed = ", ".join(f"{scheme}://" for scheme in schemes)
    value = f"self.{field}"
    cel = (
        f"{value}.matches('^{pattern}$') && "
        f"(!{value}.startsWith('pvc://') || {PVC_SOURCE.cel(value)})"
    )

    def check(obj: object) -> bool:
        source = getattr(obj, field)
        if source is None:
            return optional
        if re.fullmatch(pattern, source) is None:
            return False
        return not source.startswith("pvc://") or PVC_SOURCE.holds(source)

    return Rule(
        cel=f"!has({value}) || ({cel})" if optional else cel,
        message=f"{field} must start with one of {listed} (built-in: {', '.join(builtins)}; "
        "pvc://<claim>/<path> names a PersistentVolumeClaim: lowercase letters, digits, '-' "
        "and '.')",
        check=check,
        field_path=f".{field}",
    )


def _dataset_source_rule(optional: bool) -> Rule:
    """The rule of `dataset.source`, also for `dataset.validation.source` (optional there)."""
    return _scheme_rule("source", DATASET_SCHEMES, BUILTIN_DATASETS, optional=optional)


class SecretKeyRef(ApiModel):
    """A key of a Secret in the FineTuneJob's namespace."""

    name: ShortString
    """Name of the Secret."""
    key: ShortString = "token"
    """Key inside the Secret that holds the value."""

    # What the API server checks in a pod's secretKeyRef: a name it refuses would leave the
    # pod in CreateContainerConfigError, the job waiting with no error of its own.
    rules = (
        Rule(
            cel=DNS1123_SUBDOMAIN.cel("self.name"),
            message="secret name must be a Secret's name: at most 253 lowercase letters, "
            "digits, '-' and '.', starting and ending with a letter or digit",
            check=lambda r: DNS1123_SUBDOMAIN.holds(r.name),
            field_path=".name",
        ),
        Rule(
            cel=f"!has(self.key) || {SECRET_KEY.cel('self.key')}",
            message="secret key must be a key of a Secret's data: at most 253 letters, "
            "digits, '-', '_' and '.', not '.' and not starting with '..'",
            check=lambda r: SECRET_KEY.holds(r.key),
            field_path=".key",
        ),
    )


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    source: Uri
    """Where the model comes from: `hf://org/name` (Hugging Face Hub id, or its local
    cache/mirror when offline), `pvc://claim/path` (a directory on a PVC),
    `builtin://smollm2-135m-instruct` (shipped with KubeTune, runs on a CPU) or
    `file:///path` (a directory on the machine, local mode)."""
    secret_ref: SecretKeyRef | None = None
    """Secret holding a Hugging Face token for gated or private models. It reaches pods only
    as an environment variable from the Secret, never through a ConfigMap or status."""
    revision: ShortString | None = None
    """Hub revision (branch, tag or commit) for `hf://` sources."""
    trust_remote_code: bool = False
    """Run custom modelling code shipped with the model. Only for models you trust."""
    parameter_count: Annotated[int, Field(ge=1)] | None = None
    """Parameters of the base model, for the planner's memory estimate when it cannot tell:
    `kubetune run` reads the model's config.json (`file://`, `pvc://`, `builtin://`); the
    operator recognises published models by name (`hf://microsoft/Phi-3-mini-4k-instruct`,
    Llama, Mistral, Qwen, Gemma) and else reads a size in the name (`-7B`)."""

    rules = (_scheme_rule("source", MODEL_SCHEMES, BUILTIN_MODELS),)


class DatasetFormat(StrEnum):
    AUTO = "Auto"
    CHAT = "Chat"
    INSTRUCTION = "Instruction"
    COMPLETION = "Completion"
    TEXT = "Text"


class ValidationSpec(ApiModel):
    """Where validation records come from: a file of their own or a share of the training set."""

    source: Uri | None = None
    """A separate JSONL file in the same format (same schemes as `dataset.source`)."""
    split_percent: Annotated[int, Field(ge=1, le=50)] | None = None
    """Percentage of the training records held out for validation (1-50)."""

    rules = (
        Rule(
            cel="has(self.source) != has(self.splitPercent)",
            message="dataset.validation needs exactly one of source or splitPercent",
            check=lambda v: (v.source is None) != (v.split_percent is None),
        ),
        _dataset_source_rule(optional=True),
    )


class DatasetSpec(ApiModel):
    """The training data: JSON Lines, one record per line."""

    source: Uri
    """Where the JSONL file lives: `pvc://claim/path.jsonl`, `file:///path.jsonl`,
    `hf://org/name` or a dataset shipped with KubeTune: `builtin://kubectl-commands` (the
    quickstart's), `builtin://support-tickets` (Classification into 8 queues),
    `builtin://contact-extraction` (Extraction of a contact as JSON) or `builtin://short-qa`
    (Extraction of an answer span from a paragraph) or `builtin://english-to-veltish`
    (Translation into a small invented language); each ships its validation and test
    splits."""
    format: DatasetFormat = DatasetFormat.AUTO
    """Record format. `Chat`: OpenAI-style `messages`; `Instruction`: `instruction`, optional
    `input`, `output`; `Completion`: `prompt`, `completion`; `Text`: `text`. `Auto` detects it
    from the first record."""
    validation: ValidationSpec | None = None
    """Validation data, used for the eval loss, accuracy and the serving gate."""
    secret_ref: SecretKeyRef | None = None
    """Secret holding a token for a private `hf://` dataset."""

    rules = (_dataset_source_rule(optional=False),)


class Method(StrEnum):
    LORA = "LoRA"
    QLORA = "QLoRA"
    DORA = "DoRA"
    FULL = "Full"

    @property
    def uses_adapter(self) -> bool:
        return self is not Method.FULL


class LoraSpec(ApiModel):
    """Adapter settings for `LoRA`, `QLoRA` and `DoRA`."""

    rank: Annotated[int, Field(ge=1, le=1024)] = 16
    """Rank `r` of the low-rank update matrices."""
    alpha: Annotated[int, Field(ge=1, le=4096)] = 32
    """Scaling numerator `lora_alpha`; the update is scaled by alpha / rank."""
    dropout: Decimal = "0.05"
    """Dropout on the adapter input, a decimal string in [0, 1)."""
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]],
        Field(min_length=1, max_length=64),
    ] = ["all-linear"]
    """Module names to adapt, or `all-linear` for every linear layer except the output head."""

    rules = (
        Rule(
            cel="double(self.dropout) < 1.0",
            message="lora.dropout must be a decimal string in [0, 1), for example \"0.05\"",
            check=lambda lora: float(lora.dropout) < 1.0,
            field_path=".dropout",
        ),
    )


class LrScheduler(StrEnum):
    COSINE = "Cosine"
    LINEAR = "Linear"
    CONSTANT = "Constant"


PositiveIntOrAuto = Annotated[
    Annotated[int, Field(ge=1, le=65536)] | Literal["Auto"],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]


class TrainingSpec(ApiModel):
    """Hyperparameters. Values left out are chosen by KubeTune and shown in `status.plan`."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 3
    """Passes over the training data."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps, even before `epochs` are done."""
    learning_rate: Decimal = "2e-4"
    """Peak learning rate, a decimal string such as `"2e-4"`."""
    lr_scheduler: LrScheduler = LrScheduler.COSINE
    """Learning-rate schedule after warm-up."""
    warmup_ratio: Decimal = "0.03"
    """Fraction of the steps spent warming the learning rate up, in [0, 1)."""
    weight_decay: Decimal = "0"
    """AdamW weight decay."""
    batch_size: PositiveIntOrAuto = "Auto"
    """Global batch size in sequences per optimizer step, or `Auto` (16). The planner splits
    it into micro-batches and gradient accumulation."""
    max_seq_length: Annotated[int, Field(ge=16, le=131072)] = 2048
    """Longer sequences are truncated (and counted in the report)."""
    packing: bool = True
    """Pack several records into one padding-free row with position ids reset at each record
    boundary, so records never attend to each other. Faster on data of varied lengths."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: about a third more compute, far less
    memory."""
    max_grad_norm: Decimal = "1.0"
    """Gradient clipping norm."""
    seed: Annotated[int, Field(ge=0)] = 42
    """Seed for shuffling, dropout and initialisation."""
    log_every_steps: Annotated[int, Field(ge=1)] = 10
    """Steps between progress reports and `metrics.jsonl` lines."""
    eval_every_steps: Annotated[int, Field(ge=1)] | None = None
    """Steps between validation-loss evaluations (default: once per epoch)."""

    rules = (
        Rule(
            cel="double(self.learningRate) > 0.0 && double(self.learningRate) < 1.0",
            message="training.learningRate must be a decimal string in (0, 1), e.g. \"2e-4\"",
            check=lambda t: 0.0 < float(t.learning_rate) < 1.0,
            field_path=".learningRate",
        ),
        Rule(
            cel="double(self.warmupRatio) < 1.0",
            message="training.warmupRatio must be in [0, 1)",
            check=lambda t: float(t.warmup_ratio) < 1.0,
            field_path=".warmupRatio",
        ),
    )


class Toleration(ApiModel):
    """A Kubernetes toleration, copied onto trainer pods."""

    key: Annotated[str, Field(max_length=QUALIFIED_NAME_MAX)] | None = None
    """Taint key to tolerate (a label key); empty with `Exists` tolerates everything."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches `value`; `Exists` matches any value."""
    value: ShortString | None = None
    """Taint value for `Equal`."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; empty tolerates all effects."""
    toleration_seconds: int | None = None
    """How long a `NoExecute` taint is tolerated."""

    # What the API server checks in a pod's tolerations (ValidateTolerations): the trainer
    # Job would be refused and the FineTuneJob wait forever.
    rules = (
        Rule(
            cel=f"!has(self.key) || self.key == '' || {QUALIFIED_NAME.cel('self.key')}",
            message="toleration key must be a label key: an optional DNS subdomain prefix and "
            "'/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
            "letter or digit",
            check=lambda t: not t.key or QUALIFIED_NAME.holds(t.key),
            field_path=".key",
        ),
        Rule(
            cel="(has(self.key) && self.key != '') || self.operator == 'Exists'",
            message="a toleration without a key must have operator Exists",
            check=lambda t: bool(t.key) or t.operator == "Exists",
            field_path=".operator",
        ),
        Rule(
            cel="self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="a toleration with operator Exists must not have a value",
            check=lambda t: t.operator != "Exists" or not t.value,
            field_path=".value",
        ),
        Rule(
            cel=f"self.operator != 'Equal' || !has(self.value) || {LABEL_VALUE.cel('self.value')}",
            message=f"toleration value must be a label value: at most {LABEL_VALUE_MAX} "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            check=lambda t: t.operator != "Equal" or t.value is None or LABEL_VALUE.holds(t.value),
            field_path=".value",
        ),
        Rule(
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="toleration tolerationSeconds needs effect NoExecute",
            check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
            field_path=".tolerationSeconds",
        ),
    )


LabelValue = Annotated[str, Field(max_length=LABEL_VALUE_MAX, pattern=LABEL_VALUE_PATTERN)]


class ResourcesSpec(ApiModel):
    """Where and on how much hardware training runs."""

    nodes: Annotated[int, Field(ge=1, le=256)] = 1
    """Number of nodes (pods of the Indexed training Job)."""
    gpus_per_node: Annotated[int, Field(ge=0, le=16)] = 1
    """GPUs per node, one training process each. 0 trains on CPUs (gloo), for laptops and
    CPU-only clusters."""
    gpu_resource: Annotated[str, Field(max_length=EXTENDED_RESOURCE_NAME_MAX)] = "nvidia.com/gpu"
    """Extended resource name of the GPUs (`<domain>/<name>`, outside `kubernetes.io`)."""
    gpu_memory_gib: Annotated[int, Field(ge=1, le=1024, alias="gpuMemoryGiB")] = 80
    """Memory of one GPU, used by the planner to choose the ZeRO stage and micro-batch."""
    node_selector: Annotated[dict[str, LabelValue], Field(max_length=64)] | None = None
    """Labels the trainer pods' nodes must carry (keys and values as Kubernetes labels; at
    most 64, which bounds the admission rule's cost)."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] | None = None
    """Extra tolerations for trainer pods (the GPU taint `<gpuResource>` is tolerated
    already)."""
    cpu: Quantity | None = None
    """CPU request and limit per trainer pod, e.g. `"8"`."""
    memory: Quantity | None = None
    """Memory request and limit per trainer pod, e.g. `"64Gi"`."""
    shared_memory: Quantity = "8Gi"
    """Size of the in-memory `/dev/shm` volume (NCCL and data loaders need more than the
    container default of 64Mi)."""

    # Pods carrying these would be refused by the API server and the job wait forever.
    rules = (
        Rule(
            cel=EXTENDED_RESOURCE_NAME.cel("self.gpuResource"),
            message="resources.gpuResource must be an extended resource name such as "
            "nvidia.com/gpu: a DNS subdomain (not requests.*, not in kubernetes.io), '/', "
            "then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter "
            "or digit",
            check=lambda r: EXTENDED_RESOURCE_NAME.holds(r.gpu_resource),
            field_path=".gpuResource",
        ),
        Rule(
            cel=f"!has(self.nodeSelector) || "
            f"self.nodeSelector.all(key, {QUALIFIED_NAME.cel('key')})",
            message="resources.nodeSelector keys must be label keys: an optional DNS subdomain "
            "prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and "
            "ending with a letter or digit",
            check=lambda r: all(QUALIFIED_NAME.holds(key) for key in r.node_selector or {}),
            field_path=".nodeSelector",
        ),
    )


class ZeroOffload(StrEnum):
    NONE = "None"
    CPU = "CPU"


ZeroStage = Annotated[
    Annotated[int, Field(ge=0, le=3)] | Literal["Auto"],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO settings."""

    zero_stage: ZeroStage = "Auto"
    """ZeRO stage 0-3, or `Auto`: the lowest stage whose memory estimate fits the GPUs."""
    offload: ZeroOffload = ZeroOffload.NONE
    """Offload optimizer states (and with stage 3 parameters) to CPU memory. Needs stage 2
    or 3 (or `Auto`). Slow: only when nothing else fits."""

    rules = (
        Rule(
            cel="self.offload != 'CPU' || self.zeroStage == 'Auto' || self.zeroStage >= 2",
            message="deepspeed.offload CPU needs zeroStage 2, 3 or Auto",
            check=lambda d: d.offload != ZeroOffload.CPU
            or d.zero_stage == "Auto"
            or int(d.zero_stage) >= 2,
            field_path=".offload",
        ),
    )


class CheckpointSpec(ApiModel):
    """Checkpoints that let a restarted or resumed run continue where it stopped."""

    every_steps: Annotated[int, Field(ge=1)] = 200
    """Optimizer steps between checkpoints."""
    keep: Annotated[int, Field(ge=1, le=100)] = 3
    """Newest checkpoints to keep; older ones are deleted."""


class StorageSpec(ApiModel):
    """The artifact volume: checkpoints, adapter, merged model, ONNX model, reports."""

    claim_name: ShortString | None = None
    """An existing PersistentVolumeClaim (ReadWriteMany for multi-node jobs)."""
    size: Quantity | None = None
    """Size of the PVC KubeTune creates when `claimName` is not set (default 50Gi)."""
    storage_class_name: ShortString | None = None
    """Storage class of the PVC KubeTune creates."""

    rules = (
        Rule(
            cel="!(has(self.claimName) && (has(self.size) || has(self.storageClassName)))",
            message=(
                "storage: set claimName (an existing PVC) or size/storageClassName "
                "(a PVC KubeTune creates), not both"
            ),
            check=lambda s: s.claim_name is None
            or (s.size is None and s.storage_class_name is None),
        ),
    )


class Precision(StrEnum):
    AUTO = "Auto"
    INT4 = "INT4"
    INT8 = "INT8"
    FP16 = "FP16"
    FP32 = "FP32"


class Quantization(StrEnum):
    """How INT4 weights are rounded (onnxruntime-genai's builder `algo_config`, or GPTQ after
    it); measured speeds and accuracies are in bench/RESULTS.md."""

    RTN = "RTN"
    """Round-to-nearest in blocks of 32, every matrix in 4 bits, the output head too."""
    RTN_LAST = "RTNLast"
    """RTN, with the output head (the last, largest matrix) in 8 bits."""
    K_QUANT = "KQuant"
    """llama.cpp's k-quant rounding (a searched scale per block), every matrix in 4 bits."""
    K_QUANT_MIXED = "KQuantMixed"
    """k-quant, with the output head and the most sensitive layers in 8 bits."""
    GPTQ = "GPTQ"
    """RTN's layout and speed, the weights rounded by GPTQ on calibration tokens from the
    training records (each rounding error spread over the weights not yet rounded)."""


class Device(StrEnum):
    CPU = "CPU"
    CUDA = "CUDA"


MetricBounds = Annotated[dict[Metric, Decimal], Field(max_length=16)]
"""Metric name -> bound, a decimal string in the metric's own scale (chrF and BLEU 0-100, the
shares and F1s 0-1, losses in nats)."""


class GateSpec(ApiModel):
    """The evaluation gate: a new model is rolled out only if it passes every set bound. A
    bound whose metric was not measured fails: a gate the user asked for never passes
    silently."""

    min_bounds: MetricBounds | None = Field(None, alias="min")
    """Lower bounds on the fine-tuned model's validation metrics, e.g. `{chrF: "55"}`; each
    key must be one of `spec.evaluation.task`'s metrics (see `spec.evaluation.metrics`)."""
    max_bounds: MetricBounds | None = Field(None, alias="max")
    """Upper bounds, e.g. `{evalLoss: "1.2"}` or `{outOfLabels: "0.02"}`; keys as `min`."""
    max_eval_loss: Decimal | None = None
    """The new model's validation loss must be at most this (the same as `max: {evalLoss:
    ...}`, which every task has)."""
    min_accuracy: Decimal | None = None
    """The new model's exact-match accuracy on the validation answers (the answer equals the
    reference once whitespace and code fences are normalised) must be at least this (0-1),
    whatever the task; for a `Classification` job's label accuracy use `min: {accuracy:
    ...}`."""
    must_beat_base: bool = True
    """The new model must be better than the base model on the task's primary metric
    (`Classification`: macroF1, `Extraction`: tokenF1, `Translation`: chrF, `Summarization`:
    rougeL, `Chat`: evalLoss). `Generation` keeps comparing the validation loss, as before
    tasks existed: a base model's exact match is often 0, which any model ties."""
    must_beat_serving: bool = False
    """The new model must be better than the model serving now on the same metric as
    `mustBeatBase` (holds when nothing serves yet, or when the serving model has no score on
    that metric, e.g. it was judged under another task: the gate's message says so)."""

    rules = (
        Rule(
            cel="!has(self.minAccuracy) || double(self.minAccuracy) <= 1.0",
            message="serving.gate.minAccuracy must be between 0 and 1",
            check=lambda g: g.min_accuracy is None or float(g.min_accuracy) <= 1.0,
            field_path=".minAccuracy",
        ),
    )


class ServingResources(ApiModel):
    """Resources of one inference pod."""

    cpu: Quantity = "2"
    """CPU request and limit."""
    memory: Quantity = "4Gi"
    """Memory request and limit."""
    gpus: Annotated[int, Field(ge=0, le=8)] = 0
    """GPUs per inference pod (for `device: CUDA`)."""


class ServingSpec(ApiModel):
    """The inference Deployment rolled out after training: ONNX Runtime behind an
    OpenAI-compatible API."""

    enabled: bool = True
    """Export and serve the model after training."""
    replicas: Annotated[int, Field(ge=1, le=100)] = 1
    """Inference pods."""
    precision: Precision = Precision.AUTO
    """ONNX weight precision. `Auto` on CPU: the fastest of INT4 (GPTQ), INT4 (KQuantMixed)
    and INT8 whose held-out answers stay within a point of FP32's on the task's primary
    metric (exact match, macroF1, tokenF1, chrF, rougeL; Chat: teacher-forced agreement and
    loss), FP32 when none does (the export's `export.json` records what was tried); FP16 on
    CUDA. `INT8` runs on CPU."""
    quantization: Quantization | None = None
    """How INT4 weights are rounded (only with `precision: INT4`); default `RTN`. `GPTQ` keeps
    RTN's speed and most of FP32's accuracy."""
    device: Device = Device.CPU
    """Where inference runs."""
    gate: GateSpec | None = None
    """Checks a new model must pass before it replaces the serving one."""
    resources: ServingResources | None = None
    """Resources of each inference pod."""
    max_tokens_limit: Annotated[int, Field(ge=1, le=131072)] = 1024
    """Largest `max_tokens` a request may ask for."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret holding the API key clients must send (`Authorization: Bearer <key>`, as
    OpenAI clients do with `api_key`). It reaches the inference pods only as the environment
    variable `KUBETUNE_API_KEY` from the Secret. Unset: the endpoint asks for no key, and
    anyone who reaches the Service can generate. `/healthz`, `/readyz` and `/metrics` never
    ask for one (probes and scrapers send none); a change rolls the pods, not the training."""
    share: PoolName | None = None
    """Serve this job's adapter from a pool: one Deployment and Service, named after the pool,
    shared by the FineTuneJobs of this namespace that name the same pool and have the same
    base (`model.source` and `revision`) and export (`precision`, `quantization`, `device`).
    The pool's server holds the base once and loads each member's adapter at run time; a
    request's `model` (the job's name) picks the adapter. A job whose model is no adapter
    (`Full`, `DoRA`) or whose base differs from the pool's is served on its own Deployment,
    and `status.serving.notSharedReason` says why. A string rather than an object of its own
    (a `ServingPool` kind): a pool exists exactly while some job names it, so nobody has to
    create or delete it, and a typo shows as a pool of one in status. A lowercase DNS label
    of at most 40 characters."""

    rules = (
        Rule(
            cel="!(self.device == 'CPU' && self.precision == 'FP16')",
            message="serving.precision FP16 is not supported on CPU; use INT4, INT8, FP32 or Auto",
            check=lambda s: not (s.device == Device.CPU and s.precision == Precision.FP16),
            field_path=".precision",
        ),
        Rule(
            cel="!(self.device == 'CUDA' && self.precision == 'INT8')",
            message="serving.precision INT8 is built and measured for CPU only; use INT4, FP16 "
            "or FP32 on CUDA",
            check=lambda s: not (s.device == Device.CUDA and s.precision == Precision.INT8),
            field_path=".precision",
        ),
        Rule(
            cel="!has(self.quantization) || self.precision == 'INT4'",
            message="serving.quantization applies to precision INT4 only",
            check=lambda s: s.quantization is None or s.precision == Precision.INT4,
            field_path=".quantization",
        ),
        Rule(
            cel="!(self.device == 'CUDA' && has(self.quantization) && self.quantization == 'GPTQ')",
            message="serving.quantization GPTQ is built for CPU only",
            check=lambda s: not (s.device == Device.CUDA and s.quantization == Quantization.GPTQ),
            field_path=".quantization",
        ),
        Rule(
            cel="!has(self.share) || !has(self.apiKeySecretRef)",
            message="serving.share and serving.apiKeySecretRef cannot be combined: a pool is one "
            "endpoint for every member, and per-member keys are not supported",
            check=lambda s: s.share is None or s.api_key_secret_ref is None,
            field_path=".share",
        ),
        Rule(
            cel="self.device != 'CUDA' || !has(self.resources) || self.resources.gpus >= 1",
            message="serving.device CUDA needs serving.resources.gpus of at least 1",
            check=lambda s: s.device != Device.CUDA
            or s.resources is None
            or s.resources.gpus >= 1,
        ),
    )


HTTP_URL_PATTERN = "^https?://[^/?# ]+([/?#].*)?$"
"""An http(s) URL with a host: what an OpenAI client can be pointed at."""


class JudgeSpec(ApiModel):
    """An LLM judge reached through an OpenAI-compatible chat completions endpoint. It
    compares the base and the fine-tuned model's answers to each validation prompt in both
    orders, so a preference for the first or the second position cancels out."""

    endpoint: Uri
    """Base URL of the OpenAI-compatible API (`https://host/v1`), e.g. another FineTuneJob's
    `status.serving.endpoint` or a hosted model. A real judge must be much stronger than the
    model it judges."""
    model: ShortString
    """The `model` sent with each judging request."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret holding the judge's API key; it reaches the trainer only through its
    environment."""
    rubric: Annotated[str, Field(max_length=4096)] | None = None
    """What makes one answer better than another, in the judge's prompt (a general rubric
    when unset)."""

    rules = (
        Rule(
            cel=f"self.endpoint.matches('{HTTP_URL_PATTERN}')",
            message="evaluation.judge.endpoint must be an http:// or https:// URL with a host, "
            "e.g. https://judge.example/v1",
            check=lambda j: re.match(HTTP_URL_PATTERN, j.endpoint) is not None,
            field_path=".endpoint",
        ),
    )


def _task_metrics_cel(task: str) -> str:
    """CEL for the list of metrics the task `task` (a CEL string expression) has."""
    table = ", ".join(
        f"'{name.value}': [{', '.join(repr(m.value) for m in metrics)}]"
        for name, metrics in TASK_METRICS.items()
    )
    return f"{{{table}}}[{task}]"


def _compared_cel(task: str) -> str:
    """CEL for the metric the gate compares for the task `task` (a CEL string expression)."""
    table = ", ".join(f"'{name.value}': '{metric.value}'"
                      for name, metric in COMPARED_METRIC.items())
    return f"{{{table}}}[{task}]"


TASK_METRICS_LISTED = "; ".join(
    f"{task.value}: {', '.join(metrics)}" for task, metrics in TASK_METRICS.items()
)
"""Each task's metrics, for the messages of the rules that refuse another."""

Labels = Annotated[
    list[ShortString],
    # A set: the API server refuses a repeated label itself (a CEL uniqueness check over 256
    # labels would cost more than a rule may).
    Field(max_length=256, json_schema_extra={"x-kubernetes-list-type": "set"}),
]


class EvaluationSpec(ApiModel):
    """How the fine-tuned model is judged: the task, and the metrics its users trust."""

    task: Task = Task.GENERATION
    """`Generation` (exact match and loss), `Classification`, `Extraction`, `Translation`,
    `Summarization` or `Chat`."""
    labels: Labels | None = None
    """`Classification` (required there, at least 2, each once): the labels an answer may
    be; any other answer counts as wrong and is counted apart (`outOfLabels`)."""
    metrics: Annotated[list[Metric], Field(max_length=16)] | None = None
    """The metrics to report (each must be one of the task's, and the one the gate compares
    must be among them: evalLoss for Generation and Chat, else the primary metric); all of
    the task's when unset.
    Generation: exactMatch, evalLoss, perplexity. Classification: accuracy, macroF1,
    outOfLabels, evalLoss, perplexity. Extraction: exactMatch, tokenF1, fieldPrecision,
    fieldRecall, evalLoss, perplexity. Translation: chrF, bleu, evalLoss, perplexity.
    Summarization: rougeL, evalLoss, perplexity. Chat: evalLoss, perplexity, judgeWinRate
    (with a judge)."""
    judge: JudgeSpec | None = None
    """`Chat`: an LLM judge of base vs fine-tuned answers; the trainer reports the fine-tuned
    model's `judgeWinRate` and each record's verdicts (`evaluation.jsonl`)."""

    rules = (
        Rule(
            cel="!has(self.labels) || self.task == 'Classification'",
            message="evaluation.labels apply only to task Classification",
            check=lambda e: e.labels is None or e.task is Task.CLASSIFICATION,
            field_path=".labels",
        ),
        Rule(
            cel="self.task != 'Classification' || (has(self.labels) && size(self.labels) >= 2)",
            message="evaluation task Classification needs labels: at least 2, each once",
            check=lambda e: e.task is not Task.CLASSIFICATION or len(e.labels or ()) >= 2,
            field_path=".labels",
        ),
        Rule(
            cel=f"!has(self.metrics) || self.metrics.all(m, m in {_task_metrics_cel('self.task')})",
            message="each of evaluation.metrics must be one of the task's metrics: "
            + TASK_METRICS_LISTED,
            check=lambda e: all(m in TASK_METRICS[e.task] for m in e.metrics or ()),
            field_path=".metrics",
        ),
        Rule(
            cel=f"!has(self.metrics) || {_compared_cel('self.task')} in self.metrics",
            message="evaluation.metrics, when set, must include the metric the gate's "
            "mustBeatBase and mustBeatServing compare: "
            + ", ".join(f"{task.value}: {metric}" for task, metric in COMPARED_METRIC.items()),
            check=lambda e: e.metrics is None or COMPARED_METRIC[e.task] in e.metrics,
            field_path=".metrics",
        ),
        Rule(
            cel="!has(self.metrics) || !('judgeWinRate' in self.metrics) || has(self.judge)",
            message="evaluation.metrics judgeWinRate needs evaluation.judge",
            check=lambda e: Metric.JUDGE_WIN_RATE not in (e.metrics or ()) or e.judge is not None,
            field_path=".metrics",
        ),
        Rule(
            # A judge the run would not ask (its task has no judgeWinRate, or the metrics
            # leave it out) would be a setting that silently does nothing.
            cel="!has(self.judge) || (self.task == 'Chat' && (!has(self.metrics) || "
            "'judgeWinRate' in self.metrics))",
            message="evaluation.judge applies only to task Chat, and needs judgeWinRate in "
            "evaluation.metrics when they are listed",
            check=lambda e: e.judge is None or (
                e.task is Task.CHAT
                and (e.metrics is None or Metric.JUDGE_WIN_RATE in e.metrics)),
            field_path=".judge",
        ),
    )

    @field_validator("labels")
    @classmethod
    def _labels_once(cls, labels: list[str] | None) -> list[str] | None:
        """The Python twin of the CRD's list-type set."""
        repeated = sorted({label for label in labels or () if (labels or []).count(label) > 1})
        if repeated:
            raise ValueError(f"each label must appear once; repeated: {', '.join(repeated)}")
        return labels


def _gate_keys_rule(bounds: Literal["min", "max"]) -> Rule:
    """`serving.gate.<bounds>` may bound only the job's task's metrics (judgeWinRate only with a
    judge): a bound on a metric the trainer never measures could never pass."""
    task = (
        "(has(self.evaluation) && has(self.evaluation.task) ? self.evaluation.task : "
        "'Generation')"
    )
    keys = f"self.serving.gate.{bounds}"
    judged = "has(self.evaluation) && has(self.evaluation.judge)"
    cel = (
        f"!has(self.serving) || !has(self.serving.gate) || !has({keys}) || "
        f"{keys}.all(k, k in {_task_metrics_cel(task)} && (k != 'judgeWinRate' || {judged}))"
    )

    def check(spec: FineTuneJobSpec) -> bool:
        gate = spec.serving.gate
        keys = (gate.min_bounds if bounds == "min" else gate.max_bounds) if gate else None
        allowed = TASK_METRICS[spec.evaluation.task]
        return all(
            key in allowed and (key is not Metric.JUDGE_WIN_RATE or spec.evaluation.judge)
            for key in keys or {}
        )

    return Rule(
        cel=cel,
        message=f"serving.gate.{bounds} may bound only the metrics of spec.evaluation.task "
        "(judgeWinRate only with evaluation.judge): "
        + TASK_METRICS_LISTED,
        check=check,
        field_path=f".serving.gate.{bounds}",
    )


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, how, on what hardware, and how to serve the result."""

    model: ModelSpec
    """The base model."""
    dataset: DatasetSpec
    """The training data."""
    method: Method = Method.LORA
    """`LoRA`, `QLoRA` (4-bit NF4 base), `DoRA` (weight-decomposed LoRA) or `Full`
    (every weight trained)."""
    lora: LoraSpec | None = None
    """Adapter settings; only for `LoRA`, `QLoRA` and `DoRA` (defaults apply when unset)."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Hyperparameters."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Nodes, GPUs and placement of the trainer pods."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """DeepSpeed ZeRO settings."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpointing and resume."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """The artifact volume."""
    serving: ServingSpec = Field(default_factory=ServingSpec)
    """Export and inference after training."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """The task and the metrics the validation records, the exported model and the gate are
    judged by."""
    suspend: bool = False
    """Suspend training (pods are removed; a later resume continues from the newest
    checkpoint). Kueue also sets this."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Fail the training Job when it runs longer than this."""

    rules = (
        Rule(
            cel="self.method != 'Full' || !has(self.lora)",
            message="lora settings apply only to LoRA, QLoRA and DoRA; remove spec.lora "
            "or choose another method",
            check=lambda s: s.method != Method.FULL or s.lora is None,
            field_path=".lora",
        ),
        _gate_keys_rule("min"),
        _gate_keys_rule("max"),
    )

    @property
    def lora_or_default(self) -> LoraSpec:
        return self.lora or LoraSpec()
