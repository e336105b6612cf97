"""The family examples (Phi-3-mini, Phi-4-mini, Llama 3.2, Qwen2.5, Gemma 2) plan on their GPU
nodes by name alone, as the operator plans them (it cannot read a Hub model's config.json)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api import load_manifest
from kubetune.planner.plan import plan
from kubetune.planner.shapes import model_shape

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
FAMILY_EXAMPLES = {
    "phi3-mini-lora.yaml": 3_821_079_552,
    "phi4-mini-qlora.yaml": 3_836_021_760,
    "llama3.2-3b-dora.yaml": 3_212_749_824,
    "qwen2.5-7b-lora.yaml": 7_615_616_512,
    "gemma2-2b-full.yaml": 2_614_341_888,
}


@pytest.mark.parametrize("name", sorted(FAMILY_EXAMPLES))
def test_a_family_example_plans_by_name_with_its_published_size(name: str) -> None:
    spec = load_manifest(EXAMPLES / name).spec
    assert spec.model.parameter_count is None
    shape = model_shape(spec)
    assert abs(shape.parameters - FAMILY_EXAMPLES[name]) / FAMILY_EXAMPLES[name] < 0.02
    planned = plan(spec)
    assert planned.world_size == spec.resources.nodes * spec.resources.gpus_per_node
    assert float(planned.estimated_gpu_memory_gib) <= spec.resources.gpu_memory_gib


def test_phi3s_own_packed_names_size_its_adapter() -> None:
    spec = load_manifest(EXAMPLES / "phi3-mini-lora.yaml").spec
    shape = model_shape(spec)
    # rank 16 on qkv_proj (3072 -> 9216), o_proj, gate_up_proj (3072 -> 16384), down_proj
    per_layer = 16 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))
    assert shape.adapter_parameters(16, spec.lora_or_default.target_modules, False) == (
        per_layer * 32)
