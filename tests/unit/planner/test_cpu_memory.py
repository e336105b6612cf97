"""The CPU memory model (`estimate_host_memory_gib`) against what the trainer measured.

The measured peaks are `bench/train_memory.py` and `bench/train_throughput.py` runs on the
built-in model (2-core AMD EPYC, torch 2.15, tcmalloc, the chunked loss): one LoRA step with
packed rows of 760-803 tokens peaked at 2.75 GiB with dropout 0.05 and 2.63 GiB without; with
rows of up to 512 tokens at 2.25 GiB. The estimate counts full rows (micro-batch x
maxSeqLength), so it may sit above a measurement on shorter rows; it must stay within 25% of
it (issue 15).
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.spec import FineTuneJobSpec, Method
from kubetune.planner.memory import estimate_host_memory_gib
from kubetune.planner.plan import CPU_ROW_TOKENS, model_shape, plan
from kubetune.planner.search import estimate_host_gib

MEASURED_GIB = {  # (dropout, micro-batch at maxSeqLength 512): measured peak RSS in GiB
    ("0.05", 2): 2.75,
    ("0", 2): 2.63,
    ("0.05", 1): 2.25,
}


def cpu_spec(dropout: str = "0.05", max_len: int = 512, **training: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "builtin://kubectl-commands"},
        "method": "LoRA", "lora": {"rank": 16, "alpha": 32, "dropout": dropout},
        "training": {"batchSize": 8, "maxSeqLength": max_len, **training},
        "resources": {"gpusPerNode": 0},
    })


@pytest.mark.parametrize(("dropout", "micro"), list(MEASURED_GIB))
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(dropout: str,
                                                               micro: int) -> None:
    spec = cpu_spec(dropout, max_len=512)
    estimate = estimate_host_gib(spec, model_shape(spec), 0, micro)
    measured = MEASURED_GIB[(dropout, micro)]
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


def test_status_plan_shows_the_estimate_of_the_planned_micro_batch() -> None:
    spec = cpu_spec()
    result = plan(spec)
    assert result.micro_batch_size == 1
    expected = estimate_host_gib(spec, model_shape(spec), 0, 1)
    assert result.estimated_host_memory_gib == f"{expected:.1f}"


def test_cpu_rows_hold_about_five_hundred_tokens() -> None:
    assert CPU_ROW_TOKENS == 512
    assert plan(cpu_spec(max_len=128)).micro_batch_size == 4
    assert plan(cpu_spec(max_len=256)).micro_batch_size == 2
    assert plan(cpu_spec(max_len=512)).micro_batch_size == 1
    long_rows = plan(cpu_spec(max_len=4096))
    assert long_rows.micro_batch_size == 1
    assert long_rows.estimated_gpu_memory_gib == "0"
    assert "rows of up to 4096 tokens" in long_rows.reason


def test_each_term_moves_the_estimate_the_way_it_should() -> None:
    shape = model_shape(cpu_spec())
    common: dict[str, Any] = {"zero_stage": 0, "world_size": 1, "lora_dropout": 0.05}

    def gib(method: Method = Method.LORA, trainable: int = 4_884_480, tokens: int = 1024,
            checkpointing: bool = False, **extra: Any) -> float:
        return estimate_host_memory_gib(shape, method=method, trainable=trainable,
                                        tokens=tokens, gradient_checkpointing=checkpointing,
                                        **{**common, **extra})

    # Twice the tokens, twice the activations and the head's chunk (the rest stays); past a
    # chunk of rows only the activations grow.
    fixed = gib(tokens=0)
    assert gib(tokens=512) - fixed == pytest.approx(2 * (gib(tokens=256) - fixed))
    head_chunk = 8 * 512 * shape.vocab / 2**30
    assert gib(tokens=2048) - fixed - head_chunk == pytest.approx(2 * (gib() - fixed - head_chunk))
    assert gib(checkpointing=True) - fixed < (gib() - fixed) / 2
    # Full fine-tuning: every weight gets a gradient and two AdamW moments (16 B/param in all,
    # against 4 B per frozen weight and 16 B per adapter weight for LoRA).
    full = gib(Method.FULL, trainable=shape.parameters, tokens=0)
    lora_states = 16 * 4_884_480
    assert full - fixed == pytest.approx((12 * shape.parameters - lora_states) / 2**30,
                                         rel=0.01)
    # ZeRO-2 over two processes halves the gradient and the moments.
    zero2 = gib(Method.FULL, trainable=shape.parameters, tokens=0, zero_stage=2, world_size=2)
    assert full - zero2 == pytest.approx(6 * shape.parameters / 2**30, rel=0.01)
    assert gib(Method.DORA) > gib()
    assert gib(Method.QLORA, tokens=0) < fixed
