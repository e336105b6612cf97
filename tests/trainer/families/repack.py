"""The built-in model's weights, number for number, in other families' layouts.

A tiny random model proves a family's structure flows through every step; it cannot say
whether a fine-tune of that family is as good as one of the built-in model. The built-in
SmolLM2-135M repacked into Phi-3's layout (packed `qkv_proj` and `gate_up_proj`), Qwen2's
(q/k/v with biases, here zero) and Mistral's (a sliding window wider than any sequence) computes
the same function as the original, so its answers must be the built-in model's token for token,
and the quickstart on it must reach the built-in model's accuracy. `python -m
tests.trainer.families.repack OUT` writes all three (bench/families.py uses them).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

LAYOUTS = ("phi3", "qwen2", "mistral")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


def _shared(config: Any) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "hidden_act": config.hidden_act,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "rope_parameters": dict(config.rope_parameters),
    }


def _phi3(config: Any) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**_shared(config))


def _qwen2(config: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(head_dim=config.head_dim, **_shared(config))


def _mistral(config: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(head_dim=config.head_dim, sliding_window=4096, **_shared(config))


CONFIGS: dict[str, Callable[[Any], Any]] = {"phi3": _phi3, "qwen2": _qwen2, "mistral": _mistral}


def repacked_state(state: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """The Llama state dict in the target model's names: tensors the target has under the
    same name are copied; packed ones are the concatenation of what they pack, in the order
    the target splits them (q, k, v; gate, up); biases the source lacks are zero."""
    import torch

    out = {}
    for name, tensor in target.items():
        if name in state:
            out[name] = state[name]
        elif name.endswith("qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            out[name] = torch.cat([state[f"{stem}{p}_proj.weight"] for p in "qkv"])
        elif name.endswith("gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            out[name] = torch.cat([state[f"{stem}gate_proj.weight"],
                                   state[f"{stem}up_proj.weight"]])
        elif name.endswith(".bias"):
            out[name] = torch.zeros_like(tensor)
        else:
            raise KeyError(f"{name}: no counterpart in the source model")
    return out


def repack(source: Path, layout: str, target: Path) -> Path:
    """The model at `source` (Llama layout) in `layout`'s, saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    config = CONFIGS[layout](AutoConfig.from_pretrained(str(source)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(repacked_state(original.state_dict(), model.state_dict()),
                          strict=False)  # a tied head is not its own tensor
    model.tie_weights()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    return target


if __name__ == "__main__":
    from kubetune_trainer.builtin import builtin_model_dir

    for layout in LAYOUTS:
        print(repack(builtin_model_dir("smollm2-135m-instruct"), layout,
                     Path(sys.argv[1]) / layout))
