"""The planner's reading of config.json against what transformers and peft really build.

Every published config in the planner's name table (`KNOWN_CONFIGS`: Llama 2/3.x, Mistral,
Phi-3/3.5, Phi-4-mini, Qwen 2.5/3, Gemma 2/3, SmolLM2, TinyLlama) is instantiated on the meta
device (no weights) with the installed transformers; its parameter count, and the adapter
peft attaches for `all-linear` and for a list of names, must be what the planner computes from
the same config. A family whose layout table entry is wrong fails here by name.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from kubetune.planner.shapes import KNOWN_CONFIGS, shape_from_config


def meta_model(config: dict[str, Any]) -> Any:
    document = dict(config)
    built = AutoConfig.for_model(document.pop("model_type"), **document)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(built)


def peft_trains(model: Any, targets: str | list[str]) -> int:
    adapted = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    return sum(p.numel() for p in adapted.parameters() if p.requires_grad)


@pytest.mark.parametrize(("pattern", "config"), KNOWN_CONFIGS, ids=[p for p, _ in KNOWN_CONFIGS])
def test_counts_are_what_transformers_and_peft_build(pattern: str, config: dict[str, Any]) -> None:
    shape = shape_from_config(config)
    model = meta_model(config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    # The decoder's own projection names: attention out and MLP down exist in every family.
    names = ["o_proj", "down_proj"]
    assert shape.adapter_parameters(8, names, dora=False) == peft_trains(model, names)
    model = meta_model(config)
    assert shape.adapter_parameters(8, ["all-linear"], dora=False) == peft_trains(
        model, "all-linear")
