"""GPTQ's INT4 rounding: far closer to FP32's outputs than RTN's, and laid out as ONNX Runtime's
MatMulNBits reads it (checked by running the kernel, not by reading our own packing back)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kubetune_trainer.export.requantize import (
    BLOCK,
    Part,
    Source,
    WeightFinder,
    dequantize,
    gptq,
    hessians,
    output_error,
)
from tests.trainer.families.catalog import FAMILIES


def rtn(weight: np.ndarray) -> np.ndarray:
    """ONNX Runtime's symmetric RTN: the block's largest magnitude, signed, lands on -8."""
    blocks = weight.reshape(weight.shape[0], -1, BLOCK)
    pivot = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    scale = pivot / -8.0
    return (np.clip(np.round(blocks / scale), -8, 7) * scale).reshape(weight.shape)


def correlated_activations(columns: int, seed: int) -> np.ndarray:
    """Activations whose channels differ in scale and move together (a few directions carry
    most of the variance), as a transformer's do."""
    generator = np.random.default_rng(seed)
    mixing = generator.normal(0, 1, (columns // 8, columns)) * generator.gamma(0.5, 2, columns)
    signal = generator.normal(0, 1, (2048, columns // 8)) @ mixing
    return signal + generator.normal(0, 0.05, (2048, columns))


def test_gptq_moves_the_outputs_far_less_than_rtn() -> None:
    generator = np.random.default_rng(0)
    weight = generator.standard_t(4, (64, 256)).astype(np.float32) * 0.02
    x = correlated_activations(256, 1)
    hessian = torch.tensor(x.T @ x / len(x))
    packed, scales = gptq(weight, hessian)
    # what the layer outputs on the activations, quantized against FP32
    gptq_error = np.square(x @ (dequantize(packed, scales) - weight).T).mean()
    rtn_error = np.square(x @ (rtn(weight) - weight).T).mean()
    assert gptq_error < 0.5 * rtn_error
    assert output_error(dequantize(packed, scales) - weight, hessian) == pytest.approx(
        gptq_error * weight.shape[0], rel=1e-3)


def test_packing_is_what_matmulnbits_computes_with() -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    generator = np.random.default_rng(1)
    rows, columns = 48, 128
    weight = generator.normal(0, 0.05, (rows, columns)).astype(np.float32)
    x = correlated_activations(columns, 2)
    packed, scales = gptq(weight, torch.tensor(x.T @ x / len(x)))
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
                            K=columns, N=rows, bits=4, block_size=BLOCK, accuracy_level=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, columns])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])],
        [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.ravel(), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = generator.normal(0, 1, (3, columns)).astype(np.float32)
    [y] = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ dequantize(packed, scales).T, rtol=1e-4, atol=1e-4)


# The structure-based weight mapping (`WeightFinder`): each family's layout, as the builder
# names and stacks its MatMuls, found in the transformers model without its module names.

def rtn_with_scales(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's symmetric RTN of (N, K) `weight`: (dequantized weight, scales (N, K/32))."""
    blocks = weight.reshape(weight.shape[0], -1, BLOCK)
    pivot = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    scale = pivot / -8.0
    safe = np.where(scale == 0, 1.0, scale)
    values = np.clip(np.round(blocks / safe), -8, 7) * scale
    return values.reshape(weight.shape).astype(np.float32), scale[..., 0].astype(np.float32)


def tiny(name: str, vocab: int = 32064) -> Any:
    """The family's tiny model (catalog.py's config) without its tokenizer: a vocabulary
    of 32064 holds every special id the configs name."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[name].config(vocab),
                                            dtype=torch.float32).eval()


def builder_nodes(model: Any) -> dict[str, tuple[np.ndarray, str]]:
    """The builder's MatMul nodes of `model`, as it names and stacks them: node name -> (FP32
    weight, the module whose input it reads). Written per layout here, in the test, so the
    finder's answers are checked against an independent account."""
    nodes: dict[str, tuple[np.ndarray, str]] = {}

    def w(module: Any) -> np.ndarray:
        return module.weight.detach().numpy()

    for index, layer in enumerate(model.model.layers):
        attention, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{index}"
        at = f"/model/layers.{index}"
        if hasattr(attention, "qkv_proj"):
            nodes[f"{at}/attn/qkv_proj/MatMul"] = (w(attention.qkv_proj),
                                                   f"{prefix}.self_attn.qkv_proj")
        else:
            nodes[f"{at}/attn/qkv_proj/MatMul"] = (np.concatenate(
                [w(attention.q_proj), w(attention.k_proj), w(attention.v_proj)]),
                f"{prefix}.self_attn.q_proj")
        nodes[f"{at}/attn/o_proj/MatMul"] = (w(attention.o_proj), f"{prefix}.self_attn.o_proj")
        if hasattr(mlp, "gate_up_proj"):
            gate, up = np.split(w(mlp.gate_up_proj), 2)
            nodes[f"{at}/mlp/gate_proj/MatMul"] = (gate, f"{prefix}.mlp.gate_up_proj")
            nodes[f"{at}/mlp/up_proj/MatMul"] = (up, f"{prefix}.mlp.gate_up_proj")
        else:
            nodes[f"{at}/mlp/gate_proj/MatMul"] = (w(mlp.gate_proj), f"{prefix}.mlp.gate_proj")
            nodes[f"{at}/mlp/up_proj/MatMul"] = (w(mlp.up_proj), f"{prefix}.mlp.up_proj")
        nodes[f"{at}/mlp/down_proj/MatMul"] = (w(mlp.down_proj), f"{prefix}.mlp.down_proj")
    nodes["/lm_head/MatMul"] = (w(model.lm_head), "lm_head")
    return nodes


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_node_is_found_by_structure_in_every_family(name: str) -> None:
    """Llama's stacked q/k/v, Phi-3's packed qkv_proj and its gate_up_proj split in halves,
    Qwen2's biased projections, Qwen3's and Gemma 3's q/k norms, and heads tied to the
    embedding: each node's weight and the module it reads, from the RTN weights alone."""
    model = tiny(name)
    finder = WeightFinder(model)
    for node, (weight, reads) in builder_nodes(model).items():
        rounded, scales = rtn_with_scales(weight)
        source = finder.find(f"{node}_Q4", rounded, scales)
        np.testing.assert_array_equal(finder.weight(source), weight, err_msg=node)
        assert source.reads == reads, node


def test_a_weight_the_model_does_not_have_fails_loudly() -> None:
    model = tiny("llama3")
    finder = WeightFinder(model)
    weight = model.model.layers[1].self_attn.o_proj.weight.detach().numpy()
    rounded, scales = rtn_with_scales(weight)
    with pytest.raises(ValueError, match="not a rounding"):  # another layer's weight
        finder.find("/model/layers.0/attn/o_proj/MatMul_Q4", rounded, scales)
    shuffled, scales = rtn_with_scales(weight[::-1].copy())
    with pytest.raises(ValueError, match="not a rounding"):
        finder.find("/model/layers.1/attn/o_proj/MatMul_Q4", shuffled, scales)
    with pytest.raises(ValueError, match="no decoder layer 7"):
        finder.find("/model/layers.7/attn/o_proj/MatMul_Q4", rounded, scales)


def test_stacked_rows_must_read_one_input() -> None:
    """v_proj and o_proj sit side by side in the module order but read different inputs: rows
    stacked across them are refused rather than calibrated on the wrong activations."""
    model = tiny("llama3")
    finder = WeightFinder(model)
    v, o = "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"
    stacked = Source((Part(v, (0, 32)), Part(o, (0, 64))))
    with pytest.raises(ValueError, match="read different inputs"):
        hessians(model, [stacked], [[1, 2, 3, 4]], finder.modules)
    [hessian] = hessians(model, [Source((Part(v, (0, 32)),))], [[1, 2, 3, 4]],
                         finder.modules).values()
    assert hessian.shape == (64, 64) and torch.allclose(hessian, hessian.T)
