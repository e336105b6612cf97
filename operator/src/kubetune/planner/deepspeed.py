"""The DeepSpeed config a run uses, generated from the spec and the plan (pure).

It goes into the run config (`RunConfig.deepspeed`) so the trainer never re-plans. What it
leaves out on purpose:

- no `optimizer` or `scheduler` section: the trainer builds its own AdamW and learning-rate
  schedule from `spec.training` and hands them to `deepspeed.initialize`, so there is one
  source of truth for learning rate, warm-up and weight decay (a DeepSpeed section would
  compete with it, and DeepSpeed's fused CPU Adam would need a compiled extension);
- no precision decision: `bf16.enabled` is `"auto"` and the trainer resolves it at run time
  (bf16 on GPUs that support it, fp32 on CPUs and older GPUs), because the operator does not
  know the nodes the pods land on.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import PlanStatus

# Bucket sizes in elements. 5e8 is DeepSpeed's default, but with `overlap_comm` buffers cost
# ~4.5x the bucket size (9 GB at 5e8, transformers' DeepSpeed guide); 2e8 keeps them near
# 3.6 GB in bf16 and still overlaps communication with the backward pass.
REDUCE_BUCKET_SIZE = 200_000_000
ALLGATHER_BUCKET_SIZE = 200_000_000
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000
# DeepSpeed's default, written out because the planner's ZeRO-3 working set assumes it.
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
STAGE3_PARAM_PERSISTENCE_THRESHOLD = 100_000
# Progress goes through kubetune's own reporting; DeepSpeed's step log would only add noise.
STEPS_PER_PRINT = 1_000_000_000


def _zero_optimization(plan: PlanStatus) -> dict[str, Any]:
    stage = plan.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    zero.update(
        {
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": REDUCE_BUCKET_SIZE,
        }
    )
    if stage in (1, 2):
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = ALLGATHER_BUCKET_SIZE
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": STAGE3_PREFETCH_BUCKET_SIZE,
                "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
                "stage3_param_persistence_threshold": STAGE3_PARAM_PERSISTENCE_THRESHOLD,
                # Save a consolidated 16-bit model so export does not need zero_to_fp32.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if plan.offload == "CPU":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(spec: FineTuneJobSpec, plan: PlanStatus) -> dict[str, Any]:
    """The DeepSpeed JSON config for this spec and plan.

    `train_batch_size` is micro-batch x accumulation x world size, which DeepSpeed checks
    against the other two at start-up; it equals `plan.globalBatchSize`.
    """
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": (
            plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size
        ),
        "gradient_clipping": float(spec.training.max_grad_norm),
        "bf16": {"enabled": "auto"},
        "zero_optimization": _zero_optimization(plan),
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
