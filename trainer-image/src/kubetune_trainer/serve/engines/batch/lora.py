"""Several LoRA adapters in one decoder graph, each row of a batch choosing its own, and
adapters that change while the server runs.

Every linear layer of the decoder (each builder MatMul `/model/layers.N/attn|mlp/NAME/MatMul`)
gets one low-rank branch, added to the base layer's output:

    y = x @ W  +  ((x @ A) * mask[row]) @ B

A, B and the mask are graph inputs, fed for the adapters the batch uses right now (vLLM's and
S-LoRA's active set), not weights: A is those adapters' lora_A side by side (in features x R, R
the sum of their ranks at this layer), B their lora_B stacked (R x out features, PEFT's scaling
folded in), and the mask (rows, 1, R) is 1 on a row's own adapter's columns and 0 elsewhere. So
loading, replacing or unloading an adapter changes what is fed, never the graph: no session
rebuild, and each adapter's weights are held once, in the process, at their own size
(`AdapterWeights`). A step reads only the adapters its rows use; an all-base batch feeds
zero-width A and B (R = 0), whose branches add exact zeros.

A branch's width is its own: each layer is fed the ranks of the adapter layers that change it,
so an adapter on q and v only costs nothing in the MLP. The layout comes from the graph, not the
model's family: each MatMul computes the projections its NAME says (`adapters.parts`: `qkv_proj`
is q, k and v side by side, `gate_up_proj` gate then up), as wide as its weight says. An
adapter's layer may be packed the same way or not: a LoRA on Phi-3's packed `qkv_proj` feeds
the builder's packed MatMul as one block of columns, LoRAs on separate q, k and v feeding a
packed MatMul one block each, each block's B writing only its projection's output columns. A
projection that no MatMul computes, or widths that disagree with the graph's, are refused by
name when the adapter is loaded (`adapter_weights`).

MatMuls that read the same input (separate gate and up) keep a branch each. One shared shrink
and mask needs each B laid on all the group's rows, zeros read every step (measured: no faster
for an adapter row, slower for several, bench/RESULTS.md), or a Split node (one node fewer than
two branches: not worth a layout of its own).

How a branch computes is its `BranchDesign`. Where the C kernel builds (`kernels`: a CPU export
with FP32 activations, a C compiler where the server first runs or in the image), each branch
is one `LoraBranch` node: a row multiplies only its own adapter's columns (Punica's BGMV), a
base row costs one look at its mask, and on a quantized base A and B are fed in INT8 (a
decode step through an adapter is bound by reading them; INT4's own rounding is far coarser),
each rank column symmetric with its own scale, A's per column and B's per row, the two
multiplied into the mask where it would hold 1 (`quantize`). Each
row is computed alone, in one order, so its answer does not depend on what shares its batch.
Elsewhere (CUDA, FP16 activations, no compiler) each branch is four standard nodes (MatMul,
Mul, MatMul, Add): the same update, four dispatches instead of one, and MLAS multiplies a single
row (a GEMV) in another order than several, so an adapter row's last bits depend on its batch
(base rows' do not: their branch adds zeros). bench/RESULTS.md has the designs' costs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubetune_trainer.serve.adapters import AdapterError, LoraAdapter, parts
from kubetune_trainer.serve.engines.batch.kernels import lora_branch

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

    @property
    def columns(self) -> int:
        return sum(width for _, _, width in self.parts)


@dataclass(frozen=True)
class Branch:
    """One base MatMul's low-rank branch: its layer, its target, and its three graph inputs."""

    layer: int
    target: Target
    prefix: str  # the branch's tensors are named `{prefix}.A`, `.B`, `.mask`

    @property
    def a(self) -> str:
        return f"{self.prefix}.A"

    @property
    def b(self) -> str:
        return f"{self.prefix}.B"

    @property
    def mask(self) -> str:
        return f"{self.prefix}.mask"


@dataclass(frozen=True)
class BranchDesign:
    """How the branches compute: one `lora_branch.OP` node each (`fused`; the session must
    register `lora_branch.library()`) or four standard nodes (MatMul, Mul, MatMul, Add), and
    whether the kernel is fed A and B in INT8 (`int8`: a quarter of the bytes a decode step
    reads, the scales in the mask)."""

    fused: bool = False
    int8: bool = False

    def __post_init__(self) -> None:
        if self.int8 and not self.fused:
            raise ValueError("INT8 adapter weights need the fused kernel (MatMul wants floats)")


NODES = BranchDesign()


@dataclass(frozen=True)
class BranchLayout:
    """Every branch of the served graph, the widths of each layer's projections, and the
    dtype its activations (and so the masks) have, and how the branches compute."""

    branches: tuple[Branch, ...]
    widths: dict[int, dict[str, int]]  # layer -> projection -> output columns
    layers: int
    dtype: type[np.generic]
    design: BranchDesign

    @property
    def weights(self) -> type[np.generic]:
        """A and B's dtype: INT8 where the design says, else the activations'."""
        return np.int8 if self.design.int8 else self.dtype


@dataclass(frozen=True, eq=False)
class AdapterWeights:
    """One loaded adapter as the branches are fed it: per branch (in `BranchLayout` order) its
    A (in features x width), B (width x out features, scaled) and what its rows' mask holds on
    its columns (`scales`: ones, or INT8's scales), or None where it changes nothing. Compared
    by identity: a replaced adapter is another object, and the sequences
    that started on the old one keep it until they end."""

    name: str
    path: Path
    a: tuple[np.ndarray | None, ...]
    b: tuple[np.ndarray | None, ...]
    scales: tuple[np.ndarray | None, ...]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (*self.a, *self.b, *self.scales) if x is not None)


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




def activation_type(model: Any) -> int:
    """The ONNX element type of the graph's activations (its past key/values')."""
    past = next(i for i in model.graph.input if i.name.startswith("past_key_values"))
    return int(past.type.tensor_type.elem_type)


def add_branches(model: Any, config: dict[str, Any], design: BranchDesign = NODES) -> BranchLayout:
    """Add a fed low-rank branch to every decoder MatMul of `model` (an onnx ModelProto,
    changed in place), computed as `design` says: any adapter may be loaded later, so every
    layer gets one."""
    from onnx import TensorProto, helper

    graph = model.graph
    elem_type = activation_type(model)
    dtype: type[np.generic] = helper.tensor_dtype_to_np_dtype(elem_type).type
    weight_type = TensorProto.INT8 if design.int8 else elem_type
    layers = int(config["num_hidden_layers"])
    found = targets(graph, layers, config)
    branches: list[Branch] = []
    new_nodes: dict[str, list[Any]] = {}  # base MatMul output -> the nodes that follow it
    for layer, layer_targets in found.items():
        for target in layer_targets:
            prefix = target.output.removesuffix("/output_0") + "/lora"
            branch = Branch(layer, target, prefix)
            branches.append(branch)
            rank = f"{prefix}.rank"  # its own symbolic width: each branch is fed its own
            graph.input.extend(
                [
                    helper.make_tensor_value_info(branch.a, weight_type, [target.features, rank]),
                    helper.make_tensor_value_info(branch.b, weight_type, [rank, target.columns]),
                    helper.make_tensor_value_info(branch.mask, elem_type, ["batch_size", 1, rank]),
                ]
            )
            new_nodes[target.output] = branch_nodes(branch, design.fused)
    _splice(graph, new_nodes)
    if design.fused and not any(o.domain == lora_branch.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(lora_branch.DOMAIN, 1))
    widths = {
        layer: {p: width for t in layer_targets for p, _, width in t.parts}
        for layer, layer_targets in found.items()
    }
    return BranchLayout(tuple(branches), widths, layers, dtype, design)


def branch_nodes(branch: Branch, fused: bool) -> list[Any]:
    """The nodes computing `y + ((x @ A) * mask) @ B` onto the branch's base MatMul output."""
    from onnx import helper

    x, y, prefix = branch.target.node.input[0], branch.target.output, branch.prefix
    if fused:
        inputs = [y, x, branch.a, branch.b, branch.mask]
        return [
            helper.make_node(
                lora_branch.OP, inputs, [f"{prefix}/output_0"], domain=lora_branch.DOMAIN
            )
        ]
    return [
        helper.make_node("MatMul", [x, branch.a], [f"{prefix}/xA"]),
        helper.make_node("Mul", [f"{prefix}/xA", branch.mask], [f"{prefix}/masked"]),
        helper.make_node("MatMul", [f"{prefix}/masked", branch.b], [f"{prefix}/delta"]),
        helper.make_node("Add", [y, f"{prefix}/delta"], [f"{prefix}/output_0"]),
    ]


def _splice(graph: Any, new_nodes: dict[str, list[Any]]) -> None:
    """Insert each branch after its base MatMul and point the MatMul's consumers at the sum
    (the branch's own Add keeps reading the base MatMul's output)."""
    nodes = list(graph.node)
    renamed = {out: branch[-1].output[0] for out, branch in new_nodes.items()}
    ordered: list[Any] = []
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


def _covering(adapter: LoraAdapter, layer: int, projection: str) -> str | None:
    """The adapter's linear layer (in `layer`) that computes `projection`, if it has one."""
    return next(
        (m for (at, m) in adapter.layers if at == layer and projection in parts(m)), None
    )


def _check_covered(adapter: LoraAdapter, layout: BranchLayout) -> None:
    """Every projection the adapter changes must be computed by one of the graph's MatMuls."""
    unknown = sorted({layer for layer, _ in adapter.layers if not 0 <= layer < layout.layers})
    if unknown:
        raise AdapterError(
            f"adapter {adapter.name!r} changes layers {unknown}; the base has {layout.layers}"
        )
    for layer, module in adapter.layers:
        computed = layout.widths.get(layer, {})
        for projection in parts(module):
            if projection not in computed:
                raise AdapterError(
                    f"adapter {adapter.name!r}: the exported graph has no MatMul computing "
                    f"layer {layer}'s {projection} (the builder's /model/layers.{layer}/"
                    f"attn|mlp/<projection>/MatMul): not the builder's layout this server "
                    "knows"
                )


def _branch_weights(
    branch: Branch, widths: dict[str, int], adapter: LoraAdapter
) -> tuple[np.ndarray, np.ndarray] | None:
    """The adapter's (A, B) for one branch in FP32, or None when it changes none of its
    projections.

    One block of columns per adapter layer that feeds the branch (a packed LoRA on a packed
    MatMul: one; separate q, k, v LoRAs on a packed MatMul: three), each as wide as that
    layer's rank; `widths` are the graph's widths of this layer's projections (for a packed
    LoRA's B rows).
    """
    target, layer = branch.target, branch.layer
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    modules: dict[str, int] = {}  # adapter layer -> its block
    for projection, start, width in target.parts:
        module = _covering(adapter, layer, projection)
        if module is None:
            continue
        update = adapter.layers[(layer, module)]
        packed = parts(module)
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
        if module not in modules:
            modules[module] = len(blocks)
            blocks.append((update.a.T, np.zeros((update.a.shape[0], target.columns), np.float32)))
        b = blocks[modules[module]][1]
        row = sum(widths[p] for p in packed[: packed.index(projection)])
        b[:, start : start + width] = update.scale * update.b[row : row + width].T
    if not blocks:
        return None
    # C order: IO binding hands ONNX Runtime the buffer as it is (lora_A.T concatenated alone
    # would stay in Fortran order, and be read transposed).
    a = np.ascontiguousarray(np.concatenate([a for a, _ in blocks], axis=1), np.float32)
    b = np.ascontiguousarray(np.concatenate([b for _, b in blocks], axis=0), np.float32)
    return a, b


def quantize(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A and B in INT8, and each rank column's factor: A's columns and B's rows symmetric, each
    on its own scale (max |value| / 127), so that (x @ A) * mask @ B is unchanged up to the
    rounding when the mask holds sA * sB. A column that is all zeros gets a factor of 0 (it
    adds nothing either way)."""
    a_scale = np.abs(a).max(axis=0) / 127
    b_scale = np.abs(b).max(axis=1) / 127
    a_int8 = np.round(a / np.where(a_scale > 0, a_scale, 1)).astype(np.int8)
    b_int8 = np.round(b / np.where(b_scale > 0, b_scale, 1)[:, None]).astype(np.int8)
    return a_int8, b_int8, (a_scale * b_scale).astype(np.float32)


def adapter_weights(adapter: LoraAdapter, layout: BranchLayout) -> AdapterWeights:
    """The adapter as the branches are fed it; refused by name where the graph disagrees."""
    _check_covered(adapter, layout)
    fed: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
    for branch in layout.branches:
        pair = _branch_weights(branch, layout.widths[branch.layer], adapter)
        if pair is None:
            fed.append(None)
        elif layout.design.int8:
            fed.append(quantize(*pair))
        else:
            a, b = (np.ascontiguousarray(x, layout.dtype) for x in pair)
            fed.append((a, b, np.ones(a.shape[1], np.float32)))
    return AdapterWeights(
        adapter.name,
        adapter.path,
        tuple(None if f is None else f[0] for f in fed),
        tuple(None if f is None else f[1] for f in fed),
        tuple(None if f is None else f[2] for f in fed),
    )


class BranchFeeds:
    """The branches' inputs for a batch's rows, each row on its adapter (None: the base).

    The active set's A and B (the distinct adapters the rows use) are kept until the set
    changes: a lone adapter's arrays are fed as they are, several are concatenated once per
    set; the masks follow the rows."""

    def __init__(self, layout: BranchLayout) -> None:
        self.layout = layout
        self.active: tuple[AdapterWeights, ...] | None = None
        self.weights: dict[str, np.ndarray] = {}
        self.empty = {
            name: np.zeros(shape, layout.weights)
            for branch in layout.branches
            for name, shape in (
                (branch.a, (branch.target.features, 0)),
                (branch.b, (0, branch.target.columns)),
            )
        }

    def forget(self) -> None:
        """Drop the active set's arrays, so that an unloaded or replaced adapter's weights
        are freed once no sequence holds them either."""
        self.active, self.weights = None, {}

    def _assemble(self, active: tuple[AdapterWeights, ...]) -> None:
        weights: dict[str, np.ndarray] = {}
        for index, branch in enumerate(self.layout.branches):
            a = [x.a[index] for x in active if x.a[index] is not None]
            b = [x.b[index] for x in active if x.b[index] is not None]
            if not a:
                weights[branch.a], weights[branch.b] = self.empty[branch.a], self.empty[branch.b]
            elif len(a) == 1:
                weights[branch.a], weights[branch.b] = a[0], b[0]  # type: ignore[assignment]
            else:
                weights[branch.a] = np.ascontiguousarray(np.concatenate(a, axis=1))  # type: ignore[arg-type]
                weights[branch.b] = np.ascontiguousarray(np.concatenate(b, axis=0))  # type: ignore[arg-type]
        self.active, self.weights = active, weights

    def feeds(self, rows: Sequence[AdapterWeights | None]) -> dict[str, np.ndarray]:
        """Every branch's A, B and mask for these rows (a row of None adds nothing)."""
        active = tuple(dict.fromkeys(x for x in rows if x is not None))  # first use's order
        if active != self.active:
            self._assemble(active)
        feeds = dict(self.weights)
        for index, branch in enumerate(self.layout.branches):
            scales = [x.scales[index] for x in active]
            widths = [0 if s is None else len(s) for s in scales]
            starts = dict(zip(active, np.cumsum((0, *widths))[:-1].tolist(), strict=True))
            mask = np.zeros((len(rows), 1, sum(widths)), self.layout.dtype)
            for row, adapter in enumerate(rows):
                own = None if adapter is None else adapter.scales[index]
                if own is not None:
                    start = starts[adapter]  # type: ignore[index]
                    mask[row, 0, start : start + len(own)] = own
            feeds[branch.mask] = mask
        return feeds
