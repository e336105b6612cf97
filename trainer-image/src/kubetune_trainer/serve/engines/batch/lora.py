"""Several LoRA adapters in one decoder graph, each row of a batch choosing its own.

Each linear layer some adapter changes gets one low-rank branch for all adapters at once,
added to the base layer's output:

    y = x @ W  +  ((x @ A) * mask[row]) @ B

A is every adapter's lora_A side by side (in features x R, R the sum of the adapters' ranks)
and B their lora_B stacked (R x out features, PEFT's scaling folded in). `mask` is a graph
input, (rows, 1, R): for a row serving adapter i it is 1 on adapter i's R columns and 0
elsewhere, so the row gets exactly its own adapter's update and a base row gets none (its
logits are the base graph's, bit for bit).

The layout comes from the graph, not from the model's family: each of the builder's MatMuls
(`/model/layers.N/attn|mlp/NAME/MatMul`) computes the projections its NAME says
(`adapters.parts`: `qkv_proj` is q, k and v side by side, `gate_up_proj` gate then up), as wide
as its weight says. An adapter's layer may be packed the same way or not, independently of the
graph: a LoRA on Phi-3's packed `qkv_proj` has B rows for q, k and v, and feeds the builder's
packed MatMul as one branch block, or each of separate q/k/v MatMuls with its B's rows for that
projection; LoRAs on separate q, k and v feeding the builder's packed MatMul take one block of
R columns each (the mask repeated once per block), each block's B writing only its projection's
output columns. A projection that no MatMul computes, or widths that disagree with the graph's,
are refused by name.

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

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kubetune_trainer.serve.adapters import AdapterError, LoraAdapter, LowRank, parts

MASK = "lora_mask"
"""The graph input that selects each row's adapter: (rows, 1, total rank)."""

_MATMUL = re.compile(r"^/model/layers\.(\d+)/(?:attn|mlp)/(\w+)/MatMul[^/]*$")
"""The builder's node names for a decoder layer's linear layers (`MatMul`, `MatMul_Q4`, ...)."""


@dataclass(frozen=True)
class Target:
    """A base MatMul an adapter may change: its node, input width, and the projections it
    computes, each as (projection, first output column, output columns)."""

    node: Any  # the onnx NodeProto (MatMul or MatMulNBits)
    features: int
    parts: tuple[tuple[str, int, int], ...]

    @property
    def output(self) -> str:
        return str(self.node.output[0])


def _shape(node: Any, weights: dict[str, Any]) -> tuple[int, int] | None:
    """A MatMul's (in, out) features: MatMulNBits' K and N, a MatMul's weight's dims."""
    if node.op_type == "MatMulNBits":
        attributes = {a.name: a.i for a in node.attribute}
        return int(attributes["K"]), int(attributes["N"])
    weight = weights.get(node.input[1])
    if node.op_type == "MatMul" and weight is not None and len(weight.dims) == 2:
        return int(weight.dims[0]), int(weight.dims[1])
    return None


def targets(graph: Any, layers: int, config: dict[str, Any]) -> dict[int, list[Target]]:
    """Per layer, the builder's MatMuls and the projections each computes (from the graph)."""
    weights = {w.name: w for w in graph.initializer}
    kv = int(config["num_key_value_heads"]) * int(config["head_size"])
    found: dict[int, list[Target]] = {layer: [] for layer in range(layers)}
    for node in graph.node:
        match = _MATMUL.match(node.name)
        if match is None or int(match[1]) not in found:
            continue
        shape = _shape(node, weights)
        if shape is None:
            continue
        features, width = shape
        names = parts(match[2])
        widths: tuple[int, ...]
        if names == ("q_proj", "k_proj", "v_proj"):
            widths = (width - 2 * kv, kv, kv)
        else:
            widths = tuple(width // len(names) for _ in names)
        starts = np.cumsum((0, *widths[:-1]))
        found[int(match[1])].append(
            Target(node, features, tuple(zip(names, map(int, starts), widths, strict=True)))
        )
    return found


def _covering(adapter: LoraAdapter, layer: int, projection: str) -> str | None:
    """The adapter's linear layer (in `layer`) that computes `projection`, if it has one."""
    return next(
        (m for (at, m) in adapter.layers if at == layer and projection in parts(m)), None
    )


def _check_covered(adapters: Sequence[LoraAdapter], found: dict[int, list[Target]]) -> None:
    """Every projection an adapter changes must be computed by one of the graph's MatMuls."""
    for adapter in adapters:
        for layer, module in adapter.layers:
            computed = {p for t in found.get(layer, []) for p, _, _ in t.parts}
            for projection in parts(module):
                if projection not in computed:
                    raise AdapterError(
                        f"adapter {adapter.name!r}: the exported graph has no MatMul computing "
                        f"layer {layer}'s {projection} (the builder's /model/layers.{layer}/"
                        f"attn|mlp/<projection>/MatMul): not the builder's layout this server "
                        "knows"
                    )


def _branch_weights(
    target: Target,
    layer: int,
    widths: dict[str, int],
    adapters: Sequence[LoraAdapter],
    offsets: list[int],
    total: int,
    dtype: type[np.generic],
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The branch's (A, B, blocks) for one base MatMul, or None when no adapter changes it.

    The branch has one block of `total` columns per adapter linear layer that feeds it at once
    (a packed LoRA on a packed MatMul: one; separate q, k, v LoRAs on a packed MatMul: three);
    `widths` are the graph's widths of this layer's projections (for a packed LoRA's B rows).
    """
    columns = sum(width for _, _, width in target.parts)
    blocks = len(target.parts)
    a = np.zeros((target.features, total * blocks), np.float32)
    b = np.zeros((total * blocks, columns), np.float32)
    used: set[int] = set()
    for index, adapter in enumerate(adapters):
        for projection, start, width in target.parts:
            module = _covering(adapter, layer, projection)
            if module is None:
                continue
            update: LowRank = adapter.layers[(layer, module)]
            packed = parts(module)
            # The module's block sits at its first projection in this MatMul.
            block = next(i for i, (p, _, _) in enumerate(target.parts) if p in packed)
            name = f"adapter {adapter.name!r}: layers.{layer}.{module}"
            expected = sum(widths[p] for p in packed)
            if update.b.shape[0] != expected:
                raise AdapterError(
                    f"{name} writes {update.b.shape[0]} features, the base model's {expected}"
                )
            if update.a.shape[1] != target.features:
                raise AdapterError(
                    f"{name} takes {update.a.shape[1]} features, the base model's "
                    f"{target.features}"
                )
            rank = update.a.shape[0]
            first = block * total + offsets[index]
            row = sum(widths[p] for p in packed[: packed.index(projection)])
            a[:, first : first + rank] = update.a.T
            b[first : first + rank, start : start + width] = (
                update.scale * update.b[row : row + width].T
            )
            used.add(block)
    if not used:
        return None
    keep = np.concatenate([np.arange(k * total, (k + 1) * total) for k in sorted(used)])
    return a[:, keep].astype(dtype), b[keep].astype(dtype), len(used)


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
    found = targets(graph, layers, config)
    _check_covered(adapters, found)
    new_nodes: dict[str, list[Any]] = {}  # base MatMul output -> the nodes that follow it
    masks: dict[int, str] = {1: MASK}  # blocks -> the mask repeated that many times
    for layer, layer_targets in found.items():
        widths = {p: width for t in layer_targets for p, _, width in t.parts}
        for target in layer_targets:
            weights = _branch_weights(target, layer, widths, adapters, offsets, total, dtype)
            if weights is None:
                continue
            name = target.output.removesuffix("/output_0") + "/lora"
            a, b, blocks = weights
            graph.initializer.extend(
                [numpy_helper.from_array(a, f"{name}.A"), numpy_helper.from_array(b, f"{name}.B")]
            )
            mask = masks.setdefault(blocks, f"{MASK}/x{blocks}")
            new_nodes[target.output] = [
                helper.make_node("MatMul", [target.node.input[0], f"{name}.A"], [f"{name}/xA"]),
                helper.make_node("Mul", [f"{name}/xA", mask], [f"{name}/masked"]),
                helper.make_node("MatMul", [f"{name}/masked", f"{name}.B"], [f"{name}/delta"]),
                helper.make_node("Add", [target.output, f"{name}/delta"], [f"{name}/output_0"]),
            ]
    repeats = [
        helper.make_node("Concat", [MASK] * blocks, [mask], axis=2)
        for blocks, mask in masks.items()
        if blocks > 1
    ]
    _splice(graph, new_nodes, repeats)
    rows = [np.zeros(total, dtype)]
    for index, adapter in enumerate(adapters):
        row = np.zeros(total, dtype)
        row[offsets[index] : offsets[index] + adapter.rank] = 1
        rows.append(row)
    return rows


def _splice(graph: Any, new_nodes: dict[str, list[Any]], first: list[Any]) -> None:
    """Insert each branch after its base MatMul and point the MatMul's consumers at the sum
    (the branch's own Add keeps reading the base MatMul's output); `first` (the repeated
    masks) goes before every other node."""
    nodes = list(graph.node)
    renamed = {out: branch[-1].output[0] for out, branch in new_nodes.items()}
    ordered: list[Any] = list(first)
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
