"""The DeepSpeed config generated from spec + plan."""

from __future__ import annotations

from typing import Any

from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import PlanStatus
from kubetune.planner.deepspeed import deepspeed_config


def make_spec(**fields: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"source": "builtin://smollm2-135m-instruct"},
            "dataset": {"source": "builtin://kubectl-commands"},
            **fields,
        }
    )


def make_plan(stage: int, offload: str = "None", world: int = 4, micro: int = 2,
              accumulation: int = 3) -> PlanStatus:
    return PlanStatus(
        world_size=world,
        zero_stage=stage,
        offload=offload,
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        global_batch_size=world * micro * accumulation,
        estimated_gpu_memory_gib="10.0",
    )


def test_batch_fields_and_clipping() -> None:
    config = deepspeed_config(make_spec(training={"maxGradNorm": "0.5"}), make_plan(2))
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 2 * 3 * 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": "auto"}
    assert config["wall_clock_breakdown"] is False
    assert config["steps_per_print"] >= 1_000_000
    # The trainer builds AdamW and the schedule itself.
    assert "optimizer" not in config
    assert "scheduler" not in config


def test_stage_zero_has_no_zero_tuning() -> None:
    config = deepspeed_config(make_spec(), make_plan(0, world=1))
    assert config["zero_optimization"] == {"stage": 0}
    assert config["train_batch_size"] == 2 * 3


def test_stage_two_buckets_and_no_offload() -> None:
    zero = deepspeed_config(make_spec(), make_plan(2))["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["overlap_comm"] is True
    assert 1e7 <= zero["reduce_bucket_size"] <= 5e8
    assert 1e7 <= zero["allgather_bucket_size"] <= 5e8
    assert "offload_optimizer" not in zero
    assert "offload_param" not in zero


def test_offload_at_stage_two_moves_only_the_optimizer() -> None:
    zero = deepspeed_config(make_spec(deepspeed={"offload": "CPU"}),
                            make_plan(2, "CPU"))["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in zero


def test_offload_at_stage_three_moves_parameters_too() -> None:
    zero = deepspeed_config(make_spec(deepspeed={"offload": "CPU"}),
                            make_plan(3, "CPU"))["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["stage3_max_live_parameters"] == 1_000_000_000


def test_plan_from_planner_round_trips_into_config() -> None:
    from kubetune.planner.plan import plan

    spec = make_spec(resources={"nodes": 2, "gpusPerNode": 4}, training={"batchSize": 24})
    resolved = plan(spec)
    config = deepspeed_config(spec, resolved)
    assert config["train_batch_size"] == resolved.global_batch_size
    assert config["zero_optimization"]["stage"] == resolved.zero_stage
