"""The planner's model shape from a model's config.json, and from a published model's name.

The configs below are the published config.json files (Hugging Face Hub, as released; long
lists such as LongRoPE factors shortened). Expected parameter counts are the published ones:
each equals what transformers 5.23 instantiates from that config (counted on the meta device),
and the adapter sizes are what peft 0.21 trains on those models (`get_peft_model`, r=8), so a
wrong formula cannot agree with itself here. `tests/trainer/train/test_model_config_counts.py`
re-counts both with transformers and peft.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.modelconfig import read_architecture
from kubetune.api.spec import FineTuneJobSpec
from kubetune.planner.plan import PlanError, model_shape, plan
from kubetune.planner.shapes import KNOWN_CONFIGS, known_shape, shape_from_config

PHI3_MINI_4K: dict[str, Any] = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu",
    "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
    "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": True,
    "vocab_size": 32064,
}
PHI4_MINI: dict[str, Any] = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 199999, "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1,
    "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
    "intermediate_size": 8192, "interpolate_factor": 1, "lm_head_bias": False,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "phi3",
    "num_attention_heads": 24, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "original_max_position_embeddings": 4096, "pad_token_id": 199999,
    "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1, 1.118320672], "short_factor": [1.0, 1.0],
                     "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "use_cache": True,
    "vocab_size": 200064,
}
LLAMA32_1B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
MISTRAL_7B: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
QWEN25_05B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
    "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
    "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_06B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
GEMMA2_2B: dict[str, Any] = {  # no tie_word_embeddings: Gemma's default (tied)
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
    "use_cache": True, "vocab_size": 256000,
}
GEMMA3_1B: dict[str, Any] = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}
GEMMA3_4B: dict[str, Any] = {  # nested text_config, written without its class defaults
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                    "model_type": "gemma3_text", "num_hidden_layers": 34,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}

# (config, published size in billions, exact count, peft's all-linear LoRA r=8 parameters)
PUBLISHED = {
    "Phi-3-mini-4k-instruct": (PHI3_MINI_4K, 3.82, 3_821_079_552, 12_582_912),
    "Phi-4-mini-instruct": (PHI4_MINI, 3.84, 3_836_021_760, 11_534_336),
    "Llama-3.2-1B": (LLAMA32_1B, 1.24, 1_235_814_400, 5_636_096),
    "Mistral-7B-v0.1": (MISTRAL_7B, 7.24, 7_241_732_096, 20_971_520),
    "Qwen2.5-0.5B": (QWEN25_05B, 0.494, 494_032_768, 4_399_104),
    "Qwen3-0.6B": (QWEN3_06B, 0.596, 596_049_920, 5_046_272),
    "gemma-2-2b": (GEMMA2_2B, 2.61, 2_614_341_888, 10_383_360),
    "gemma-3-1b-it": (GEMMA3_1B, 1.0, 999_885_952, 6_522_880),
    "gemma-3-4b-it": (GEMMA3_4B, 4.3, 4_300_079_472, 19_248_896),
}


def make_spec(source: str, **model: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"source": source, **model},
        "dataset": {"source": "builtin://kubectl-commands"},
    })


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_from_config_is_the_published_one(name: str) -> None:
    config, billions, exact, _ = PUBLISHED[name]
    shape = shape_from_config(config)
    assert shape.parameters == pytest.approx(billions * 1e9, rel=0.02)
    assert shape.parameters == exact


@pytest.mark.parametrize("name", PUBLISHED)
def test_all_linear_adapter_is_what_peft_trains(name: str) -> None:
    config, _, _, all_linear = PUBLISHED[name]
    assert shape_from_config(config).adapter_parameters(8, ["all-linear"], dora=False) == all_linear


def test_phi3_has_packed_projections() -> None:
    phi3, phi4 = shape_from_config(PHI3_MINI_4K), shape_from_config(PHI4_MINI)
    assert {m.name for m in phi3.linears} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    # qkv_proj out = (heads + 2 kv heads) x head_dim; gate_up_proj out = 2 x intermediate.
    assert phi3.module_dims("qkv_proj") == (3072, (32 + 2 * 32) * 96)
    assert phi3.module_dims("gate_up_proj") == (3072, 2 * 8192)
    assert phi3.module_dims("down_proj") == (8192, 3072)
    assert phi4.module_dims("qkv_proj") == (3072, (24 + 2 * 8) * 128)
    assert phi4.module_dims("o_proj") == (3072, 3072)
    # What peft trains for these targets (r=8): the packed modules, 32 layers each.
    assert phi3.adapter_parameters(8, ["o_proj", "down_proj"], dora=False) == 4_456_448
    assert phi3.adapter_parameters(8, ["self_attn.qkv_proj"], dora=False) == (
        8 * (3072 + 9216) * 32)


def test_head_dim_apart_from_hidden_over_heads() -> None:
    qwen3, gemma2 = shape_from_config(QWEN3_06B), shape_from_config(GEMMA2_2B)
    assert qwen3.module_dims("q_proj") == (1024, 16 * 128)
    assert qwen3.module_dims("o_proj") == (16 * 128, 1024)
    assert qwen3.module_dims("k_proj") == (1024, 8 * 128)
    assert gemma2.module_dims("q_proj") == (2304, 8 * 256)
    assert gemma2.module_dims("o_proj") == (8 * 256, 2304)
    assert qwen3.adapter_parameters(8, ["q_proj", "v_proj"], dora=False) == 1_146_880


def test_biases_norms_and_ties_count() -> None:
    qwen2 = read_architecture(QWEN25_05B)
    assert {m.name for m in qwen2.linears if m.bias} == {"q_proj", "k_proj", "v_proj"}
    assert qwen2.tied
    assert not read_architecture(MISTRAL_7B).tied
    assert read_architecture(GEMMA2_2B).tied  # not in its config.json: Gemma's default
    # Untying Qwen2.5-0.5B adds one vocabulary x hidden head.
    untied = read_architecture({**QWEN25_05B, "tie_word_embeddings": False})
    assert untied.parameters - qwen2.parameters == 151936 * 896
    # Llama's attention_bias puts a bias on q, k, v and o.
    biased = read_architecture({**LLAMA32_1B, "attention_bias": True})
    assert {m.name for m in biased.linears if m.bias} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_gemma3_nested_text_config_and_vision_tower() -> None:
    gemma3 = read_architecture(GEMMA3_4B)
    assert (gemma3.family, gemma3.hidden, gemma3.layers, gemma3.vocab) == (
        "gemma3_text", 2560, 34, 262208)
    assert (gemma3.heads, gemma3.kv_heads, gemma3.head_dim) == (8, 4, 256)  # class defaults
    assert {m.name for m in gemma3.linears if m.tower == "vision"} == {
        "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    shape = shape_from_config(GEMMA3_4B)
    # The decoder's q_proj, not the vision tower's, is what module_dims describes...
    assert shape.module_dims("q_proj") == (2560, 2048)
    # ...while peft adapts every q_proj and v_proj, the vision tower's too.
    assert shape.adapter_parameters(8, ["q_proj", "v_proj"], dora=False) == 3_223_552


def test_an_unknown_family_reads_as_llama() -> None:
    config = {**LLAMA32_1B, "model_type": "my-llama"}
    model = read_architecture(config)
    assert not model.known
    assert model.parameters == read_architecture(LLAMA32_1B).parameters


def test_config_json_plans_without_parameter_count() -> None:
    result = plan(make_spec("file:///models/phi3"), PHI3_MINI_4K)
    assert result.parameters == 3_821_079_552
    assert (result.hidden_size, result.layers) == (3072, 32)
    assert result.reason.startswith("3.82B LoRA")
    # Without it, a name that says nothing is refused as before.
    with pytest.raises(PlanError, match="parameterCount"):
        plan(make_spec("file:///models/phi3"))


def test_parameter_count_replaces_the_configs() -> None:
    shape = model_shape(make_spec("file:///models/phi3", parameterCount=4_000_000_000),
                        PHI3_MINI_4K)
    assert (shape.parameters, shape.hidden, shape.layers) == (4_000_000_000, 3072, 32)


def test_a_config_without_its_size_names_the_key() -> None:
    with pytest.raises(PlanError) as error:
        plan(make_spec("file:///m"), {"model_type": "llama", "hidden_size": 4096})
    assert "num_hidden_layers" in str(error.value)
    assert "parameterCount" in str(error.value)


def test_mixture_of_experts_is_not_read_as_dense() -> None:
    mixtral = {**MISTRAL_7B, "model_type": "mixtral", "num_local_experts": 8,
               "num_experts_per_tok": 2}
    with pytest.raises(PlanError, match=r"mixture of experts \(num_local_experts: 8\)"):
        plan(make_spec("pvc://models/mixtral"), mixtral)
    # parameterCount gets past it.
    spec = make_spec("pvc://models/mixtral", parameterCount=46_702_792_704)
    assert model_shape(spec, mixtral).parameters == 46_702_792_704


@pytest.mark.parametrize(
    ("source", "parameters", "hidden", "layers"),
    [
        ("hf://microsoft/Phi-3-mini-4k-instruct", 3_821_079_552, 3072, 32),
        ("hf://microsoft/Phi-3-mini-128k-instruct", 3_821_079_552, 3072, 32),
        ("hf://microsoft/Phi-3.5-mini-instruct", 3_821_079_552, 3072, 32),
        ("hf://microsoft/Phi-4-mini-instruct", 3_836_021_760, 3072, 32),
        ("hf://meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248, 4096, 32),
        ("hf://meta-llama/Llama-3.2-1B-Instruct", 1_235_814_400, 2048, 16),
        ("hf://meta-llama/Llama-3.2-3B", 3_212_749_824, 3072, 28),
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", 494_032_768, 896, 24),
        ("hf://Qwen/Qwen2.5-1.5B", 1_543_714_304, 1536, 28),
        ("hf://Qwen/Qwen2.5-3B-Instruct", 3_085_938_688, 2048, 36),
        ("hf://Qwen/Qwen2.5-7B-Instruct", 7_615_616_512, 3584, 28),
        ("hf://Qwen/Qwen3-0.6B", 596_049_920, 1024, 28),
        ("hf://Qwen/Qwen3-1.7B", 1_720_574_976, 2048, 28),
        ("hf://Qwen/Qwen3-4B", 4_022_468_096, 2560, 36),
        ("hf://Qwen/Qwen3-8B", 8_190_735_360, 4096, 36),
        ("hf://mistralai/Mistral-7B-v0.1", 7_241_732_096, 4096, 32),
        ("hf://mistralai/Mistral-7B-Instruct-v0.3", 7_248_023_552, 4096, 32),
        ("hf://google/gemma-2-2b-it", 2_614_341_888, 2304, 26),
        ("hf://google/gemma-2-9b", 9_241_705_984, 3584, 42),
        ("hf://google/gemma-3-1b-it", 999_885_952, 1152, 26),
        ("hf://google/gemma-3-4b-it", 4_300_079_472, 2560, 34),
    ],
)
def test_the_operator_plans_published_models_by_name(
    source: str, parameters: int, hidden: int, layers: int
) -> None:
    result = plan(make_spec(source))
    assert result.parameters == parameters
    assert (result.hidden_size, result.layers) == (hidden, layers)


def test_the_name_table_agrees_with_the_published_configs() -> None:
    """Each table entry is read by the same code as a config.json: the name and the file of
    the same model plan the same shape."""
    by_name = {
        "phi-3-mini-4k": PHI3_MINI_4K, "phi-4-mini": PHI4_MINI, "llama-3.2-1b": LLAMA32_1B,
        "mistral-7b-v0.1": MISTRAL_7B, "qwen2.5-0.5b": QWEN25_05B, "qwen3-0.6b": QWEN3_06B,
        "gemma-2-2b": GEMMA2_2B, "gemma-3-1b": GEMMA3_1B, "gemma-3-4b": GEMMA3_4B,
    }
    for name, config in by_name.items():
        assert known_shape(f"hf://org/{name}") == shape_from_config(config), name
    assert len(KNOWN_CONFIGS) >= 27
