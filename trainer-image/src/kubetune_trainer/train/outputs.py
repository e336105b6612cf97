"""The trained result: gathered from the ranks, saved as `adapter/` and `merged/` by rank 0.

`merged/` is always made from a base loaded in full precision plus the saved adapter
(`merge_and_unload`), also for QLoRA: merging into 4-bit weights would round them. It holds the
model, the tokenizer and its chat template, and loads with plain transformers (no PEFT, no
KubeTune attention: the config names SDPA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kubetune.api.spec import FineTuneJobSpec, Method
from kubetune_trainer.sources import ModelLocation
from kubetune_trainer.train import model as models
from kubetune_trainer.train.stepper import DeepSpeedStepper, Stepper


def gather_trainable(stepper: Stepper, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The trained weights as a full state dict on rank 0 (a collective under DeepSpeed)."""
    if not isinstance(stepper, DeepSpeedStepper):
        module = stepper.model
        return {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}
    ds = stepper.ds
    names = {n for n, p in ds.module.named_parameters() if p.requires_grad}
    if ds.zero_optimization_stage() == 3:
        state = ds._zero3_consolidated_16bit_state_dict()  # collective; dict on rank 0
    else:
        state = ds.module.state_dict()
    if not is_main or state is None:
        return None
    return {n: t.detach().float().cpu() for n, t in state.items() if n in names}


def rebuild(location: ModelLocation, spec: FineTuneJobSpec, trained: dict[str, torch.Tensor],
            device: torch.device) -> torch.nn.Module:
    """A fresh single-process model carrying the trained weights (after DeepSpeed runs)."""
    base = models.load_base(location, spec, quantized=spec.method is Method.QLORA, device=device)
    model = models.prepare(base, spec).to(device)
    missing = set(trained) - {n for n, _ in model.named_parameters()}
    if missing:
        raise RuntimeError(f"trained weights do not match the model: {sorted(missing)[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value.to(params[name].dtype))
    return model


def save_adapter(model: Any, tokenizer: Any, target: Path) -> None:
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def save_merged(location: ModelLocation, spec: FineTuneJobSpec, tokenizer: Any,
                trained: Any, adapter: Path | None, target: Path) -> None:
    """Save the full model with SDPA attention in its config, or eager attention where the
    architecture has no SDPA path (Gemma 2 soft-caps its attention scores).

    LoRA and DoRA merge in place into the trained model (no second copy in memory); QLoRA
    reloads the base in full precision and merges the saved `adapter` into it."""
    if spec.method is Method.FULL:
        merged = trained
    elif spec.method is Method.QLORA:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            location.name_or_path, dtype=torch.float32, **models.hub_kwargs(location, spec),
        )
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    else:
        merged = trained.merge_and_unload()
    merged.config.use_cache = True
    merged.config._attn_implementation = "sdpa" if merged._supports_sdpa else "eager"
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
