"""The planner: world size, ZeRO stage, offload and batch split from a spec (pure, no I/O).

Memory model per GPU (performance.md section 3), in bytes:

- frozen base weights: 2 B/param in bf16, ~0.56 B/param in NF4 (QLoRA, absmax included);
- trained parameters: mixed-precision Adam, 16 B/param = bf16 weight 2 + bf16 grad 2 +
  fp32 master weight, momentum and variance 12;
- ZeRO partitions across the world size: stage 1 the optimizer states, stage 2 also the
  gradients, stage 3 also the parameters (frozen ones included). CPU offload moves the
  optimizer states (and at stage 3 the parameters) to host memory; stage 3 keeps the layers
  being gathered on the GPU;
- activations: micro-batch x sequence x layers x hidden x a per-method factor measured on
  the Llama architecture with SDPA (saved-tensor bytes of SmolLM2 in bf16: full 43 h,
  LoRA 65 h, LoRA with dropout 99 h, DoRA 177 h per token and layer, linear in the
  sequence length). Gradient checkpointing keeps only each layer's bf16 input (2 h) plus
  one layer being recomputed;
- logits: micro-batch x sequence x vocabulary x 4 B (the fp32 logits the loss keeps);
- CUDA context and workspaces (1 GiB) and 5 % allocator slack on what comes and goes.

A plan fits when the estimate is at most 90 % of `resources.gpuMemoryGiB`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from kubetune.api.deepspeed import STAGE3_MAX_LIVE_PARAMETERS
from kubetune.api.spec import FineTuneJobSpec, Method, ZeroOffload
from kubetune.api.status import PlanStatus

GIB = 1024**3
AUTO_GLOBAL_BATCH = 16
USABLE_FRACTION = 0.9
CUDA_OVERHEAD_GIB = 1.0
ALLOCATOR_SLACK = 0.05
BASE_BYTES = {"bf16": 2.0, "nf4": 0.56}
# Mixed-precision Adam: bf16 weight, bf16 gradient, fp32 master + momentum + variance.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2.0, 2.0, 12.0
LOGIT_BYTES = 4.0
CHECKPOINT_BYTES_PER_HIDDEN = 2.0
# DoRA also keeps weight-sized tensors for the column norms (~8 B per frozen linear weight).
DORA_WEIGHT_BYTES = 8.0
# ZeRO-3 holds the layer being computed and the one being prefetched, in full, up to
# `stage3_max_live_parameters` (DeepSpeed's default, written by kubetune.api.deepspeed).
ZERO3_LIVE_LAYERS = 2
CPU_HOST_BUDGET_GIB = 8.0
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """No plan fits the hardware, or the model's size cannot be known. The message says
    what would fit."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a decoder-only transformer."""

    parameters: int
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    vocab: int

    def module_dims(self, name: str) -> tuple[int, int]:
        """(in, out) features of a linear module of one layer."""
        h, ff = self.hidden, self.intermediate
        dims = {"q_proj": (h, h), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (h, h), "gate_proj": (h, ff), "up_proj": (h, ff),
                "down_proj": (ff, h)}
        return dims.get(name, (h, h))

    @property
    def linear_parameters_per_layer(self) -> int:
        return sum(i * o for i, o in map(self.module_dims, LORA_MODULES))

    @property
    def layer_parameters(self) -> int:
        return max(self.linear_parameters_per_layer, self.parameters // max(self.layers, 1))

    def adapter_parameters(self, rank: int, targets: list[str], dora: bool) -> int:
        names = LORA_MODULES if "all-linear" in targets else tuple(dict.fromkeys(targets))
        per_layer = 0
        for name in names:
            fan_in, fan_out = self.module_dims(name)
            per_layer += rank * (fan_in + fan_out) + (fan_out if dora else 0)
        return per_layer * self.layers


def _shape(params: float, hidden: int, layers: int, ff: int, kv: int, vocab: int) -> ModelShape:
    return ModelShape(int(params), hidden, layers, ff, kv, vocab)


# (name pattern, shape): published configs; `parameters` here is only used for builtin models.
KNOWN_SHAPES: tuple[tuple[str, ModelShape], ...] = (
    (r"smollm2-135m", _shape(134_515_008, 576, 30, 1536, 192, 49152)),
    (r"smollm2-360m", _shape(361.8e6, 960, 32, 2560, 320, 49152)),
    (r"smollm2-1\.7b", _shape(1.71e9, 2048, 24, 8192, 2048, 49152)),
    (r"tinyllama.*1\.1b", _shape(1.1e9, 2048, 22, 5632, 256, 32000)),
    (r"llama-2-7b", _shape(6.74e9, 4096, 32, 11008, 4096, 32000)),
    (r"llama-2-13b", _shape(13.0e9, 5120, 40, 13824, 5120, 32000)),
    (r"llama-2-70b", _shape(69.0e9, 8192, 80, 28672, 1024, 32000)),
    (r"llama-3\.2-1b", _shape(1.24e9, 2048, 16, 8192, 512, 128256)),
    (r"llama-3\.2-3b", _shape(3.21e9, 3072, 28, 8192, 1024, 128256)),
    (r"llama-3(\.\d)?-8b", _shape(8.03e9, 4096, 32, 14336, 1024, 128256)),
    (r"llama-3(\.\d)?-70b", _shape(70.6e9, 8192, 80, 28672, 1024, 128256)),
    (r"mistral-7b", _shape(7.24e9, 4096, 32, 14336, 1024, 32768)),
    (r"qwen2\.5-0\.5b", _shape(0.49e9, 896, 24, 4864, 128, 151936)),
    (r"qwen2\.5-1\.5b", _shape(1.54e9, 1536, 28, 8960, 256, 151936)),
    (r"qwen2\.5-7b", _shape(7.6e9, 3584, 28, 18944, 512, 152064)),
)
_SIZE_IN_NAME = re.compile(r"(?:^|[-_/ ])(\d+(?:\.\d+)?)([bm])(?![a-z0-9])", re.IGNORECASE)


def parameter_count(spec: FineTuneJobSpec) -> int:
    """Base-model parameters: `model.parameterCount`, a built-in model, or the size in the
    source's name (`Llama-2-7b-hf` -> 7e9, `SmolLM2-135M` -> 135e6)."""
    if spec.model.parameter_count is not None:
        return spec.model.parameter_count
    source = spec.model.source
    known = known_shape(source)
    if source.startswith("builtin://") and known is not None:
        return known.parameters
    name = source.split("://", 1)[-1].rstrip("/")
    match = _SIZE_IN_NAME.search(name.rsplit("/", 1)[-1]) or _SIZE_IN_NAME.search(name)
    if match is None:
        raise PlanError(
            f"cannot tell the size of model {source!r} from its name; set "
            "spec.model.parameterCount (for example 7000000000 for a 7B model)"
        )
    scale = 1e9 if match.group(2).lower() == "b" else 1e6
    return int(float(match.group(1)) * scale)


def known_shape(source: str) -> ModelShape | None:
    """The published shape whose pattern matches the source, with its own parameter count."""
    lowered = source.lower()
    return next((shape for pattern, shape in KNOWN_SHAPES if re.search(pattern, lowered)), None)


def model_shape(spec: FineTuneJobSpec) -> ModelShape:
    """Shape from the table when the name is known, else a Llama-like shape of that size."""
    params = parameter_count(spec)
    known = known_shape(spec.model.source)
    if known is not None:
        return replace(known, parameters=params)
    # Llama-like: ~12 h^2 per layer, about 128 hidden units per layer; a large vocabulary
    # keeps the logits estimate on the safe side.
    hidden = max(64, round((params * 128 / 12) ** (1 / 3) / 64) * 64)
    layers = max(1, round(hidden / 128))
    return ModelShape(params, hidden, layers, hidden * 8 // 3, hidden, 128256)


def activation_bytes_per_hidden(method: Method, lora_dropout: float) -> float:
    """Saved-activation bytes per token and layer, as a multiple of the hidden size."""
    if method is Method.FULL:
        return 44.0
    if method is Method.DORA:
        return 180.0
    return 100.0 if lora_dropout > 0 else 66.0


def estimate_memory_gib(
    shape: ModelShape,
    *,
    method: Method,
    trainable: int,
    zero_stage: int,
    offload: bool,
    world_size: int,
    micro_batch: int,
    seq_length: int,
    gradient_checkpointing: bool,
    lora_dropout: float = 0.05,
) -> float:
    """Estimated peak memory of one GPU in GiB (see the module docstring)."""
    base_bytes = BASE_BYTES["nf4" if method is Method.QLORA else "bf16"]
    frozen = 0 if method is Method.FULL else shape.parameters
    shards = max(world_size, 1)

    def shard(nbytes: float, from_stage: int) -> float:
        return nbytes / shards if zero_stage >= from_stage else nbytes

    weights = frozen * base_bytes + trainable * WEIGHT_BYTES
    weights = 0.0 if offload and zero_stage >= 3 else shard(weights, 3)
    grads = shard(trainable * GRAD_BYTES, 2)
    optimizer = 0.0 if offload else shard(trainable * OPTIMIZER_BYTES, 1)
    live = 0.0
    if zero_stage >= 3 and (shards > 1 or offload):
        gathered = min(ZERO3_LIVE_LAYERS * shape.layer_parameters, STAGE3_MAX_LIVE_PARAMETERS)
        live = gathered * base_bytes

    tokens = micro_batch * seq_length
    per_layer = activation_bytes_per_hidden(method, lora_dropout) * tokens * shape.hidden
    if method is Method.DORA:
        per_layer += DORA_WEIGHT_BYTES * shape.linear_parameters_per_layer
    if gradient_checkpointing:
        checkpoints = CHECKPOINT_BYTES_PER_HIDDEN * tokens * shape.hidden * shape.layers
        activations = checkpoints + per_layer
    else:
        activations = per_layer * shape.layers
    logits = tokens * shape.vocab * LOGIT_BYTES
    transient = (activations + logits) * (1 + ALLOCATOR_SLACK)
    return (weights + grads + optimizer + live + transient) / GIB + CUDA_OVERHEAD_GIB


@dataclass(frozen=True)
class _Choice:
    zero_stage: int
    offload: bool
    micro_batch: int
    memory_gib: float


def _powers_of_two_down(limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(max(limit, 1))), -1, -1)]


def _trainable(spec: FineTuneJobSpec, shape: ModelShape) -> int:
    if spec.method is Method.FULL:
        return shape.parameters
    lora = spec.lora_or_default
    return shape.adapter_parameters(lora.rank, lora.target_modules, spec.method is Method.DORA)


def _global_batch(spec: FineTuneJobSpec) -> int:
    size = spec.training.batch_size
    return AUTO_GLOBAL_BATCH if size == "Auto" else int(size)


def _world_size(spec: FineTuneJobSpec) -> int:
    return spec.resources.nodes * max(spec.resources.gpus_per_node, 1)


def _estimate(spec: FineTuneJobSpec, shape: ModelShape, stage: int, offload: bool,
              micro: int) -> float:
    return estimate_memory_gib(
        shape,
        method=spec.method,
        trainable=_trainable(spec, shape),
        zero_stage=stage,
        offload=offload,
        world_size=_world_size(spec),
        micro_batch=micro,
        seq_length=spec.training.max_seq_length,
        gradient_checkpointing=spec.training.gradient_checkpointing,
        lora_dropout=float(spec.lora_or_default.dropout),
    )


def _options(spec: FineTuneJobSpec) -> list[tuple[int, bool]]:
    """(stage, offload) pairs to try, fastest first: no offload before any offload."""
    stages = [0, 1, 2, 3] if spec.deepspeed.zero_stage == "Auto" else [
        int(spec.deepspeed.zero_stage)]
    options = [(stage, False) for stage in stages]
    if spec.deepspeed.offload is ZeroOffload.CPU:
        options += [(stage, True) for stage in stages if stage >= 2]
    return options


def _search(spec: FineTuneJobSpec, budget_gib: float) -> _Choice | None:
    """The first option that fits, with the largest micro-batch that fits it."""
    shape = model_shape(spec)
    largest = max(1, _global_batch(spec) // _world_size(spec))
    for stage, offload in _options(spec):
        for micro in _powers_of_two_down(largest):
            memory = _estimate(spec, shape, stage, offload, micro)
            if memory <= budget_gib:
                return _Choice(stage, offload, micro, memory)
    return None


def _split(spec: FineTuneJobSpec, micro: int) -> tuple[int, int]:
    """(gradient accumulation, global batch) for a micro-batch: the global batch is what the
    run really does, which rounds up when the requested one does not divide evenly."""
    world = _world_size(spec)
    accumulation = math.ceil(_global_batch(spec) / (micro * world))
    return accumulation, micro * accumulation * world


def _status(spec: FineTuneJobSpec, choice: _Choice, memory: str, reason: str) -> PlanStatus:
    accumulation, global_batch = _split(spec, choice.micro_batch)
    shape = model_shape(spec)
    return PlanStatus(
        world_size=_world_size(spec),
        zero_stage=choice.zero_stage,
        offload="CPU" if choice.offload else "None",
        micro_batch_size=choice.micro_batch,
        gradient_accumulation_steps=accumulation,
        global_batch_size=global_batch,
        estimated_gpu_memory_gib=memory,
        parameters=shape.parameters,
        trainable_parameters=_trainable(spec, shape),
        reason=reason,
    )


def _plan_cpu(spec: FineTuneJobSpec) -> PlanStatus:
    """CPU training: one process per node (gloo). No GPU check; the micro-batch is bounded by
    a host-memory budget, estimated in fp32 (twice the bf16 bytes) since CPUs train in fp32."""
    world = _world_size(spec)
    requested = spec.deepspeed.zero_stage
    if requested != "Auto":
        stage, why = int(requested), f"ZeRO-{requested} as requested"
    elif world == 1:
        stage, why = 0, "one process needs no ZeRO partitioning"
    elif spec.method is Method.FULL:
        stage, why = 2, "ZeRO-2 splits optimizer states and gradients across the processes"
    else:
        stage, why = 0, "adapter optimizer states are small, so plain data parallel (ZeRO-0)"
    shape = model_shape(spec)
    largest = max(1, _global_batch(spec) // world)

    def host_gib(micro: int) -> float:
        return 2 * (_estimate(spec, shape, stage, False, micro) - CUDA_OVERHEAD_GIB)

    micro = next(
        (m for m in _powers_of_two_down(largest) if host_gib(m) <= CPU_HOST_BUDGET_GIB), 1
    )
    host = host_gib(micro)
    reason = (
        f"CPU training: {world} process(es), {why}; micro-batch {micro} keeps the estimated "
        f"host memory per process near {host:.1f} GiB (budget {CPU_HOST_BUDGET_GIB:g} GiB)"
    )
    if spec.deepspeed.offload is ZeroOffload.CPU:
        reason += "; offload ignored (already on the CPU)"
    return _status(spec, _Choice(stage, False, micro, 0.0), "0", reason)


def plan(spec: FineTuneJobSpec) -> PlanStatus:
    """Resolve world size, ZeRO stage, offload and batch split, or raise PlanError."""
    if spec.resources.gpus_per_node == 0:
        return _plan_cpu(spec)
    budget = USABLE_FRACTION * spec.resources.gpu_memory_gib
    choice = _search(spec, budget)
    if choice is None:
        raise PlanError(_refusal(spec, budget))
    how = "the lowest ZeRO stage" if spec.deepspeed.zero_stage == "Auto" else "ZeRO stage"
    reason = (
        f"{_describe(spec)}: {how} {choice.zero_stage}"
        f"{' with CPU offload (nothing fits without it)' if choice.offload else ''} fits with "
        f"micro-batch {choice.micro_batch} at ~{choice.memory_gib:.1f} GiB per GPU "
        f"(usable {budget:.1f} of {spec.resources.gpu_memory_gib} GiB)"
    )
    return _status(spec, choice, f"{choice.memory_gib:.1f}", reason)


def _describe(spec: FineTuneJobSpec) -> str:
    params = parameter_count(spec)
    size = f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    res = spec.resources
    return (
        f"{size} {spec.method.value} on {res.nodes} node(s) x {res.gpus_per_node} GPU(s) of "
        f"{res.gpu_memory_gib} GiB"
    )


def _alternatives(spec: FineTuneJobSpec) -> list[tuple[str, FineTuneJobSpec]]:
    """Changes a user could make, least disruptive first."""
    training = spec.training
    ckpt = spec.model_copy(update={"training": training.model_copy(
        update={"gradient_checkpointing": True})})
    prefix = "" if training.gradient_checkpointing else "training.gradientCheckpointing: true, "
    out: list[tuple[str, FineTuneJobSpec]] = []
    if not training.gradient_checkpointing:
        out.append(("training.gradientCheckpointing: true", ckpt))
    auto = ckpt.model_copy(update={"deepspeed": ckpt.deepspeed.model_copy(
        update={"zero_stage": "Auto"})})
    if spec.deepspeed.zero_stage != "Auto":
        out.append((f"{prefix}deepspeed.zeroStage: Auto", auto))
    if spec.method in (Method.LORA, Method.DORA):
        out.append((f"{prefix}method: QLoRA", auto.model_copy(update={"method": Method.QLORA})))
    res = spec.resources
    for total in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if total <= res.nodes * res.gpus_per_node:
            continue
        per_node = min(total, max(res.gpus_per_node, 8))
        more = auto.model_copy(update={"resources": res.model_copy(update={
            "nodes": math.ceil(total / per_node), "gpus_per_node": per_node})})
        if _search(more, USABLE_FRACTION * res.gpu_memory_gib):
            out.append((f"{prefix}{more.resources.nodes} node(s) x {per_node} GPUs", more))
            break
    out.append((f"{prefix}deepspeed.offload: CPU (slow)", auto.model_copy(update={
        "deepspeed": auto.deepspeed.model_copy(update={"offload": ZeroOffload.CPU})})))
    return out


def _refusal(spec: FineTuneJobSpec, budget: float) -> str:
    shape = model_shape(spec)
    floor = min(_estimate(spec, shape, stage, offload, 1) for stage, offload in _options(spec))
    stage = spec.deepspeed.zero_stage
    what = "any ZeRO stage" if stage == "Auto" else f"ZeRO stage {stage}"
    lines = [
        f"{_describe(spec)} does not fit with {what}: at least {floor:.1f} GiB per GPU at "
        f"micro-batch 1 and maxSeqLength {spec.training.max_seq_length}, "
        f"{budget:.1f} GiB usable (90% of gpuMemoryGiB)."
    ]
    fits = []
    for change, candidate in _alternatives(spec):
        choice = _search(candidate, budget)
        if choice is not None:
            fits.append(
                f"{change} (ZeRO-{choice.zero_stage}{' + CPU offload' if choice.offload else ''}"
                f", micro-batch {choice.micro_batch}, ~{choice.memory_gib:.1f} GiB per GPU)"
            )
    if fits:
        lines.append("Would fit: " + "; or ".join(fits[:4]) + ".")
    else:
        lines.append("Nothing close fits: use GPUs with more memory or a smaller model.")
    return " ".join(lines)
