"""The planner: world size, ZeRO stage, offload and batch split from a spec (pure, no I/O).

A plan fits when the estimate is at most 90 % of `resources.gpuMemoryGiB`. The model's size
and shape live in `kubetune.planner.shapes`, the memory estimate in `kubetune.planner.memory` and
the search over ZeRO stages and micro-batches in `kubetune.planner.search`; this module turns a
search result into `status.plan`, plans CPU runs, and explains a refusal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kubetune.api.spec import FineTuneJobSpec, Method, ZeroOffload
from kubetune.api.status import PlanStatus
from kubetune.planner.memory import estimate_memory_gib
from kubetune.planner.search import (
    Choice,
    estimate_gib,
    estimate_host_gib,
    global_batch,
    powers_of_two_down,
    search,
    stage_options,
    trainable_parameters,
    world_size_of,
)
from kubetune.planner.shapes import ModelShape, PlanError, model_shape, parameter_count

# Callers and tests import these from here, as before the model and memory code moved out.
__all__ = ["PlanError", "estimate_memory_gib", "model_shape", "parameter_count", "plan"]

USABLE_FRACTION = 0.9
CPU_HOST_BUDGET_GIB = 8.0
CPU_ROW_TOKENS = 512
"""Tokens per CPU micro-batch to aim for. On the bench's 2-core AMD EPYC (LoRA, built-in
model, `bench/train_memory.py`), packed rows of 512 and 1,024 tokens trained equally fast
(124-159 tokens/s, noisy) and 2,048-token rows 10% slower, while the peak grows with the row
(2.25, 2.75 and 3.5 GiB): larger rows buy nothing on a CPU, so take the smaller."""


def _split(spec: FineTuneJobSpec, micro: int) -> tuple[int, int]:
    """(gradient accumulation, global batch) for a micro-batch: the global batch is what the
    run really does, which rounds up when the requested one does not divide evenly."""
    world = world_size_of(spec)
    accumulation = math.ceil(global_batch(spec) / (micro * world))
    return accumulation, micro * accumulation * world


def _status(spec: FineTuneJobSpec, shape: ModelShape, choice: Choice, memory: str, reason: str,
            host_memory: str | None = None) -> PlanStatus:
    accumulation, global_batch = _split(spec, choice.micro_batch)
    return PlanStatus(
        world_size=world_size_of(spec),
        zero_stage=choice.zero_stage,
        offload="CPU" if choice.offload else "None",
        micro_batch_size=choice.micro_batch,
        gradient_accumulation_steps=accumulation,
        global_batch_size=global_batch,
        estimated_gpu_memory_gib=memory,
        estimated_host_memory_gib=host_memory,
        parameters=shape.parameters,
        trainable_parameters=trainable_parameters(spec, shape),
        hidden_size=shape.hidden,
        layers=shape.layers,
        reason=reason,
    )


def _plan_cpu(spec: FineTuneJobSpec, shape: ModelShape) -> PlanStatus:
    """CPU training: one process per node (gloo). No GPU check; the micro-batch is the largest
    whose estimated resident memory per process (`estimate_host_memory_gib`, fp32) fits a
    host-memory budget."""
    world = world_size_of(spec)
    requested = spec.deepspeed.zero_stage
    if requested != "Auto":
        stage, why = int(requested), f"ZeRO-{requested} as requested"
    elif world == 1:
        stage, why = 0, "one process needs no ZeRO partitioning"
    elif spec.method is Method.FULL:
        stage, why = 2, "ZeRO-2 splits optimizer states and gradients across the processes"
    else:
        stage, why = 0, "adapter optimizer states are small, so plain data parallel (ZeRO-0)"
    rows = max(1, CPU_ROW_TOKENS // spec.training.max_seq_length)
    largest = min(max(1, global_batch(spec) // world), rows)

    def host_gib(micro: int) -> float:
        return estimate_host_gib(spec, shape, stage, micro)

    micro = next((m for m in powers_of_two_down(largest) if host_gib(m) <= CPU_HOST_BUDGET_GIB), 1)
    host = host_gib(micro)
    reason = (
        f"CPU training: {world} process(es), {why}; micro-batch {micro} (rows of up to "
        f"{micro * spec.training.max_seq_length} tokens; larger ones are no faster on CPUs) "
        f"with an estimated peak of {host:.1f} GiB per process (budget "
        f"{CPU_HOST_BUDGET_GIB:g} GiB)"
    )
    if spec.deepspeed.offload is ZeroOffload.CPU:
        reason += "; offload ignored (already on the CPU)"
    return _status(spec, shape, Choice(stage, False, micro, 0.0), "0", reason, f"{host:.1f}")


def plan(spec: FineTuneJobSpec, model_config: Mapping[str, Any] | None = None) -> PlanStatus:
    """Resolve world size, ZeRO stage, offload and batch split, or raise PlanError.
    `model_config` is the model's parsed config.json, when the caller could read it."""
    shape = model_shape(spec, model_config)
    if spec.resources.gpus_per_node == 0:
        return _plan_cpu(spec, shape)
    budget = USABLE_FRACTION * spec.resources.gpu_memory_gib
    choice = search(spec, budget, shape)
    if choice is None:
        raise PlanError(_refusal(spec, budget, shape))
    how = "the lowest ZeRO stage" if spec.deepspeed.zero_stage == "Auto" else "ZeRO stage"
    reason = (
        f"{_describe(spec, shape)}: {how} {choice.zero_stage}"
        f"{' with CPU offload (nothing fits without it)' if choice.offload else ''} fits with "
        f"micro-batch {choice.micro_batch} at ~{choice.memory_gib:.1f} GiB per GPU "
        f"(usable {budget:.1f} of {spec.resources.gpu_memory_gib} GiB)"
    )
    return _status(spec, shape, choice, f"{choice.memory_gib:.1f}", reason)


def _describe(spec: FineTuneJobSpec, shape: ModelShape) -> str:
    params = shape.parameters
    size = f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    res = spec.resources
    return (
        f"{size} {spec.method.value} on {res.nodes} node(s) x {res.gpus_per_node} GPU(s) of "
        f"{res.gpu_memory_gib} GiB"
    )


def _alternatives(spec: FineTuneJobSpec, shape: ModelShape) -> list[tuple[str, FineTuneJobSpec]]:
    """Changes a user could make, least disruptive first."""
    training = spec.training
    ckpt = spec.model_copy(
        update={"training": training.model_copy(update={"gradient_checkpointing": True})}
    )
    prefix = "" if training.gradient_checkpointing else "training.gradientCheckpointing: true, "
    out: list[tuple[str, FineTuneJobSpec]] = []
    if not training.gradient_checkpointing:
        out.append(("training.gradientCheckpointing: true", ckpt))
    auto = ckpt.model_copy(
        update={"deepspeed": ckpt.deepspeed.model_copy(update={"zero_stage": "Auto"})}
    )
    if spec.deepspeed.zero_stage != "Auto":
        out.append((f"{prefix}deepspeed.zeroStage: Auto", auto))
    if spec.method in (Method.LORA, Method.DORA):
        out.append((f"{prefix}method: QLoRA", auto.model_copy(update={"method": Method.QLORA})))
    res = spec.resources
    for total in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if total <= res.nodes * res.gpus_per_node:
            continue
        per_node = min(total, max(res.gpus_per_node, 8))
        more = auto.model_copy(
            update={
                "resources": res.model_copy(
                    update={"nodes": math.ceil(total / per_node), "gpus_per_node": per_node}
                )
            }
        )
        if search(more, USABLE_FRACTION * res.gpu_memory_gib, shape):
            out.append((f"{prefix}{more.resources.nodes} node(s) x {per_node} GPUs", more))
            break
    out.append(
        (
            f"{prefix}deepspeed.offload: CPU (slow)",
            auto.model_copy(
                update={"deepspeed": auto.deepspeed.model_copy(update={"offload": ZeroOffload.CPU})}
            ),
        )
    )
    return out


def _refusal(spec: FineTuneJobSpec, budget: float, shape: ModelShape) -> str:
    floor = min(
        estimate_gib(spec, shape, stage, offload, 1) for stage, offload in stage_options(spec)
    )
    stage = spec.deepspeed.zero_stage
    what = "any ZeRO stage" if stage == "Auto" else f"ZeRO stage {stage}"
    lines = [
        f"{_describe(spec, shape)} does not fit with {what}: at least {floor:.1f} GiB per GPU at "
        f"micro-batch 1 and maxSeqLength {spec.training.max_seq_length}, "
        f"{budget:.1f} GiB usable (90% of gpuMemoryGiB)."
    ]
    fits = []
    for change, candidate in _alternatives(spec, shape):
        choice = search(candidate, budget, shape)
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
