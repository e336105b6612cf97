"""Several LoRA adapters in one decoder graph, each row of a batch choosing its own.

Each linear layer some adapter changes gets one low-rank branch for all adapters at once,
added to the base layer's output:

    y = x @ W  +  ((x @ A) * mask[row]) @ B

A is every adapter's lora_A side by side (in features x R, R the sum of the adapters' ranks)
and B their lora_B stacked (R x out features, PEFT's scaling folded in). `mask` is a graph
input, (rows, 1, R): for a row serving adapter i it is 1 on adapter i's R columns and 0
elsewhere, so the row gets exactly its own adapter's update and a base row gets none (its
logits are the base graph's, bit for bit). The builder packs q, k and v into one `qkv_proj`
MatMul, whose output is q, k and v side by side; its branch has a block of R columns per
projection (the mask repeated three times), and each block's B writes only its projection's
output columns.

This is what S-LoRA and Punica do on GPUs: requests for different adapters share a decode
step, so the weights of the base are read once per step for all of them. ONNX Runtime's own
adapter mechanism (`LoraAdapter` with `RunOptions.add_active_adapter`) sets one adapter per
run, which would split a mixed batch into one run per adapter.

The base's weights stay where they are (external data, or quantized MatMulNBits); only the
branches' small A and B are added to the graph, as weights, so ONNX Runtime prepacks them and
a row's result does not depend on what shares its batch. The price: every step reads every
loaded adapter's A and B (~0.6 ms a step per rank-16 adapter on the 2-core test machine,
bench/RESULTS.md), so a server should load the adapters it serves, not a library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kubetune_trainer.serve.adapters import AdapterError, LoraAdapter

MASK = "lora_mask"
"""The graph input that selects each row's adapter: (rows, 1, total rank)."""

_PACKED = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Target:
    """A base MatMul an adapter may change: its output tensor and the projections it holds,
    each as (projection, first output column, output columns)."""

    output: str
    parts: tuple[tuple[str, int, int], ...]


def targets(graph: Any, layers: int, config: dict[str, Any]) -> dict[int, list[Target]]:
    """Per layer, the builder's MatMuls for the projections PEFT names (by output tensor)."""
    outputs = {o for node in graph.node for o in node.output}
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    size, hidden = int(config["head_size"]), int(config["hidden_size"])
    q, kv = heads * size, kv_heads * size
    found: dict[int, list[Target]] = {}
    for layer in range(layers):
        prefix = f"/model/layers.{layer}"
        packed = f"{prefix}/attn/qkv_proj/MatMul/output_0"
        attention = (
            [Target(packed, (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)))]
            if packed in outputs
            else [
                Target(f"{prefix}/attn/{p}/MatMul/output_0", ((p, 0, width),))
                for p, width in zip(_PACKED, (q, kv, kv), strict=True)
            ]
        )
        mlp = [
            Target(f"{prefix}/mlp/{p}/MatMul/output_0", ((p, 0, -1),))
            for p in ("gate_proj", "up_proj", "down_proj")
        ]
        found[layer] = [
            *attention,
            Target(f"{prefix}/attn/o_proj/MatMul/output_0", (("o_proj", 0, hidden),)),
            *mlp,
        ]
    return found


def _branch_weights(
    target: Target,
    layer: int,
    adapters: Sequence[LoraAdapter],
    offsets: list[int],
    total: int,
    dtype: type[np.generic],
) -> tuple[np.ndarray, np.ndarray] | None:
    """The branch's (A, B) for one base MatMul, or None when no adapter changes it."""
    updates = [
        (part, index, adapter.layers[(layer, part[0])])
        for part in target.parts
        for index, adapter in enumerate(adapters)
        if (layer, part[0]) in adapter.layers
    ]
    if not updates:
        return None
    features = updates[0][2].a.shape[1]
    width = (
        sum(columns for _, _, columns in target.parts)
        if all(columns > 0 for _, _, columns in target.parts)
        else updates[0][2].b.shape[0]  # an MLP projection: one part, as wide as its B
    )
    a = np.zeros((features, total * len(target.parts)), np.float32)
    b = np.zeros((total * len(target.parts), width), np.float32)
    for (projection, start, columns), index, update in updates:
        block = [p[0] for p in target.parts].index(projection) * total + offsets[index]
        rank = update.a.shape[0]
        out = update.b.shape[0]
        name = f"adapter {adapters[index].name!r}: layers.{layer}.{projection}"
        if update.a.shape[1] != features:
            raise AdapterError(f"{name} takes {update.a.shape[1]} features, not {features}")
        if columns > 0 and out != columns:
            raise AdapterError(f"{name} writes {out} features, the base model's {columns}")
        a[:, block : block + rank] = update.a.T
        b[block : block + rank, start : start + out] = update.scale * update.b.T
    return a.astype(dtype), b.astype(dtype)


def add_branches(
    model: Any, adapters: Sequence[LoraAdapter], config: dict[str, Any]
) -> list[np.ndarray]:
    """Add every adapter's branches to `model` (an onnx ModelProto, changed in place).

    Returns each adapter's mask row (R wide), base first (all zeros).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    past = next(i for i in graph.input if i.name.startswith("past_key_values"))
    dtype: type[np.generic] = helper.tensor_dtype_to_np_dtype(
        past.type.tensor_type.elem_type
    ).type
    offsets = list(np.cumsum([0] + [a.rank for a in adapters[:-1]]))
    total = sum(a.rank for a in adapters)
    layers = int(config["num_hidden_layers"])
    unknown = {layer for a in adapters for layer, _ in a.layers if not 0 <= layer < layers}
    if unknown:
        raise AdapterError(f"adapters change layers {sorted(unknown)}; the base has {layers}")
    graph.input.append(
        helper.make_tensor_value_info(
            MASK, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["batch_size", 1, total]
        )
    )
    repeated = f"{MASK}/x3"
    inputs = {o: n.input[0] for n in graph.node if n.input for o in n.output}  # activations
    new_nodes: dict[str, list[Any]] = {}  # base MatMul output -> the nodes that follow it
    for layer, layer_targets in targets(graph, layers, config).items():
        for target in layer_targets:
            weights = _branch_weights(target, layer, adapters, offsets, total, dtype)
            if weights is None:
                continue
            if target.output not in inputs:
                raise AdapterError(
                    f"the exported graph has no MatMul writing {target.output} for layer "
                    f"{layer}'s {', '.join(p for p, _, _ in target.parts)}: not the builder's "
                    "layout this server knows"
                )
            name = target.output.removesuffix("/output_0") + "/lora"
            a, b = weights
            graph.initializer.extend(
                [numpy_helper.from_array(a, f"{name}.A"), numpy_helper.from_array(b, f"{name}.B")]
            )
            mask = MASK if len(target.parts) == 1 else repeated
            new_nodes[target.output] = [
                helper.make_node("MatMul", [inputs[target.output], f"{name}.A"], [f"{name}/xA"]),
                helper.make_node("Mul", [f"{name}/xA", mask], [f"{name}/masked"]),
                helper.make_node("MatMul", [f"{name}/masked", f"{name}.B"], [f"{name}/delta"]),
                helper.make_node("Add", [target.output, f"{name}/delta"], [f"{name}/output_0"]),
            ]
    _splice(graph, new_nodes, repeated)
    rows = [np.zeros(total, dtype)]
    for index, adapter in enumerate(adapters):
        row = np.zeros(total, dtype)
        row[offsets[index] : offsets[index] + adapter.rank] = 1
        rows.append(row)
    return rows


def _splice(graph: Any, new_nodes: dict[str, list[Any]], repeated: str) -> None:
    """Insert each branch after its base MatMul and point the MatMul's consumers at the sum
    (the branch's own Add keeps reading the base MatMul's output)."""
    from onnx import helper

    nodes = list(graph.node)
    renamed = {out: branch[-1].output[0] for out, branch in new_nodes.items()}
    ordered: list[Any] = []
    if any(len(b) and b[1].input[1] == repeated for b in new_nodes.values()):
        ordered.append(helper.make_node("Concat", [MASK] * 3, [repeated], axis=2))
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        ordered.append(node)
        for output in node.output:
            branch = new_nodes.get(output)
            if branch is not None:
                ordered.extend(branch)
    del graph.node[:]
    graph.node.extend(ordered)
