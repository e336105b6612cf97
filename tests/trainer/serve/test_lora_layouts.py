"""LoRA branches follow the exported graph's layout, whatever the adapter's own: a packed
`qkv_proj` / `gate_up_proj` LoRA (Phi-3's) or separate q/k/v and gate/up LoRAs (Llama's), on
the builder's packed MatMuls or on separate ones, and an `o_proj` that reads more features than
the hidden size (Qwen3, Gemma: heads x head size). Each row must get exactly
`scale * (x @ A.T) @ B.T` of its own adapter, sliced by projection, on a small graph named as
the builder names its nodes, checked against numpy; in each branch design (standard nodes, the
LoraBranch kernel with FP32 or FP16 A and B)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetune_trainer.serve.adapters import AdapterError, LoraAdapter, read_adapter
from kubetune_trainer.serve.engines.batch.kernels import lora_branch as kernels
from kubetune_trainer.serve.engines.batch.lora import (
    NODES,
    BranchDesign,
    BranchFeeds,
    adapter_weights,
    add_branches,
)

HIDDEN, HEADS, KV_HEADS, HEAD_SIZE, INTERMEDIATE = 8, 4, 2, 4, 12
Q, KV = HEADS * HEAD_SIZE, KV_HEADS * HEAD_SIZE  # 16 attention features: not the hidden size
CONFIG = {
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_size": HEAD_SIZE,
    "num_hidden_layers": 1,
}
WIDTHS = {
    "q_proj": (HIDDEN, Q),
    "k_proj": (HIDDEN, KV),
    "v_proj": (HIDDEN, KV),
    "o_proj": (Q, HIDDEN),
    "gate_proj": (HIDDEN, INTERMEDIATE),
    "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}
INPUTS = {"attn": "x", "o_proj": "heads", "mlp": "x", "down_proj": "inner"}
OUTPUTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "/model/layers.0"


def base_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(shape).astype(np.float32) for p, shape in WIDTHS.items()}


def graph(packed: bool, weights: dict[str, np.ndarray]) -> Any:
    """One decoder layer's linear layers as the builder names them: packed (one qkv_proj
    MatMul; one gate_up_proj MatMul whose Split writes the gate_proj/up_proj tensors, the
    builder's fused MLP) or one MatMul per projection. Outputs: each projection's result."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers = [], []

    def matmul(name: str, source: str, weight: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(weight, f"{name}.weight"))
        output = f"{PREFIX}/{name}/MatMul/output_0"
        nodes.append(helper.make_node("MatMul", [source, f"{name}.weight"], [output],
                                      name=f"{PREFIX}/{name}/MatMul"))
        return output

    def split(name: str, source: str, outputs: list[str], sizes: list[int]) -> None:
        initializers.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{name}.sizes"))
        nodes.append(helper.make_node("Split", [source, f"{name}.sizes"], outputs, axis=-1,
                                      name=f"{PREFIX}/{name}/Split"))

    named = {p: f"{PREFIX}/{'attn' if p in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}"
             f"/{p}/MatMul/output_0" for p in OUTPUTS}
    results = {p: f"result/{p}" for p in OUTPUTS}
    if packed:
        qkv = np.concatenate([weights[p] for p in ("q_proj", "k_proj", "v_proj")], axis=1)
        split("attn/qkv_proj", matmul("attn/qkv_proj", "x", qkv),
              [results[p] for p in ("q_proj", "k_proj", "v_proj")], [Q, KV, KV])
        gate_up = np.concatenate([weights["gate_proj"], weights["up_proj"]], axis=1)
        split("mlp/gate_up_proj", matmul("mlp/gate_up_proj", "x", gate_up),
              [named["gate_proj"], named["up_proj"]], [INTERMEDIATE, INTERMEDIATE])
        for p in ("gate_proj", "up_proj"):  # the Split writes the tensors MatMuls would
            nodes.append(helper.make_node("Identity", [named[p]], [results[p]]))
    else:
        for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            group = "attn" if p in ("q_proj", "k_proj", "v_proj") else "mlp"
            nodes.append(helper.make_node(
                "Identity", [matmul(f"{group}/{p}", "x", weights[p])], [results[p]]))
    nodes.append(helper.make_node(
        "Identity", [matmul("attn/o_proj", "heads", weights["o_proj"])], [results["o_proj"]]))
    nodes.append(helper.make_node(
        "Identity", [matmul("mlp/down_proj", "inner", weights["down_proj"])],
        [results["down_proj"]]))

    def tensor(name: str, width: int | str) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows", 1, width])

    inputs = [tensor("x", HIDDEN), tensor("heads", Q), tensor("inner", INTERMEDIATE),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                            ["rows", KV_HEADS, "past", HEAD_SIZE])]
    outputs = [tensor(results[p], WIDTHS[p][1]) for p in OUTPUTS]
    built = helper.make_graph(nodes, "layer", inputs, outputs, initializers)
    return helper.make_model(built, opset_imports=[helper.make_opsetid("", 17)])


def write_adapter(directory: Path, modules: dict[str, tuple[int, int]], rank: int, seed: int,
                  alpha: int) -> Path:
    """A PEFT adapter on `modules` (name: (in, out) features), as save_pretrained writes it."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (features, out) in modules.items():
        group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "qkv_proj",
                                          "o_proj") else "mlp"
        key = f"base_model.model.model.layers.0.{group}.{module}"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((rank, features)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((out, rank)).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha}))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


PACKED_ADAPTER = {"qkv_proj": (HIDDEN, Q + 2 * KV), "o_proj": (Q, HIDDEN),
                  "gate_up_proj": (HIDDEN, 2 * INTERMEDIATE), "down_proj": (INTERMEDIATE, HIDDEN)}
SEPARATE_ADAPTER = {p: WIDTHS[p] for p in OUTPUTS}
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def expected_delta(adapter: LoraAdapter, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the adapter adds to each projection's output, from its PEFT weights alone."""
    delta = {}
    for (_, module), update in adapter.layers.items():
        source = inputs[INPUTS.get(module, "x")]
        full = update.scale * (source @ update.a.T) @ update.b.T
        start = 0
        for projection in PARTS.get(module, (module,)):
            width = WIDTHS[projection][1]
            delta[projection] = full[..., start : start + width]
            start += width
    return delta


DESIGNS = {
    "nodes": NODES,
    "kernel FP32": BranchDesign(fused=True),
    "kernel INT8": BranchDesign(fused=True, int8=True),
}


@pytest.mark.parametrize("design", DESIGNS.values(), ids=DESIGNS.keys())
@pytest.mark.parametrize("graph_packed", [True, False], ids=["packed graph", "separate graph"])
def test_each_row_gets_its_own_adapters_update_in_any_layout(
    tmp_path: Path, graph_packed: bool, design: BranchDesign
) -> None:
    import onnxruntime as ort

    weights = base_weights()
    model = graph(graph_packed, weights)
    adapters = [
        read_adapter("packed", write_adapter(tmp_path / "p", PACKED_ADAPTER, 3, 1, 6), HIDDEN),
        read_adapter("separate", write_adapter(tmp_path / "s", SEPARATE_ADAPTER, 2, 2, 8),
                     HIDDEN),
    ]
    layout = add_branches(model, CONFIG, design)
    fed = [adapter_weights(adapter, layout) for adapter in adapters]
    options = ort.SessionOptions()
    if design.fused:
        library = kernels.library()
        assert library is not None, "the LoraBranch kernel did not build here"
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    # INT8 A and B hold the adapter's weights to 1/254 of each rank column's largest value:
    # bounded by the size of the row's values, not each element's (sums of terms cancel).
    relative = 2e-2 if design.int8 else 0.0
    rng = np.random.default_rng(3)
    inputs = {name: rng.standard_normal((3, 1, width)).astype(np.float32)
              for name, width in (("x", HIDDEN), ("heads", Q), ("inner", INTERMEDIATE))}
    # Rows: the base, the packed adapter, the separate one, all in one run.
    feeds = {**inputs, **BranchFeeds(layout).feeds([None, *fed]),
             "past_key_values.0.key": np.zeros((3, KV_HEADS, 0, HEAD_SIZE), np.float32)}
    outputs = dict(zip(OUTPUTS, session.run([f"result/{p}" for p in OUTPUTS], feeds),
                       strict=True))
    for projection in OUTPUTS:
        source = inputs[INPUTS.get(projection, "x")]
        base = source @ weights[projection]
        np.testing.assert_allclose(outputs[projection][0], base[0], rtol=1e-5, atol=1e-5)
        for row, adapter in enumerate(adapters, start=1):
            want = base[row] + expected_delta(adapter, inputs)[projection][row]
            tolerance = max(1e-4, relative * float(np.abs(want).max()))
            np.testing.assert_allclose(outputs[projection][row], want, rtol=1e-4,
                                       atol=tolerance, err_msg=f"{adapter.name} {projection}")


def test_an_o_proj_wider_than_the_hidden_size_is_read_and_a_wrong_width_refused(
    tmp_path: Path,
) -> None:
    wide = write_adapter(tmp_path / "wide", {"o_proj": (Q, HIDDEN)}, 2, 0, 4)
    assert read_adapter("wide", wide, HIDDEN).layers[(0, "o_proj")].a.shape == (2, Q)
    wrong = read_adapter("wrong", write_adapter(tmp_path / "wrong", {"o_proj": (HIDDEN, HIDDEN)},
                                                2, 0, 4), HIDDEN)
    with pytest.raises(AdapterError, match=r"'wrong': layers.0.o_proj takes 8 features, the "
                       r"base model's 16"):
        adapter_weights(wrong, add_branches(graph(True, base_weights()), CONFIG))
    rows = read_adapter("rows", write_adapter(tmp_path / "rows", {"qkv_proj": (HIDDEN, Q)},
                                              2, 0, 4), HIDDEN)
    with pytest.raises(AdapterError, match=r"'rows': layers.0.qkv_proj writes 16 features, the "
                       r"base model's 32"):
        adapter_weights(rows, add_branches(graph(False, base_weights()), CONFIG))


def test_a_projection_changed_twice_is_refused(tmp_path: Path) -> None:
    both = write_adapter(tmp_path / "both", {"qkv_proj": (HIDDEN, Q + 2 * KV),
                                             "k_proj": (HIDDEN, KV)}, 2, 0, 4)
    with pytest.raises(AdapterError, match=r"0: k_proj and qkv_proj both change its k_proj"):
        read_adapter("both", both, HIDDEN)
