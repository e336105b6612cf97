"""LoRA adapters served beside their base model (`serve --lora-modules NAME=DIR ...`): reading a
PEFT adapter directory into the low-rank weights the batching engine adds to the base's graph
(`engines.batch.lora`), and refusing, by name, any adapter that cannot be served that way.

A LoRA adapter changes a linear layer W into W + s * B @ A. Served unmerged, each request's
rows add s * (x @ A^T) @ B^T to the base's output, so one copy of the base serves every
adapter, and requests for different adapters share a batch. What is not a pure low-rank delta
on the decoder's linear layers is refused here rather than served wrongly: DoRA (it rescales
the merged weight's columns), trained biases, extra trained modules (`modules_to_save`), and
adapters on the embeddings or the output head.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""Linear layers that hold several projections, their outputs side by side in this order (Phi-3's
`qkv_proj` and `gate_up_proj`; the GenAI builder's own packed MatMuls use the same names)."""

PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
    "down_proj",
)  # fmt: skip
"""The decoder's linear layers an adapter may change (the names PEFT and transformers use)."""

READ_HIDDEN = frozenset(PROJECTIONS) - {"o_proj", "down_proj"}
"""The layers whose input is the hidden state (`hidden_size` wide). `o_proj` reads the attention
heads (heads x head size: not the hidden size in Qwen3 or Gemma) and `down_proj` the MLP's
intermediate features; their widths are checked against the exported graph (`engines.batch.
lora`)."""


def parts(projection: str) -> tuple[str, ...]:
    """The projections a linear layer computes, in its output's order."""
    return PACKED.get(projection, (projection,))

_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(" + "|".join(PROJECTIONS) + r")\.lora_([AB])(?:\.default)?\.weight$"
)


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the adapter and the reason."""


@dataclass(frozen=True)
class LowRank:
    """One layer's update: the output gains `scale * (x @ a.T) @ b.T`."""

    a: np.ndarray  # (rank, in features)
    b: np.ndarray  # (out features, rank)
    scale: float


@dataclass(frozen=True)
class LoraAdapter:
    name: str  # the model name requests select it by
    path: Path
    rank: int  # the widest of its layers' ranks
    layers: dict[tuple[int, str], LowRank]  # (layer index, projection) -> its update


def parse_lora_modules(values: list[str]) -> dict[str, Path]:
    """`NAME=DIR` pairs (vLLM's `--lora-modules` spelling) as {name: directory}."""
    modules: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise AdapterError(f"--lora-modules: expected NAME=DIR, got {value!r}")
        if name in modules:
            raise AdapterError(f"--lora-modules: the name {name!r} is given twice")
        modules[name] = Path(path)
    return modules


def _refuse(name: str, reason: str) -> AdapterError:
    return AdapterError(f"adapter {name!r}: {reason}")


def _check_config(name: str, config: dict[str, object]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(name, f"peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise _refuse(
            name,
            "DoRA rescales the merged weight, so it cannot be served on a shared base; "
            "serve its merged export instead",
        )
    if config.get("modules_to_save"):
        raise _refuse(name, f"modules_to_save {config['modules_to_save']} are not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise _refuse(name, "trained biases (bias / lora_bias) are not supported")
    if config.get("fan_in_fan_out"):
        raise _refuse(name, "fan_in_fan_out adapters are not supported")


def _scale(config: dict[str, object], key: str, rank: int) -> float:
    """PEFT's scaling for one layer: alpha / rank (alpha / sqrt(rank) with rsLoRA), where a
    layer may have its own alpha (`alpha_pattern`)."""
    alphas = config.get("alpha_pattern") or {}
    assert isinstance(alphas, dict)
    alpha = next(
        (float(v) for pattern, v in alphas.items() if re.search(pattern, key)),
        float(config.get("lora_alpha", 8)),  # type: ignore[arg-type]
    )
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _vocabulary(tokenizer_file: Path) -> tuple[object, object]:
    data = json.loads(tokenizer_file.read_text())
    added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    return data.get("model", {}).get("vocab"), added


def check_tokenizer(name: str, path: Path, model_dir: Path) -> None:
    """Every request is rendered and tokenized by the base's tokenizer and chat template, so an
    adapter that ships others (trained with another template or added tokens) is refused
    rather than served prompts it never saw."""
    template = path / "chat_template.jinja"
    base_template = model_dir / "chat_template.jinja"
    if (
        template.is_file()
        and base_template.is_file()
        and template.read_text().strip() != base_template.read_text().strip()
    ):
        raise _refuse(
            name,
            f"its chat template ({template}) differs from the base model's ({base_template}); "
            "serve its merged export instead",
        )
    tokenizer = path / "tokenizer.json"
    base_tokenizer = model_dir / "tokenizer.json"
    if (
        tokenizer.is_file()
        and base_tokenizer.is_file()
        and _vocabulary(tokenizer) != _vocabulary(base_tokenizer)
    ):
        raise _refuse(
            name,
            f"its tokenizer's vocabulary ({tokenizer}) differs from the base model's; "
            "serve its merged export instead",
        )


def read_adapter(name: str, path: Path, hidden_size: int | None = None) -> LoraAdapter:
    """A PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`)."""
    config_file = path / "adapter_config.json"
    weights_file = path / "adapter_model.safetensors"
    for required in (config_file, weights_file):
        if not required.is_file():
            raise _refuse(name, f"{required} does not exist")
    config = json.loads(config_file.read_text())
    _check_config(name, config)
    from safetensors.numpy import load_file

    tensors = load_file(str(weights_file))
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    modules: dict[tuple[int, str], str] = {}  # the module's own name, for `alpha_pattern`
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise _refuse(
                name,
                f"weight {key!r} is not a LoRA update of the decoder's linear layers "
                f"({', '.join(PROJECTIONS)})",
            )
        layer, projection, part = int(match[1]), match[2], match[3]
        pairs.setdefault((layer, projection), {})[part] = tensor.astype(np.float32)
        modules[(layer, projection)] = key.split(".lora_")[0]
    layers: dict[tuple[int, str], LowRank] = {}
    for (layer, projection), found in sorted(pairs.items()):
        where = f"layers.{layer}.{projection}"
        if set(found) != {"A", "B"}:
            raise _refuse(name, f"{where} has lora_{''.join(found)} but not both A and B")
        a, b = found["A"], found["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise _refuse(name, f"{where}: lora_A {a.shape} and lora_B {b.shape} do not pair")
        if hidden_size is not None and projection in READ_HIDDEN and a.shape[1] != hidden_size:
            raise _refuse(
                name,
                f"{where}: lora_A takes {a.shape[1]} features but the base model's hidden "
                f"size is {hidden_size} (an adapter of another base model?)",
            )
        layers[(layer, projection)] = LowRank(
            a, b, _scale(config, modules[(layer, projection)], a.shape[0])
        )
    if not layers:
        raise _refuse(name, f"{weights_file} holds no LoRA weights")
    covered: dict[tuple[int, str], str] = {}  # (layer, projection) -> the module changing it
    for layer, module in layers:
        for projection in parts(module):
            other = covered.setdefault((layer, projection), module)
            if other != module:
                raise _refuse(
                    name, f"layers.{layer}: {other} and {module} both change its {projection}"
                )
    rank = max(u.a.shape[0] for u in layers.values())
    return LoraAdapter(name, path, rank, layers)
