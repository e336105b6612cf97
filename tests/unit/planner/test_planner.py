"""The planner against published memory numbers (performance.md section 3).

Expectations come from published runs, converted to GiB, with a tolerance wide enough for a
model and narrow enough that a wrong term (bytes per parameter, a missing ZeRO partition,
activations off by a factor) moves the estimate outside the range.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.spec import FineTuneJobSpec, Method
from kubetune.planner.plan import (
    PlanError,
    estimate_memory_gib,
    model_shape,
    parameter_count,
    plan,
)

LLAMA2_70B = "hf://meta-llama/Llama-2-70b-hf"


def make_spec(model: str = "builtin://smollm2-135m-instruct", **fields: Any) -> FineTuneJobSpec:
    document = {
        "model": {"source": model},
        "dataset": {"source": "builtin://kubectl-commands"},
        **fields,
    }
    return FineTuneJobSpec.model_validate(document)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("hf://example/Foo-7b-hf", 7e9),
        ("hf://example/Foo-70B-Instruct", 70e9),
        ("hf://example/bar-0.5B", 0.5e9),
        ("pvc://models/Tiny-135M", 135e6),
    ],
)
def test_parameter_count_from_name(source: str, expected: float) -> None:
    assert parameter_count(make_spec(source)) == int(expected)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # A published model's name: its config's exact count, not the name's rounded size.
        ("hf://meta-llama/Llama-2-7b-hf", 6_738_415_616),
        ("hf://meta-llama/Llama-3.3-70B-Instruct", 70_553_706_496),
        ("hf://Qwen/Qwen2.5-0.5B", 494_032_768),
        ("pvc://models/SmolLM2-135M", 134_515_008),
        ("hf://meta-llama/Llama-3.1-8B", 8_030_261_248),
        ("builtin://smollm2-135m-instruct", 134_515_008),
    ],
)
def test_parameter_count_of_a_published_model(source: str, expected: int) -> None:
    assert parameter_count(make_spec(source)) == expected


def test_parameter_count_field_wins_and_unknown_size_is_refused() -> None:
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "pvc://models/my-model", "parameterCount": 123},
        "dataset": {"source": "builtin://kubectl-commands"},
    })
    assert parameter_count(spec) == 123
    with pytest.raises(PlanError, match="parameterCount"):
        plan(make_spec("pvc://models/my-model"))


def test_builtin_shape_and_adapter_size() -> None:
    shape = model_shape(make_spec())
    assert (shape.hidden, shape.layers, shape.vocab) == (576, 30, 49152)
    # What peft 0.21 reports as trainable for SmolLM2-135M (get_peft_model on its config, r=16):
    # 4,884,480 for all-linear and 921,600 for q_proj + v_proj. Counted by peft, not by the
    # planner's own formula, so a wrong formula cannot agree with itself here.
    assert shape.adapter_parameters(16, ["all-linear"], dora=False) == 4_884_480
    assert shape.adapter_parameters(16, ["q_proj", "v_proj"], dora=False) == 921_600


def test_7b_lora_on_one_80gb_gpu_matches_llama_factory() -> None:
    # LLaMA-Factory: LLaMA2-7B, LoRA r=8, batch 4, length 1024 (gradient checkpointing on by
    # default there): 18 GB. Base bf16 alone is 12.6 GiB; the rest is activations + logits.
    spec = make_spec(
        "hf://meta-llama/Llama-2-7b-hf",
        lora={"rank": 8},
        training={"batchSize": 4, "maxSeqLength": 1024, "gradientCheckpointing": True},
    )
    result = plan(spec)
    assert result.zero_stage == 0
    assert result.offload == "None"
    assert (result.world_size, result.micro_batch_size) == (1, 4)
    assert result.gradient_accumulation_steps == 1
    assert 15.0 <= float(result.estimated_gpu_memory_gib) <= 19.0
    # r=8 on all 7 linear modules of 32 layers: ~20M trainable parameters.
    assert result.trainable_parameters is not None
    assert 19e6 <= result.trainable_parameters <= 21e6


def test_7b_lora_default_batch_fits_without_zero_and_uses_the_gpu() -> None:
    result = plan(make_spec("hf://meta-llama/Llama-2-7b-hf"))
    assert result.zero_stage == 0
    # Activations at 2048 tokens without checkpointing are ~25 GiB per sequence (LoRA with
    # dropout), so one sequence fits and four do not.
    assert result.micro_batch_size == 2
    assert result.gradient_accumulation_steps == 8
    assert 40.0 <= float(result.estimated_gpu_memory_gib) <= 72.0


def test_70b_full_on_16_gpus_needs_zero3() -> None:
    spec = make_spec(
        LLAMA2_70B,
        method="Full",
        resources={"nodes": 2, "gpusPerNode": 8, "gpuMemoryGiB": 80},
        training={"gradientCheckpointing": True},
    )
    result = plan(spec)
    assert (result.world_size, result.zero_stage, result.offload) == (16, 3, "None")
    assert result.micro_batch_size == 1
    # 16 B x 70e9 / 16 GPUs = 65.2 GiB of model states, plus activations.
    assert 65.2 < float(result.estimated_gpu_memory_gib) <= 72.0
    for stage in (0, 1, 2):
        lower = spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(
            update={"zero_stage": stage})})
        with pytest.raises(PlanError):
            plan(lower)


def test_70b_full_without_checkpointing_is_refused_with_fixes() -> None:
    spec = make_spec(LLAMA2_70B, method="Full", resources={"nodes": 2, "gpusPerNode": 8})
    with pytest.raises(PlanError) as error:
        plan(spec)
    message = str(error.value)
    assert "does not fit" in message
    assert "gradientCheckpointing: true" in message
    assert "Would fit" in message


def test_70b_qlora_on_two_40gb_gpus_matches_peft() -> None:
    # PEFT's DeepSpeed guide: Llama-2-70B QLoRA r=8 all-linear, ZeRO-3 on 2 x 40 GB,
    # batch 2 x 2048 per GPU, accumulation 2, gradient checkpointing: 36.6 GB (34.1 GiB).
    spec = make_spec(
        LLAMA2_70B,
        method="QLoRA",
        lora={"rank": 8, "dropout": "0.1"},
        resources={"gpusPerNode": 2, "gpuMemoryGiB": 40},
        training={"batchSize": 8, "maxSeqLength": 2048, "gradientCheckpointing": True},
    )
    result = plan(spec)
    assert (result.zero_stage, result.offload) == (3, "None")
    assert (result.micro_batch_size, result.gradient_accumulation_steps) == (2, 2)
    assert 28.0 <= float(result.estimated_gpu_memory_gib) <= 36.0


def test_70b_lora_on_eight_80gb_gpus_matches_peft() -> None:
    # PEFT's DeepSpeed guide: Llama-2-70B LoRA r=8, ZeRO-3 on 8 x 80 GB, batch 8 x 2048 per
    # GPU, gradient checkpointing: 64 GB (59.6 GiB).
    spec = make_spec(
        LLAMA2_70B,
        lora={"rank": 8, "dropout": "0.1"},
        resources={"gpusPerNode": 8},
        training={"batchSize": 64, "gradientCheckpointing": True},
    )
    result = plan(spec)
    assert (result.zero_stage, result.micro_batch_size) == (3, 8)
    assert 50.0 <= float(result.estimated_gpu_memory_gib) <= 66.0


def test_70b_lora_on_one_gpu_is_refused_saying_what_fits() -> None:
    spec = make_spec("hf://meta-llama/Llama-3.3-70B-Instruct")
    with pytest.raises(PlanError) as error:
        plan(spec)
    message = str(error.value)
    assert message.startswith("70.6B LoRA on 1 node(s) x 1 GPU(s) of 80 GiB does not fit")
    assert "method: QLoRA" in message
    assert "x 4 GPUs" in message  # bf16 base of 140 GB sharded over 4 x 80 GB
    assert "deepspeed.offload: CPU" in message


def test_explicit_zero_stage_that_does_not_fit_names_what_would() -> None:
    spec = make_spec(
        LLAMA2_70B,
        method="Full",
        resources={"nodes": 2, "gpusPerNode": 8},
        training={"gradientCheckpointing": True},
        deepspeed={"zeroStage": 0},
    )
    with pytest.raises(PlanError) as error:
        plan(spec)
    message = str(error.value)
    assert "with ZeRO stage 0" in message
    assert "deepspeed.zeroStage: Auto (ZeRO-3" in message


def test_offload_only_when_nothing_else_fits() -> None:
    fits = make_spec("hf://meta-llama/Llama-2-7b-hf", deepspeed={"offload": "CPU"},
                     training={"gradientCheckpointing": True})
    assert plan(fits).offload == "None"
    tight = make_spec(LLAMA2_70B, method="Full", deepspeed={"offload": "CPU"},
                      resources={"gpusPerNode": 8},
                      training={"gradientCheckpointing": True})
    result = plan(tight)
    assert (result.zero_stage, result.offload) == (3, "CPU")
    assert float(result.estimated_gpu_memory_gib) <= 72.0


@pytest.mark.parametrize(
    ("batch", "nodes", "gpus", "micro", "accumulation", "global_batch"),
    [
        (16, 1, 1, 16, 1, 16),
        (16, 1, 4, 4, 1, 16),
        (24, 1, 4, 4, 2, 32),  # 24 / 4 = 6 -> micro 4, accumulation rounds up to 2
        (2, 2, 8, 1, 1, 16),  # fewer sequences than GPUs: one each
        (100, 1, 2, 32, 2, 128),
    ],
)
def test_batch_split(batch: int, nodes: int, gpus: int, micro: int, accumulation: int,
                     global_batch: int) -> None:
    spec = make_spec(
        training={"batchSize": batch, "maxSeqLength": 128},
        resources={"nodes": nodes, "gpusPerNode": gpus, "gpuMemoryGiB": 80},
    )
    result = plan(spec)
    assert result.world_size == nodes * gpus
    assert result.micro_batch_size == micro
    assert result.gradient_accumulation_steps == accumulation
    assert result.global_batch_size == global_batch
    assert global_batch == micro * accumulation * nodes * gpus


def test_micro_batch_shrinks_to_fit_memory() -> None:
    roomy = plan(make_spec(resources={"gpuMemoryGiB": 80}))
    small = plan(make_spec(resources={"gpuMemoryGiB": 8}))
    assert roomy.micro_batch_size == 16
    assert small.micro_batch_size < roomy.micro_batch_size
    assert float(small.estimated_gpu_memory_gib) <= 0.9 * 8
    assert small.global_batch_size == 16


def test_cpu_plan() -> None:
    single = plan(make_spec(resources={"gpusPerNode": 0}))
    assert (single.world_size, single.zero_stage, single.offload) == (1, 0, "None")
    assert single.estimated_gpu_memory_gib == "0"
    assert single.global_batch_size == 16
    assert "CPU" in single.reason

    full = plan(make_spec(method="Full", resources={"nodes": 2, "gpusPerNode": 0}))
    assert (full.world_size, full.zero_stage) == (2, 2)
    adapters = plan(make_spec(resources={"nodes": 2, "gpusPerNode": 0}))
    assert adapters.zero_stage == 0
    assert adapters.micro_batch_size * adapters.gradient_accumulation_steps * 2 == 16


def test_estimate_terms() -> None:
    """Each term of the memory model, checked on its own."""
    shape = model_shape(make_spec("hf://meta-llama/Llama-2-7b-hf"))
    params = shape.parameters  # 6.74e9, Llama-2-7b's published count
    common: dict[str, Any] = {"micro_batch": 1, "seq_length": 16, "gradient_checkpointing": True}
    full = estimate_memory_gib(shape, method=Method.FULL, trainable=shape.parameters,
                               zero_stage=0, offload=False, world_size=1, **common)
    # Mixed-precision Adam: 16 B per parameter.
    assert full == pytest.approx(16 * params / 2**30, rel=0.01, abs=1.5)
    zero1 = estimate_memory_gib(shape, method=Method.FULL, trainable=shape.parameters,
                                zero_stage=1, offload=False, world_size=8, **common)
    assert zero1 == pytest.approx((4 + 12 / 8) * params / 2**30, rel=0.01, abs=1.5)
    zero2 = estimate_memory_gib(shape, method=Method.FULL, trainable=shape.parameters,
                                zero_stage=2, offload=False, world_size=8, **common)
    assert zero2 == pytest.approx((2 + 14 / 8) * params / 2**30, rel=0.01, abs=1.5)
    zero3 = estimate_memory_gib(shape, method=Method.FULL, trainable=shape.parameters,
                                zero_stage=3, offload=False, world_size=8, **common)
    assert zero3 == pytest.approx(16 / 8 * params / 2**30, rel=0.01, abs=2.5)
    qlora = estimate_memory_gib(shape, method=Method.QLORA, trainable=0,
                                zero_stage=0, offload=False, world_size=1, **common)
    assert qlora == pytest.approx(0.56 * params / 2**30, rel=0.01, abs=1.5)
    without = estimate_memory_gib(shape, method=Method.LORA, trainable=0, zero_stage=0,
                                  offload=False, world_size=1, micro_batch=1, seq_length=2048,
                                  gradient_checkpointing=False)
    with_ckpt = estimate_memory_gib(shape, method=Method.LORA, trainable=0, zero_stage=0,
                                    offload=False, world_size=1, micro_batch=1,
                                    seq_length=2048, gradient_checkpointing=True)
    assert without - with_ckpt > 20  # checkpointing saves most of ~25 GiB of activations
