"""The planner's adapter size (which sizes memory and the plan) is what peft really trains.

peft builds the adapters on the built-in model's architecture (on the meta device: no weights
are read) and counts their trainable parameters; the planner must agree for every target set
and for DoRA.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from kubetune.api.spec import FineTuneJobSpec
from kubetune.planner.shapes import model_shape
from kubetune_trainer.sources import resolve_model

BUILTIN = "builtin://smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("targets", "dora"),
    [
        (["all-linear"], False),
        (["q_proj", "v_proj"], False),
        (["q_proj", "k_proj", "v_proj", "o_proj"], False),
        (["gate_proj", "up_proj", "down_proj"], False),
        (["all-linear"], True),
    ],
)
def test_planner_adapter_size_is_what_peft_trains(targets: list[str], dora: bool) -> None:
    config = AutoConfig.from_pretrained(resolve_model(BUILTIN).name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    target_modules: str | list[str] = "all-linear" if targets == ["all-linear"] else targets
    adapted = get_peft_model(model, LoraConfig(r=8, target_modules=target_modules, use_dora=dora))
    trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)

    shape = model_shape(FineTuneJobSpec.model_validate(
        {"model": {"source": BUILTIN}, "dataset": {"source": "builtin://kubectl-commands"}}
    ))  # fmt: skip
    assert shape.adapter_parameters(8, targets, dora=dora) == trained
