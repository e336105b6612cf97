"""What the planner knows of a model: its size and shape, from its config.json, the spec or a
table of published configs (pure, no I/O: whoever can read config.json hands it in).

Separate from the memory model because it answers a different question (which model is this?)
and grows with every model family added, while the memory formula stays put. `PlanError` lives
here, the lowest planner module, because an unknown model size is the first way a plan fails.
The families' layer layouts (which linear modules a layer has) are data in
`kubetune.api.modelconfig`, which the trainer reads too.

Where a model's shape comes from, first that applies: its config.json (`kubetune run` reads it
for `file://`, `pvc://` and `builtin://` sources), the published config of a model recognised
by name (`KNOWN_SHAPES`; the operator cannot read a PVC or the Hub), else a Llama-like shape of
the size in the source's name. `spec.model.parameterCount` replaces the parameter count of
whichever shape that is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from kubetune.api.modelconfig import Architecture, ModelConfigError, read_architecture
from kubetune.api.spec import FineTuneJobSpec


class PlanError(ValueError):
    """No plan fits the hardware, or the model's size cannot be known. The message says
    what would fit."""


@dataclass(frozen=True)
class LinearModule:
    """A linear module the model has `count` of (one per layer of its tower)."""

    name: str
    fan_in: int
    fan_out: int
    count: int
    decoder: bool = True
    """One per decoder layer (a vision tower's are not)."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a decoder-only transformer."""

    parameters: int
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    vocab: int
    linears: tuple[LinearModule, ...]
    """Every linear module but the output head, the decoder's first: what `all-linear` adapts."""

    def module_dims(self, name: str) -> tuple[int, int]:
        """(in, out) features of a linear module of one decoder layer; a name the model lacks
        counts as a hidden x hidden projection (a safe side for the estimate)."""
        short = name.rsplit(".", 1)[-1]
        return next(((m.fan_in, m.fan_out) for m in self.linears if m.decoder and m.name == short),
                    (self.hidden, self.hidden))

    @property
    def linear_parameters_per_layer(self) -> int:
        return sum(m.fan_in * m.fan_out for m in self.linears if m.decoder)

    @property
    def layer_parameters(self) -> int:
        return max(self.linear_parameters_per_layer, self.parameters // max(self.layers, 1))

    def adapter_parameters(self, rank: int, targets: list[str], dora: bool) -> int:
        """LoRA (or DoRA) parameters peft adds for `targets`: every module whose name ends in
        a target, in every tower (peft matches by name suffix); `all-linear` is every linear
        module except the output head."""
        if "all-linear" in targets:
            chosen = list(self.linears)
        else:
            names = {target.rsplit(".", 1)[-1] for target in targets}
            chosen = [m for m in self.linears if m.name in names]
            missing = names - {m.name for m in chosen}
            chosen += [LinearModule(n, self.hidden, self.hidden, self.layers) for n in missing]
        return sum(m.count * (rank * (m.fan_in + m.fan_out) + (m.fan_out if dora else 0))
                   for m in chosen)


def shape_from_architecture(model: Architecture) -> ModelShape:
    return ModelShape(
        parameters=model.parameters,
        hidden=model.hidden,
        layers=model.layers,
        intermediate=model.intermediate,
        kv_dim=model.kv_heads * model.head_dim,
        vocab=model.vocab,
        linears=tuple(LinearModule(m.name, m.fan_in, m.fan_out, m.count, m.tower == "text")
                      for m in model.linears),
    )


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """The shape a transformers config.json (parsed) describes. Raises ModelConfigError."""
    return shape_from_architecture(read_architecture(config))


def _config(model_type: str, hidden: int, layers: int, ff: int, heads: int, kv_heads: int,
            vocab: int, **extra: Any) -> dict[str, Any]:
    """The keys of a published config.json that decide the model's size."""
    return {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": ff, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, **extra}


TIED = {"tie_word_embeddings": True}
UNTIED = {"tie_word_embeddings": False}
GEMMA3_4B = {
    "model_type": "gemma3",
    "text_config": _config("gemma3_text", 2560, 34, 10240, 8, 4, 262208, head_dim=256),
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                      "intermediate_size": 4304, "num_hidden_layers": 27,
                      "num_attention_heads": 16, "patch_size": 14, "image_size": 896,
                      "vision_use_head": False},
}

# (name pattern, the published config.json's size keys), first match wins: the operator plans
# these by name. Counts computed from them are the published ones (tests/unit/planner).
KNOWN_CONFIGS: tuple[tuple[str, dict[str, Any]], ...] = (
    (r"smollm2-135m", _config("llama", 576, 30, 1536, 9, 3, 49152, **TIED)),
    (r"smollm2-360m", _config("llama", 960, 32, 2560, 15, 5, 49152, **TIED)),
    (r"smollm2-1\.7b", _config("llama", 2048, 24, 8192, 32, 32, 49152, **TIED)),
    (r"tinyllama.*1\.1b", _config("llama", 2048, 22, 5632, 32, 4, 32000, **UNTIED)),
    (r"llama-2-7b", _config("llama", 4096, 32, 11008, 32, 32, 32000, **UNTIED)),
    (r"llama-2-13b", _config("llama", 5120, 40, 13824, 40, 40, 32000, **UNTIED)),
    (r"llama-2-70b", _config("llama", 8192, 80, 28672, 64, 8, 32000, **UNTIED)),
    (r"llama-3\.2-1b", _config("llama", 2048, 16, 8192, 32, 8, 128256, head_dim=64, **TIED)),
    (r"llama-3\.2-3b", _config("llama", 3072, 28, 8192, 24, 8, 128256, head_dim=128, **TIED)),
    (r"llama-3(\.\d)?-8b", _config("llama", 4096, 32, 14336, 32, 8, 128256, **UNTIED)),
    (r"llama-3(\.\d)?-70b", _config("llama", 8192, 80, 28672, 64, 8, 128256, **UNTIED)),
    (r"mistral-7b.*v0\.[12]", _config("mistral", 4096, 32, 14336, 32, 8, 32000, **UNTIED)),
    (r"mistral-7b", _config("mistral", 4096, 32, 14336, 32, 8, 32768, **UNTIED)),  # v0.3
    (r"phi-3(\.5)?-mini", _config("phi3", 3072, 32, 8192, 32, 32, 32064, **UNTIED)),
    (r"phi-4-mini", _config("phi3", 3072, 32, 8192, 24, 8, 200064, **TIED)),
    (r"qwen2\.5-0\.5b", _config("qwen2", 896, 24, 4864, 14, 2, 151936, **TIED)),
    (r"qwen2\.5-1\.5b", _config("qwen2", 1536, 28, 8960, 12, 2, 151936, **TIED)),
    (r"qwen2\.5-3b", _config("qwen2", 2048, 36, 11008, 16, 2, 151936, **TIED)),
    (r"qwen2\.5-7b", _config("qwen2", 3584, 28, 18944, 28, 4, 152064, **UNTIED)),
    (r"qwen3-0\.6b", _config("qwen3", 1024, 28, 3072, 16, 8, 151936, head_dim=128, **TIED)),
    (r"qwen3-1\.7b", _config("qwen3", 2048, 28, 6144, 16, 8, 151936, head_dim=128, **TIED)),
    (r"qwen3-4b", _config("qwen3", 2560, 36, 9728, 32, 8, 151936, head_dim=128, **TIED)),
    (r"qwen3-8b", _config("qwen3", 4096, 36, 12288, 32, 8, 151936, head_dim=128, **UNTIED)),
    (r"gemma-2-2b", _config("gemma2", 2304, 26, 9216, 8, 4, 256000, head_dim=256)),
    (r"gemma-2-9b", _config("gemma2", 3584, 42, 14336, 16, 8, 256000, head_dim=256)),
    (r"gemma-3-1b", _config("gemma3_text", 1152, 26, 6912, 4, 1, 262144, head_dim=256)),
    (r"gemma-3-4b", GEMMA3_4B),
)
KNOWN_SHAPES: tuple[tuple[str, ModelShape], ...] = tuple(
    (pattern, shape_from_config(config)) for pattern, config in KNOWN_CONFIGS
)
_SIZE_IN_NAME = re.compile(r"(?:^|[-_/ ])(\d+(?:\.\d+)?)([bm])(?![a-z0-9])", re.IGNORECASE)


def parameter_count(spec: FineTuneJobSpec, config: Mapping[str, Any] | None = None) -> int:
    """Base-model parameters: `model.parameterCount`, else counted from the model's
    config.json, a published model's config recognised by name, or the size in the source's
    name (`Llama-2-7b-hf` -> 7e9, `SmolLM2-135M` -> 135e6)."""
    return model_shape(spec, config).parameters


def known_shape(source: str) -> ModelShape | None:
    """The published shape whose pattern matches the source, with its own parameter count."""
    lowered = source.lower()
    return next((shape for pattern, shape in KNOWN_SHAPES if re.search(pattern, lowered)), None)


def _size_in_name(source: str) -> int | None:
    name = source.split("://", 1)[-1].rstrip("/")
    match = _SIZE_IN_NAME.search(name.rsplit("/", 1)[-1]) or _SIZE_IN_NAME.search(name)
    if match is None:
        return None
    scale = 1e9 if match.group(2).lower() == "b" else 1e6
    return int(float(match.group(1)) * scale)


def _estimated_shape(params: int) -> ModelShape:
    """A Llama-like shape of that size: ~12 h^2 per layer, about 128 hidden units per layer; a
    large vocabulary keeps the logits estimate on the safe side."""
    hidden = max(64, round((params * 128 / 12) ** (1 / 3) / 64) * 64)
    layers = max(1, round(hidden / 128))
    guess = _config("llama", hidden, layers, hidden * 8 // 3, hidden // 64, hidden // 64, 128256)
    return replace(shape_from_config(guess), parameters=params)


def model_shape(spec: FineTuneJobSpec, config: Mapping[str, Any] | None = None) -> ModelShape:
    """The shape of the spec's model: from `config` (its parsed config.json) when given, else
    the published shape its name matches, else a Llama-like shape of the size in its name;
    `model.parameterCount` replaces the count. Raises PlanError when the size is unknown."""
    count = spec.model.parameter_count
    shape = None
    if config is not None:
        try:
            shape = shape_from_config(config)
        except ModelConfigError as error:
            if count is None:
                raise PlanError(
                    f"cannot tell the size of model {spec.model.source!r} from its config.json "
                    f"({error}); set spec.model.parameterCount (for example 7000000000 for a "
                    "7B model)"
                ) from error
    shape = shape or known_shape(spec.model.source)
    if shape is None:
        size = count if count is not None else _size_in_name(spec.model.source)
        if size is None:
            raise PlanError(
                f"cannot tell the size of model {spec.model.source!r} from its name; set "
                "spec.model.parameterCount (for example 7000000000 for a 7B model)"
            )
        return _estimated_shape(size)
    return shape if count is None else replace(shape, parameters=count)
