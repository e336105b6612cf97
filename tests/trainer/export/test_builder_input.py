"""The config the ONNX builder is given (`export/builder_input.py`): rewritten only where the
builder would misread transformers 5's, and only in a staging copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.export.builder_input import (
    UnsupportedConfig,
    builder_config,
    extra_options,
    prepare,
)
from tests.trainer.families.catalog import FAMILIES


def config_of(name: str) -> dict:
    """config.json as transformers 5 writes it for the family's tiny model."""
    return json.loads(FAMILIES[name].config(32064).to_json_string())


@pytest.mark.parametrize("name", ["llama3", "llama2", "phi3-128k", "phi4-mini", "qwen2",
                                  "qwen3", "gemma2"])
def test_configs_the_builder_reads_right_are_left_alone(name: str) -> None:
    config = config_of(name)
    assert builder_config(config) == (config, [])


def test_gemma3_rope_per_layer_type_is_given_flat_with_the_local_theta() -> None:
    """The builder's Gemma 3 reads `rope_parameters["rope_type"]`, the global theta and
    `rope_local_base_freq`; transformers 5 nests them per layer type (KeyError: 'rope_type')."""
    config = config_of("gemma3")
    nested = config["rope_parameters"]
    assert set(nested) == {"full_attention", "sliding_attention"}
    rewritten, changes = builder_config(config)
    rope = rewritten["rope_parameters"]
    assert rope["rope_type"] == "default" and changes
    assert rope["rope_theta"] == nested["full_attention"]["rope_theta"] == 1e6
    assert rope["rope_local_base_freq"] == nested["sliding_attention"]["rope_theta"] == 1e4
    # transformers still reads the nested form from the same file
    assert rope["full_attention"] == nested["full_attention"]
    assert config["rope_parameters"] == nested  # the input is not modified


def test_rope_scaling_on_one_layer_type_is_refused() -> None:
    """Gemma 3 4B+ scale the global layers' RoPE only; the builder scales both caches."""
    config = config_of("gemma3")
    config["rope_parameters"]["full_attention"].update(rope_type="linear", factor=8.0)
    with pytest.raises(UnsupportedConfig, match="per-layer-type scaling"):
        builder_config(config)


@pytest.mark.parametrize("name", ["mistral", "phi3"])
def test_a_window_on_every_layer_is_spelled_out_for_the_builder(name: str) -> None:
    """Mistral's (and Phi-3's, when set) sliding window applies to every layer in
    transformers; the builder applies one only to layers `layer_types` marks."""
    config = config_of(name)
    config["sliding_window"] = 8
    assert "layer_types" not in config
    rewritten, changes = builder_config(config)
    assert rewritten["layer_types"] == ["sliding_attention"] * config["num_hidden_layers"]
    assert changes == ["sliding_window 8 applied to every layer (layer_types)"]


def test_an_unscaled_rope_with_two_context_lengths_is_not_given_as_long_rope() -> None:
    """The built-in weights repacked into Phi-3's layout keep their 8192-token context beside
    Phi3Config's default `original_max_position_embeddings` (4096) and plain RoPE: transformers
    never reads the shorter length, but the builder chose its LongRoPE Phi-3 from the two
    lengths and failed (`KeyError: 'multi_cache'`) exporting the quickstart's Phi-3 run."""
    config = config_of("phi3")
    config.update(max_position_embeddings=8192, original_max_position_embeddings=4096)
    assert config["rope_parameters"]["rope_type"] == "default"
    rewritten, changes = builder_config(config)
    assert rewritten["original_max_position_embeddings"] == 8192
    assert changes == ["original_max_position_embeddings 4096 set to max_position_embeddings "
                       "8192 (RoPE is unscaled)"]
    long_rope = config_of("phi3-128k")
    assert long_rope["rope_parameters"]["rope_type"] == "longrope"
    assert long_rope["original_max_position_embeddings"] < long_rope["max_position_embeddings"]
    assert builder_config(long_rope) == (long_rope, [])


def test_staging_copy_links_the_rest_and_sliding_layers_get_full_caches(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config_of("mistral")))
    (model / "model.safetensors").write_bytes(b"weights")
    staged, changes = prepare(model, tmp_path / "scratch")
    assert staged != model and changes
    assert (staged / "model.safetensors").resolve() == (model / "model.safetensors").resolve()
    assert "layer_types" in json.loads((staged / "config.json").read_text())
    assert "layer_types" not in json.loads((model / "config.json").read_text())
    assert extra_options(staged) == ["windowed_kv_cache=false"]
    assert extra_options(model) == []
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(config_of("llama3")))
    assert prepare(llama, tmp_path / "scratch2") == (llama, [])


def test_a_config_in_transformers_4_form_is_read_as_the_builder_will_read_it(
    tmp_path: Path,
) -> None:
    """Gemma 3 and 2 configs as published before transformers 5 (`rope_theta` and
    `rope_local_base_freq`; no `layer_types`): transformers 5 reads them into the nested RoPE
    and the per-layer window the builder misreads, so the rewrite and the full-length caches
    follow what transformers reads, not the file's spelling."""
    gemma3 = config_of("gemma3")
    nested = gemma3.pop("rope_parameters")
    gemma3.update(rope_theta=nested["full_attention"]["rope_theta"],
                  rope_local_base_freq=nested["sliding_attention"]["rope_theta"])
    (tmp_path / "gemma3").mkdir()
    (tmp_path / "gemma3" / "config.json").write_text(json.dumps(gemma3))
    staged, changes = prepare(tmp_path / "gemma3", tmp_path / "scratch")
    rope = json.loads((staged / "config.json").read_text())["rope_parameters"]
    assert changes and (rope["rope_theta"], rope["rope_local_base_freq"]) == (1e6, 1e4)
    gemma2 = config_of("gemma2")
    gemma2.pop("layer_types")
    (tmp_path / "gemma2").mkdir()
    (tmp_path / "gemma2" / "config.json").write_text(json.dumps(gemma2))
    assert extra_options(tmp_path / "gemma2") == ["windowed_kv_cache=false"]
