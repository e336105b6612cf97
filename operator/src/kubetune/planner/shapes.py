"""What the planner knows of a model: its size and shape, from the spec or a table of
published configs (pure, no I/O).

Separate from the memory model because it answers a different question (which model is this?)
and grows with every model family added, while the memory formula stays put. `PlanError` lives
here, the lowest planner module, because an unknown model size is the first way a plan fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kubetune.api.spec import FineTuneJobSpec

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """No plan fits the hardware, or the model's size cannot be known. The message says
    what would fit."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a decoder-only transformer."""

    parameters: int
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    vocab: int

    def module_dims(self, name: str) -> tuple[int, int]:
        """(in, out) features of a linear module of one layer."""
        h, ff = self.hidden, self.intermediate
        dims = {
            "q_proj": (h, h),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (h, h),
            "gate_proj": (h, ff),
            "up_proj": (h, ff),
            "down_proj": (ff, h),
        }
        return dims.get(name, (h, h))

    @property
    def linear_parameters_per_layer(self) -> int:
        return sum(i * o for i, o in map(self.module_dims, LORA_MODULES))

    @property
    def layer_parameters(self) -> int:
        return max(self.linear_parameters_per_layer, self.parameters // max(self.layers, 1))

    def adapter_parameters(self, rank: int, targets: list[str], dora: bool) -> int:
        names = LORA_MODULES if "all-linear" in targets else tuple(dict.fromkeys(targets))
        per_layer = 0
        for name in names:
            fan_in, fan_out = self.module_dims(name)
            per_layer += rank * (fan_in + fan_out) + (fan_out if dora else 0)
        return per_layer * self.layers


def _shape(params: float, hidden: int, layers: int, ff: int, kv: int, vocab: int) -> ModelShape:
    return ModelShape(int(params), hidden, layers, ff, kv, vocab)


# (name pattern, shape): published configs; `parameters` here is only used for builtin models.
KNOWN_SHAPES: tuple[tuple[str, ModelShape], ...] = (
    (r"smollm2-135m", _shape(134_515_008, 576, 30, 1536, 192, 49152)),
    (r"smollm2-360m", _shape(361.8e6, 960, 32, 2560, 320, 49152)),
    (r"smollm2-1\.7b", _shape(1.71e9, 2048, 24, 8192, 2048, 49152)),
    (r"tinyllama.*1\.1b", _shape(1.1e9, 2048, 22, 5632, 256, 32000)),
    (r"llama-2-7b", _shape(6.74e9, 4096, 32, 11008, 4096, 32000)),
    (r"llama-2-13b", _shape(13.0e9, 5120, 40, 13824, 5120, 32000)),
    (r"llama-2-70b", _shape(69.0e9, 8192, 80, 28672, 1024, 32000)),
    (r"llama-3\.2-1b", _shape(1.24e9, 2048, 16, 8192, 512, 128256)),
    (r"llama-3\.2-3b", _shape(3.21e9, 3072, 28, 8192, 1024, 128256)),
    (r"llama-3(\.\d)?-8b", _shape(8.03e9, 4096, 32, 14336, 1024, 128256)),
    (r"llama-3(\.\d)?-70b", _shape(70.6e9, 8192, 80, 28672, 1024, 128256)),
    (r"mistral-7b", _shape(7.24e9, 4096, 32, 14336, 1024, 32768)),
    (r"qwen2\.5-0\.5b", _shape(0.49e9, 896, 24, 4864, 128, 151936)),
    (r"qwen2\.5-1\.5b", _shape(1.54e9, 1536, 28, 8960, 256, 151936)),
    (r"qwen2\.5-7b", _shape(7.6e9, 3584, 28, 18944, 512, 152064)),
)
_SIZE_IN_NAME = re.compile(r"(?:^|[-_/ ])(\d+(?:\.\d+)?)([bm])(?![a-z0-9])", re.IGNORECASE)


def parameter_count(spec: FineTuneJobSpec) -> int:
    """Base-model parameters: `model.parameterCount`, a built-in model, or the size in the
    source's name (`Llama-2-7b-hf` -> 7e9, `SmolLM2-135M` -> 135e6)."""
    if spec.model.parameter_count is not None:
        return spec.model.parameter_count
    source = spec.model.source
    known = known_shape(source)
    if source.startswith("builtin://") and known is not None:
        return known.parameters
    name = source.split("://", 1)[-1].rstrip("/")
    match = _SIZE_IN_NAME.search(name.rsplit("/", 1)[-1]) or _SIZE_IN_NAME.search(name)
    if match is None:
        raise PlanError(
            f"cannot tell the size of model {source!r} from its name; set "
            "spec.model.parameterCount (for example 7000000000 for a 7B model)"
        )
    scale = 1e9 if match.group(2).lower() == "b" else 1e6
    return int(float(match.group(1)) * scale)


def known_shape(source: str) -> ModelShape | None:
    """The published shape whose pattern matches the source, with its own parameter count."""
    lowered = source.lower()
    return next((shape for pattern, shape in KNOWN_SHAPES if re.search(pattern, lowered)), None)


def model_shape(spec: FineTuneJobSpec) -> ModelShape:
    """Shape from the table when the name is known, else a Llama-like shape of that size."""
    params = parameter_count(spec)
    known = known_shape(spec.model.source)
    if known is not None:
        return replace(known, parameters=params)
    # Llama-like: ~12 h^2 per layer, about 128 hidden units per layer; a large vocabulary
    # keeps the logits estimate on the safe side.
    hidden = max(64, round((params * 128 / 12) ** (1 / 3) / 64) * 64)
    layers = max(1, round(hidden / 128))
    return ModelShape(params, hidden, layers, hidden * 8 // 3, hidden, 128256)
