"""GPTQ's INT4 rounding: far closer to FP32's outputs than RTN's, and laid out as ONNX Runtime's
MatMulNBits reads it (checked by running the kernel, not by reading our own packing back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kubetune_trainer.export.requantize import BLOCK, dequantize, gptq, output_error


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
