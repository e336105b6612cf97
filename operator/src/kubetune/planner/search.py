"""The planner's search: the fastest ZeRO stage, offload and micro-batch that fit a budget.

Separate from `kubetune.planner.plan` because both the plan and the advice on a refusal run it: the
planner calls it once for the spec and once per alternative it suggests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubetune.api.spec import FineTuneJobSpec, Method, ZeroOffload
from kubetune.planner.memory import estimate_host_memory_gib, estimate_memory_gib
from kubetune.planner.shapes import ModelShape

AUTO_GLOBAL_BATCH = 16


@dataclass(frozen=True)
class Choice:
    zero_stage: int
    offload: bool
    micro_batch: int
    memory_gib: float


def powers_of_two_down(limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(max(limit, 1))), -1, -1)]


def trainable_parameters(spec: FineTuneJobSpec, shape: ModelShape) -> int:
    if spec.method is Method.FULL:
        return shape.parameters
    lora = spec.lora_or_default
    return shape.adapter_parameters(lora.rank, lora.target_modules, spec.method is Method.DORA)


def global_batch(spec: FineTuneJobSpec) -> int:
    size = spec.training.batch_size
    return AUTO_GLOBAL_BATCH if size == "Auto" else int(size)


def world_size_of(spec: FineTuneJobSpec) -> int:
    return spec.resources.nodes * max(spec.resources.gpus_per_node, 1)


def estimate_gib(
    spec: FineTuneJobSpec, shape: ModelShape, stage: int, offload: bool, micro: int
) -> float:
    return estimate_memory_gib(
        shape,
        method=spec.method,
        trainable=trainable_parameters(spec, shape),
        zero_stage=stage,
        offload=offload,
        world_size=world_size_of(spec),
        micro_batch=micro,
        seq_length=spec.training.max_seq_length,
        gradient_checkpointing=spec.training.gradient_checkpointing,
        lora_dropout=float(spec.lora_or_default.dropout),
    )


def estimate_host_gib(spec: FineTuneJobSpec, shape: ModelShape, stage: int, micro: int) -> float:
    """One CPU training process, with packed rows of `micro` x maxSeqLength tokens."""
    return estimate_host_memory_gib(
        shape,
        method=spec.method,
        trainable=trainable_parameters(spec, shape),
        zero_stage=stage,
        world_size=world_size_of(spec),
        tokens=micro * spec.training.max_seq_length,
        gradient_checkpointing=spec.training.gradient_checkpointing,
        lora_dropout=float(spec.lora_or_default.dropout),
    )


def stage_options(spec: FineTuneJobSpec) -> list[tuple[int, bool]]:
    """(stage, offload) pairs to try, fastest first: no offload before any offload."""
    stages = (
        [0, 1, 2, 3] if spec.deepspeed.zero_stage == "Auto" else [int(spec.deepspeed.zero_stage)]
    )
    options = [(stage, False) for stage in stages]
    if spec.deepspeed.offload is ZeroOffload.CPU:
        options += [(stage, True) for stage in stages if stage >= 2]
    return options


def search(spec: FineTuneJobSpec, budget_gib: float, shape: ModelShape) -> Choice | None:
    """The first option that fits, with the largest micro-batch that fits it."""
    largest = max(1, global_batch(spec) // world_size_of(spec))
    for stage, offload in stage_options(spec):
        for micro in powers_of_two_down(largest):
            memory = estimate_gib(spec, shape, stage, offload, micro)
            if memory <= budget_gib:
                return Choice(stage, offload, micro, memory)
    return None
