"""INT4 weights rounded by GPTQ on calibration tokens (`quantization: GPTQ`).

The builder's RTN export has the CPU's fastest layout for one-row decode steps: 4-bit
MatMulNBits in blocks of 32 with int8 activations (bench/kernels.py: an 8-bit output head takes
1.4x as long), but its rounding costs the quickstart model 17 points of exact match. This keeps
RTN's graph, bytes, kernel and speed and re-rounds every MatMulNBits' weights from the FP32
model by GPTQ (Frantar et al., 2022): the columns of each weight are rounded in order and each
rounding error is spread over the columns not yet rounded, weighted by how the calibration
activations correlate them, so each layer's output on those activations moves as little as it
can. Calibration is the first training records
(`kubetune_trainer.heldout.Calibration`), never the held-out ones `precision: Auto` scores on.

Each node's FP32 weight is found by name in the merged transformers model and checked against
the RTN export's own (dequantized RTN lies within one scale step of it), so a builder layout
this does not know fails loudly instead of serving a scrambled model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 32


def torch_weights(model: Any) -> dict[str, np.ndarray]:
    """Each MatMulNBits node name of the builder's Llama-family graph -> its FP32 weight
    (out_features, in_features), from a loaded transformers model."""
    weights: dict[str, np.ndarray] = {}

    def array(linear: Any) -> np.ndarray:
        return linear.weight.detach().float().numpy()

    for index, layer in enumerate(model.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        prefix = f"/model/layers.{index}"
        weights[f"{prefix}/attn/qkv_proj/MatMul"] = np.concatenate(
            [array(attention.q_proj), array(attention.k_proj), array(attention.v_proj)])
        weights[f"{prefix}/attn/o_proj/MatMul"] = array(attention.o_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            weights[f"{prefix}/mlp/{name}/MatMul"] = array(getattr(mlp, name))
    weights["/lm_head/MatMul"] = array(model.lm_head)
    return weights


def hessians(model: Any, sequences: Iterable[list[int]]) -> dict[str, Any]:
    """Per MatMul, the mean outer product X^T X / n (a torch tensor, K x K) of the activations
    that reach it over `sequences`: GPTQ's proxy for how each input direction matters."""
    import torch

    inputs: dict[str, Any] = {}
    for index, layer in enumerate(model.model.layers):
        prefix = f"/model/layers.{index}"
        inputs[f"{prefix}/attn/qkv_proj/MatMul"] = layer.self_attn.q_proj
        inputs[f"{prefix}/attn/o_proj/MatMul"] = layer.self_attn.o_proj
        inputs[f"{prefix}/mlp/gate_proj/MatMul"] = layer.mlp.gate_proj
        inputs[f"{prefix}/mlp/down_proj/MatMul"] = layer.mlp.down_proj
    inputs["/lm_head/MatMul"] = model.lm_head
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, module in inputs.items():
        def hook(_: Any, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    result = {name: sums[name] / counts[name] for name in sums}
    for index in range(len(model.model.layers)):  # up_proj reads what gate_proj reads
        prefix = f"/model/layers.{index}/mlp"
        result[f"{prefix}/up_proj/MatMul"] = result[f"{prefix}/gate_proj/MatMul"]
    return result


DAMPING = 0.01
"""Added to the Hessian's diagonal, times its mean: GPTQ's usual regularisation."""
COLUMNS_PER_PASS = 128


def gptq(weight: np.ndarray, hessian: Any) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit blocks of (N, K) `weight` by GPTQ (Frantar et al., 2022): columns are
    rounded in order and each one's rounding error is spread over the columns not yet rounded,
    in proportion to how the calibration activations correlate them, so the layer's output
    on those activations moves as little as it can. Each block's scale is RTN's, taken from
    the block's weights as updated when the block is reached. Returns (B, scales)."""
    import torch

    work = torch.tensor(weight, dtype=torch.float32)
    rows, columns = work.shape
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    h += torch.eye(columns, dtype=torch.float64) * DAMPING * torch.mean(torch.diag(h))
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                  upper=True).float()
    values = torch.zeros((rows, columns), dtype=torch.float32)
    scales = torch.zeros((rows, columns // BLOCK), dtype=torch.float32)
    for first in range(0, columns, COLUMNS_PER_PASS):
        last = min(first + COLUMNS_PER_PASS, columns)
        part = work[:, first:last].clone()
        errors = torch.zeros_like(part)
        inverse = upper[first:last, first:last]
        for offset in range(last - first):
            column = first + offset
            if column % BLOCK == 0:
                block = part[:, offset : offset + BLOCK]
                pivot = block.gather(1, block.abs().argmax(dim=1, keepdim=True))[:, 0]
                scale = pivot / -8.0
                scales[:, column // BLOCK] = scale
            scale = scales[:, column // BLOCK]
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            rounded = torch.clamp(torch.round(part[:, offset] / safe), -8, 7)
            values[:, column] = rounded
            error = (part[:, offset] - rounded * scale) / inverse[offset, offset]
            part[:, offset:] -= error[:, None] * inverse[offset, offset:][None, :]
            errors[:, offset] = error
        work[:, last:] -= errors @ upper[first:last, last:]
    stored = (values + 8).to(torch.uint8).numpy().reshape(rows, columns // BLOCK, BLOCK)
    packed = stored[..., 0::2] | (stored[..., 1::2] << 4)
    return packed, scales.float().numpy()


def dequantize(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(N, K) weights of a symmetric 4-bit MatMulNBits: B (N, K/32, 16), scales (N, K/32)."""
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    values = np.stack([low, high], axis=-1).reshape(packed.shape[0], packed.shape[1], BLOCK)
    return (values * scales[..., None]).reshape(packed.shape[0], -1)


def output_error(delta: np.ndarray, hessian: Any) -> float:
    """How far a weight error moves the layer's outputs on the calibration activations:
    trace(delta H delta^T)."""
    h = hessian.float().numpy()
    return float(((delta @ h) * delta).sum())


def requantize(onnx_dir: Path, model: Any, sequences: list[list[int]]) -> float:
    """Re-round every 4-bit MatMulNBits of the RTN export in `onnx_dir` in place, by GPTQ on
    `sequences`; returns the layers' summed output error on them relative to RTN's (below 1:
    closer to FP32 than RTN)."""
    if not sequences:
        raise ValueError("GPTQ needs calibration tokens")
    import onnx
    from onnx import numpy_helper

    path = onnx_dir / "model.onnx"
    graph_model = onnx.load(str(path), load_external_data=True)
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    floats = torch_weights(model)
    correlations = hessians(model, sequences)
    rtn_error = gptq_error = 0.0
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (attributes.get("bits"), attributes.get("block_size"), len(node.input)) != (4, BLOCK, 3):
            raise ValueError(f"{node.name}: not a symmetric 4-bit block-32 MatMulNBits")
        name = node.name.removesuffix("_Q4")  # the builder's name for the quantized MatMul
        weight = floats.get(name)
        if weight is None:
            raise ValueError(f"{node.name}: no weight of that name in the transformers model")
        packed_init, scale_init = initializers[node.input[1]], initializers[node.input[2]]
        packed = numpy_helper.to_array(packed_init)
        scales = numpy_helper.to_array(scale_init).reshape(packed.shape[0], -1)
        rtn = dequantize(packed, scales)
        if rtn.shape != weight.shape or np.any(
            np.abs(rtn - weight) > np.abs(scales).repeat(BLOCK, axis=1) + 1e-6
        ):
            raise ValueError(f"{node.name}: the builder's weights are not this weight rounded")
        hessian = correlations[name]
        new_packed, new_scales = gptq(weight, hessian)
        rtn_error += output_error(rtn - weight, hessian)
        gptq_error += output_error(dequantize(new_packed, new_scales) - weight, hessian)
        packed_init.CopyFrom(numpy_helper.from_array(new_packed.reshape(packed.shape),
                                                     packed_init.name))
        scale_init.CopyFrom(numpy_helper.from_array(
            new_scales.reshape(numpy_helper.to_array(scale_init).shape), scale_init.name))
    data = path.with_name("model.onnx.data")
    # onnx appends external tensors to an existing file: the old bytes go first (all loaded).
    data.unlink(missing_ok=True)
    onnx.save_model(graph_model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    return gptq_error / max(rtn_error, 1e-30)
