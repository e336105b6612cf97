"""The trainer's check at start: the plan against the model's config.json (pure)."""

from __future__ import annotations

from kubetune.api import PlanStatus
from kubetune.api.modelconfig import plan_mismatch, read_architecture

PHI3 = {"model_type": "phi3", "hidden_size": 3072, "num_hidden_layers": 32,
        "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32064, "tie_word_embeddings": False}  # Phi-3-mini: 3.82B


def planned(parameters: int | None, hidden: int | None = None,
            layers: int | None = None) -> PlanStatus:
    return PlanStatus(world_size=1, zero_stage=0, micro_batch_size=1,
                      gradient_accumulation_steps=1, global_batch_size=1,
                      estimated_gpu_memory_gib="0", parameters=parameters, hidden_size=hidden,
                      layers=layers)


def test_a_plan_for_this_model_passes() -> None:
    model = read_architecture(PHI3)
    assert plan_mismatch(planned(3_821_079_552, 3072, 32), model) is None
    # Within 10%: parameterCount a user rounded.
    assert plan_mismatch(planned(4_000_000_000, 3072, 32), model) is None
    # A plan from before the shape was recorded says nothing of hidden size and layers.
    assert plan_mismatch(planned(3_800_000_000), model) is None


def test_each_difference_is_named() -> None:
    model = read_architecture(PHI3)
    # The operator read "7b" in a renamed model's source and guessed a Llama-like shape.
    message = plan_mismatch(planned(7_000_000_000, 4096, 32), model)
    assert message is not None
    assert "parameters 7.00B planned, 3.82B in config.json (+83%)" in message
    assert "hiddenSize 4096 planned, 3072 in config.json" in message
    assert "layers" not in message
    assert "spec.model.parameterCount" in message
    fewer = plan_mismatch(planned(3_821_079_552, 3072, 28), model)
    assert fewer is not None
    assert "layers 28 planned, 32 in config.json" in fewer
    assert "parameters 3.82B planned" not in fewer
