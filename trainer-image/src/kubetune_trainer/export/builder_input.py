"""The model directory onnxruntime-genai's builder reads, in a form it reads right.

The builder (site-packages, not ours to patch) reads `config.json` through transformers and
then its own attribute names. Two things transformers 5 writes it misreads:

- per-layer-type RoPE parameters (Gemma 3: `rope_parameters: {"full_attention": {...},
  "sliding_attention": {...}}`): the builder looks for `rope_parameters["rope_type"]` and fails
  with `KeyError: 'rope_type'`. It wants the flat form of transformers 4 (global theta, and the
  local layers' theta as `rope_local_base_freq`);
- a sliding window that applies to every layer with no `layer_types` to say so (Mistral, Phi-3):
  the builder gives a layer a window only when `layer_types` marks it `sliding_attention`, so it
  silently attended to the whole context where PyTorch attends to the window;
- an `original_max_position_embeddings` below `max_position_embeddings` with RoPE unscaled
  (a Phi-3 whose context was lengthened without LongRoPE; the built-in weights repacked into
  Phi-3's layout): transformers reads it only for LongRoPE, but the builder picks its LongRoPE
  Phi-3 class from the two lengths alone and fails looking for the long factors
  (`KeyError: 'multi_cache'`). Its copy gets the two lengths equal.

`prepare` returns the model directory itself when its config needs neither, else a staging copy
(the other files linked, not copied) whose `config.json` is rewritten; the exporter still loads
the original for PyTorch, so the parity checks compare the build with the model as trained.

`extra_options` turns off the builder's window-sized key/value caches for sliding layers: that
layout needs a cache at least a window long from the first token (onnxruntime-genai refuses a
`max_length` below the window, and plain ONNX Runtime, which the server's batching engine and
`precision: Auto`'s scoring use, cannot feed it at all), while full-length caches with the
window applied in GroupQueryAttention compute the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LAYER_TYPES = ("full_attention", "sliding_attention")
BUILDER_INPUT = "builder-input"


class UnsupportedConfig(ValueError):
    """A config the builder cannot be given in a form it computes right."""


def _per_layer_type(rope: Any) -> bool:
    return (isinstance(rope, dict) and "rope_type" not in rope and bool(rope)
            and all(key in LAYER_TYPES and isinstance(value, dict) for key, value in rope.items()))


def _flat_rope(rope: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Gemma 3's per-layer-type RoPE as the builder reads it: the full-attention layers'
    parameters flat, the sliding layers' theta as `rope_local_base_freq` (which the builder's
    Gemma 3 reads), and the nested form kept for transformers' own reading of the config."""
    full = rope.get("full_attention", {"rope_type": "default"})
    local = rope.get("sliding_attention", full)
    for name, part in (("full_attention", full), ("sliding_attention", local)):
        if part.get("rope_type", "default") != "default" or set(part) - {"rope_type",
                                                                          "rope_theta"}:
            # The builder applies one scaling to both of its cos/sin caches (global and local):
            # scaling only the global layers' (Gemma 3 4B+'s linear factor) has no such form.
            raise UnsupportedConfig(
                f"rope_parameters[{name!r}] = {part}: the ONNX builder applies one RoPE scaling "
                "to every layer, so per-layer-type scaling cannot be exported faithfully")
    flat = dict(full)
    flat["rope_local_base_freq"] = local.get("rope_theta", full.get("rope_theta"))
    return {**flat, **rope}


def builder_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`config` as the builder reads it right, and what was changed (empty: nothing)."""
    rewritten = dict(config)
    changes: list[str] = []
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and _per_layer_type(rope):
        rewritten["rope_parameters"] = _flat_rope(rope)
        changes.append("per-layer-type rope_parameters flattened (global theta, "
                       "rope_local_base_freq for the sliding layers)")
    window = config.get("sliding_window")
    layers = config.get("num_hidden_layers")
    if window and not config.get("layer_types") and isinstance(layers, int):
        # transformers applies the window to every layer when no layer_types say otherwise
        # (Mistral, Phi-3 and Mixtral's modeling code: one sliding mask for the whole model).
        rewritten["layer_types"] = ["sliding_attention"] * layers
        changes.append(f"sliding_window {window} applied to every layer (layer_types)")
    original, longest = (config.get("original_max_position_embeddings"),
                         config.get("max_position_embeddings"))
    rope_type = (rewritten.get("rope_parameters") or {}).get("rope_type", "default")
    if original and longest and original != longest and rope_type == "default":
        rewritten["original_max_position_embeddings"] = longest
        changes.append(f"original_max_position_embeddings {original} set to "
                       f"max_position_embeddings {longest} (RoPE is unscaled)")
    return rewritten, changes


def has_sliding_layers(config: dict[str, Any]) -> bool:
    window = config.get("sliding_window")
    return bool(window) and "sliding_attention" in (config.get("layer_types") or [])


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as transformers reads it, which is what the builder is handed: a file in
    transformers 4's form (Gemma 3's `rope_theta` and `rope_local_base_freq`, Gemma 2 without
    `layer_types`) reads as transformers 5's."""
    from transformers import AutoConfig

    return dict(AutoConfig.from_pretrained(str(model_dir)).to_dict())


def extra_options(model_dir: Path) -> list[str]:
    """The builder options the model's structure asks for (see the module's docstring)."""
    return ["windowed_kv_cache=false"] if has_sliding_layers(read_config(model_dir)) else []


def prepare(model_dir: Path, scratch: Path) -> tuple[Path, list[str]]:
    """The directory to hand the builder, and the changes made to its config.json."""
    rewritten, changes = builder_config(read_config(model_dir))
    if not changes:
        return model_dir, []
    staging = scratch / BUILDER_INPUT
    staging.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "config.json" and not (staging / item.name).exists():
            (staging / item.name).symlink_to(item.resolve())
    (staging / "config.json").write_text(json.dumps(rewritten, indent=2))
    return staging, changes
