"""The DeepSpeed config a run uses: the plan's config with every `auto` value resolved.

The config comes from the run config (the operator and `kubetune run` generate it from the plan
with `kubetune.planner.deepspeed`); a run config without one gets the plan's ZeRO stage only.
`auto` values follow the transformers conventions: bf16 on GPUs that support it and fp32 on
CPUs, batch sizes from the plan, clipping from the spec, bucket sizes from the model's hidden
size. KubeTune passes its own AdamW and schedule, so `optimizer`/`scheduler` sections are
dropped and DeepSpeed is told to accept a client optimizer (also with CPU offload) and let the
trainer own accumulation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from kubetune.api import RunConfig


def base_config(run: RunConfig) -> dict[str, Any]:
    if run.deepspeed:
        return copy.deepcopy(run.deepspeed)
    # A run config written without one (by hand): the least DeepSpeed needs, from the plan.
    return {"zero_optimization": {"stage": run.plan.zero_stage}}


def _resolve(value: Any, known: dict[str, Any], key: str) -> Any:
    if isinstance(value, dict):
        resolved = {k: _resolve(v, known, k) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not _DROP}
    if value == "auto":
        return known.get(key, _DROP)
    return value


_DROP = object()


def resolve(run: RunConfig, world: int, hidden_size: int, on_gpu: bool) -> dict[str, Any]:
    """A config DeepSpeed accepts as is, consistent with the actual world size."""
    config = base_config(run)
    plan = run.plan
    bf16 = on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    known: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_clipping": float(run.spec.training.max_grad_norm),
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for section, enabled in (("bf16", bf16), ("fp16", False)):
        if isinstance(config.get(section), dict) and config[section].get("enabled") == "auto":
            config[section]["enabled"] = enabled
    config.setdefault("bf16", {"enabled": bf16})
    if not on_gpu:
        config["bf16"]["enabled"] = False  # CPUs train in fp32
    config = _resolve(config, known, "")
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    config["gradient_accumulation_steps"] = plan.gradient_accumulation_steps
    config["train_batch_size"] = plan.micro_batch_size * plan.gradient_accumulation_steps * world
    config.setdefault("gradient_clipping", known["gradient_clipping"])
    config["zero_allow_untested_optimizer"] = True
    config["zero_force_ds_cpu_optimizer"] = False
    config["managed_gradient_accumulation"] = False
    config.setdefault("steps_per_print", 10**9)  # the trainer logs progress itself
    config.setdefault("wall_clock_breakdown", False)
    return config


def uses_deepspeed(run: RunConfig, world: int) -> bool:
    """One process at ZeRO stage 0 trains with plain PyTorch (same math, less overhead)."""
    return world > 1 or run.plan.zero_stage > 0
