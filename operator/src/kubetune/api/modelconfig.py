"""A model's architecture read from its transformers `config.json` (pure: the caller reads
the file and passes the parsed dict).

Both planes read it: the planner sizes a run from it (`kubetune.planner.shapes`), and the
trainer checks at start that the plan was made for the model it loads (`plan_mismatch`).

A family's layer is data, not code: `LAYOUTS`, keyed by `model_type`, says which linear
modules one decoder layer has (separate `q_proj`/`k_proj`/`v_proj` or Phi-3's packed
`qkv_proj`; `gate_proj` + `up_proj` or packed `gate_up_proj`), in which named dimensions, which
carry a bias, how many norms a layer has and whether the embeddings are tied by default.
Composite configs (Gemma 3's `text_config` + `vision_config`) are read by `COMPOSITES`, and
nested configs, which transformers writes without the values equal to their class defaults,
are completed from `CLASS_DEFAULTS`. A `model_type` not in the table is read with Llama's
layout (`Architecture.known` is False); a mixture-of-experts config is refused, since a dense
layout would undercount it many times over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetune.api.status import PlanStatus

PARAMETER_TOLERANCE = 0.10
"""`plan_mismatch`: a planned parameter count this far from config.json's is reported."""


class ModelConfigError(ValueError):
    """config.json does not say what the architecture is; the message names what is missing."""


# --- layouts: data --------------------------------------------------------------------------
# A linear module as (name, in dimension, out dimension). Dimensions are named:
# hidden; q = heads x head_dim; kv = kv heads x head_dim; qkv = q + 2 kv; ff = intermediate;
# ff2 = 2 x intermediate (a packed gate and up projection).
ATTENTION = (("q_proj", "hidden", "q"), ("k_proj", "hidden", "kv"), ("v_proj", "hidden", "kv"),
             ("o_proj", "q", "hidden"))
PACKED_ATTENTION = (("qkv_proj", "hidden", "qkv"), ("o_proj", "q", "hidden"))
GATED_MLP = (("gate_proj", "hidden", "ff"), ("up_proj", "hidden", "ff"),
             ("down_proj", "ff", "hidden"))
PACKED_MLP = (("gate_up_proj", "hidden", "ff2"), ("down_proj", "ff", "hidden"))
VISION_ENCODER = (("q_proj", "hidden", "hidden"), ("k_proj", "hidden", "hidden"),
                  ("v_proj", "hidden", "hidden"), ("out_proj", "hidden", "hidden"),
                  ("fc1", "hidden", "ff"), ("fc2", "ff", "hidden"))
QKVO = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
MLP = frozenset({"gate_proj", "up_proj", "down_proj"})


@dataclass(frozen=True)
class Layout:
    """One layer of a family: its linear modules, their biases, its norms."""

    linears: tuple[tuple[str, str, str], ...]
    biased: frozenset[str] = frozenset()
    """Modules that always carry a bias."""
    attention_bias: frozenset[str] = frozenset()
    """Modules that carry a bias when the config's `attention_bias` is true."""
    mlp_bias: frozenset[str] = frozenset()
    """Modules that carry a bias when the config's `mlp_bias` is true."""
    layer_norms: int = 2
    """Norms over the hidden size per layer (Gemma 2 and 3 norm before and after each block)."""
    head_norms: int = 0
    """Norms over head_dim per layer (Qwen 3 and Gemma 3 normalise q and k per head)."""
    norm_bias: bool = False
    """LayerNorm (weight and bias) rather than RMSNorm (weight only)."""
    tied: bool = False
    """`tie_word_embeddings` when config.json does not say (the transformers class default)."""


LLAMA = Layout(ATTENTION + GATED_MLP, attention_bias=QKVO, mlp_bias=MLP)
LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA,
    "mistral": Layout(ATTENTION + GATED_MLP),
    "qwen2": Layout(ATTENTION + GATED_MLP, biased=frozenset({"q_proj", "k_proj", "v_proj"})),
    "qwen3": Layout(ATTENTION + GATED_MLP, attention_bias=QKVO, head_norms=2),
    "phi3": Layout(PACKED_ATTENTION + PACKED_MLP),
    "gemma": Layout(ATTENTION + GATED_MLP, attention_bias=QKVO, tied=True),
    "gemma2": Layout(ATTENTION + GATED_MLP, attention_bias=QKVO, layer_norms=4, tied=True),
    "gemma3_text": Layout(ATTENTION + GATED_MLP, attention_bias=QKVO, layer_norms=4,
                          head_norms=2, tied=True),
}
VISION_LAYOUTS: dict[str, Layout] = {
    "siglip_vision_model": Layout(
        VISION_ENCODER, biased=frozenset(name for name, _, _ in VISION_ENCODER), norm_bias=True
    ),
}
COMPOSITES: dict[str, tuple[str, str]] = {"gemma3": ("gemma3_text", "siglip_vision_model")}
"""model_type -> (its text_config's model_type, its vision_config's model_type)."""
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 26, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "head_dim": 256},
    "siglip_vision_model": {"hidden_size": 768, "intermediate_size": 3072,
                            "num_hidden_layers": 12, "num_attention_heads": 12,
                            "num_channels": 3, "image_size": 224, "patch_size": 16,
                            "vision_use_head": True},
}
"""transformers' class defaults, for the keys a config.json leaves out: a nested config
(Gemma 3's `text_config`) is written without the values equal to its class's defaults."""
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


# --- the typed reading ----------------------------------------------------------------------
class TextConfig(BaseModel):
    """The keys of a decoder's config.json that decide its size."""

    model_config = ConfigDict(extra="ignore")

    model_type: str = ""
    hidden_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    head_dim: int | None = Field(None, ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool | None = None
    attention_bias: bool = False
    mlp_bias: bool = False


class VisionConfig(BaseModel):
    """The keys of a ViT-style vision tower's config (SigLIP) that decide its size."""

    model_config = ConfigDict(extra="ignore")

    model_type: str = ""
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    num_channels: int = Field(3, ge=1)
    image_size: int = Field(ge=1)
    patch_size: int = Field(ge=1)
    vision_use_head: bool = False


@dataclass(frozen=True)
class Linear:
    """A linear module of the model: `count` of them (one per layer of its tower)."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool
    count: int
    tower: str = "text"
    """`text` (the decoder's layers) or `vision`."""

    @property
    def parameters(self) -> int:
        return self.count * (self.fan_in * self.fan_out + (self.fan_out if self.bias else 0))


@dataclass(frozen=True)
class Architecture:
    """What config.json says about a model's size and structure."""

    family: str
    """The `model_type` whose layout was used (`gemma3_text` for Gemma 3's text model)."""
    known: bool
    """False when `model_type` is not in `LAYOUTS` and Llama's layout was assumed."""
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]
    """Every linear module except the output head, the decoder's first."""
    parameters: int
    """All parameters, computed from the config (embeddings, the head unless tied,
    attention, MLP, norms, biases, a vision tower)."""


def _one_line(error: ValidationError, where: str) -> str:
    return "; ".join(
        f"{where}{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()
    )


def _layer_linears(layout: Layout, dims: Mapping[str, int], config: TextConfig | None,
                   count: int, tower: str) -> tuple[Linear, ...]:
    attention_bias = bool(config and config.attention_bias)
    mlp_bias = bool(config and config.mlp_bias)
    return tuple(
        Linear(
            name, dims[fan_in], dims[fan_out],
            name in layout.biased
            or (attention_bias and name in layout.attention_bias)
            or (mlp_bias and name in layout.mlp_bias),
            count, tower,
        )
        for name, fan_in, fan_out in layout.linears
    )


def _norm(layout: Layout, size: int) -> int:
    return size * (2 if layout.norm_bias else 1)


def _vision_tower(document: Mapping[str, Any], model_type: str,
                  text_hidden: int) -> tuple[tuple[Linear, ...], int]:
    """A SigLIP-style tower's linear modules and parameters, with Gemma 3's projector."""
    raw = {**CLASS_DEFAULTS.get(model_type, {}), **document}
    try:
        vision = VisionConfig.model_validate(raw)
    except ValidationError as error:
        raise ModelConfigError(_one_line(error, "vision_config.")) from error
    layout = VISION_LAYOUTS[model_type]
    h, ff = vision.hidden_size, vision.intermediate_size
    linears = _layer_linears(layout, {"hidden": h, "ff": ff}, None, vision.num_hidden_layers,
                             "vision")
    per_layer_norms = layout.layer_norms * _norm(layout, h)
    patches = (vision.image_size // vision.patch_size) ** 2
    embeddings = vision.num_channels * vision.patch_size**2 * h + h + patches * h
    head = 0
    if vision.vision_use_head:  # attention pooling: probe, attention, norm, MLP
        head = h + 3 * h * h + 3 * h + h * h + h + _norm(layout, h) + 2 * h * ff + ff + h
    total = (sum(linear.parameters for linear in linears)
             + vision.num_hidden_layers * per_layer_norms + embeddings + _norm(layout, h) + head)
    projector = h * text_hidden + h  # Gemma 3: projection weight and its RMSNorm
    return linears, total + projector


def _experts(document: Mapping[str, Any]) -> str | None:
    for key in EXPERT_KEYS:
        value = document.get(key)
        if isinstance(value, int) and value > 1:
            return f"{key}: {value}"
    return None


def read_architecture(config: Mapping[str, Any]) -> Architecture:
    """The architecture a transformers config.json describes. Raises ModelConfigError naming
    the missing or invalid key, or why the config cannot be read (mixture of experts)."""
    model_type = str(config.get("model_type") or "")
    text_document: Mapping[str, Any] = config
    where = ""
    vision: tuple[str, Mapping[str, Any]] | None = None
    nested = config.get("text_config")
    if model_type in COMPOSITES or isinstance(nested, Mapping):
        if not isinstance(nested, Mapping):
            raise ModelConfigError("text_config: missing or not an object")
        text_type, vision_type = COMPOSITES.get(model_type, ("", ""))
        text_document = {"model_type": text_type,
                         "tie_word_embeddings": config.get("tie_word_embeddings"), **nested}
        where = "text_config."
        vision_document = config.get("vision_config")
        if isinstance(vision_document, Mapping) and vision_type in VISION_LAYOUTS:
            vision = (vision_type, {"model_type": vision_type, **vision_document})
    family = str(text_document.get("model_type") or model_type)
    experts = _experts(text_document)
    if experts:
        raise ModelConfigError(f"{family or 'the model'} is a mixture of experts ({experts}); "
                               "its size is not read from config.json")
    try:
        text = TextConfig.model_validate({**CLASS_DEFAULTS.get(family, {}), **text_document})
    except ValidationError as error:
        raise ModelConfigError(_one_line(error, where)) from error
    layout = LAYOUTS.get(family, LLAMA)
    heads = text.num_attention_heads
    kv_heads = text.num_key_value_heads or heads
    head_dim = text.head_dim or text.hidden_size // heads
    h, ff = text.hidden_size, text.intermediate_size
    dims = {"hidden": h, "q": heads * head_dim, "kv": kv_heads * head_dim,
            "qkv": (heads + 2 * kv_heads) * head_dim, "ff": ff, "ff2": 2 * ff}
    layers = text.num_hidden_layers
    linears = _layer_linears(layout, dims, text, layers, "text")
    tied = layout.tied if text.tie_word_embeddings is None else text.tie_word_embeddings
    norms = layout.layer_norms * _norm(layout, h) + layout.head_norms * _norm(layout, head_dim)
    embeddings = text.vocab_size * h * (1 if tied else 2)
    parameters = (embeddings + sum(linear.parameters for linear in linears) + layers * norms
                  + _norm(layout, h))
    if vision is not None:
        vision_linears, vision_parameters = _vision_tower(vision[1], vision[0], h)
        linears += vision_linears
        parameters += vision_parameters
    return Architecture(
        family=family, known=family in LAYOUTS, hidden=h, layers=layers, intermediate=ff,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=text.vocab_size, tied=tied,
        linears=linears, parameters=parameters,
    )


def _size(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def plan_mismatch(plan: PlanStatus, model: Architecture) -> str | None:
    """What differs between the model the plan was made for and the model config.json
    describes, field by field: a parameter count more than `PARAMETER_TOLERANCE` off, another
    hidden size or layer count. None when they agree (or the plan does not say)."""
    found = []
    if plan.parameters and abs(plan.parameters - model.parameters) > (
        PARAMETER_TOLERANCE * model.parameters
    ):
        change = (plan.parameters - model.parameters) / model.parameters
        found.append(f"parameters {_size(plan.parameters)} planned, {_size(model.parameters)} "
                     f"in config.json ({change:+.0%})")
    if plan.hidden_size is not None and plan.hidden_size != model.hidden:
        found.append(f"hiddenSize {plan.hidden_size} planned, {model.hidden} in config.json")
    if plan.layers is not None and plan.layers != model.layers:
        found.append(f"layers {plan.layers} planned, {model.layers} in config.json")
    if not found:
        return None
    return ("the plan was made for another model than config.json describes ("
            + "; ".join(found) + "): its memory estimate and batch split may be off; "
            "spec.model.parameterCount sets the size the planner uses")
