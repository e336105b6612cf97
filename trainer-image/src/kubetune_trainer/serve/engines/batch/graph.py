"""The decoder graph as the batching engine serves it: the builder's export with each row's
logits computed at one position only, and with LoRA adapters' branches when there are some
(`lora`).

The builder's graph computes logits at every position it is given. A decode step gives one,
but a prefill gives the whole prompt, and the output head (vocabulary x hidden, a fifth of a
small model's weights) then runs once per prompt token for logits nobody reads: only the
last token's are sampled from. Gathering each row's last position before the head makes a
prompt's head cost one position's (measured on the quickstart's INT4 export: a 200-token
prefill 148 -> 124 ms, a 12-token one 12.4 -> 11.4 ms) and its logits one row's memory.
The exporter's own checks run the builder's graph as it is (`genai_model.DecoderLayout`).

A model with two rotary caches (LongRoPE: Phi-3 128k, Phi-3.5) gets its choice between them
made per position instead of per run (`rope_switch`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kubetune_trainer.genai_model import (
    DecoderLayout,
    Device,
    check_session_providers,
    execution_providers,
)
from kubetune_trainer.serve.engines.batch.kernels import lora_branch
from kubetune_trainer.serve.engines.batch.lora import (
    NODES,
    BranchDesign,
    BranchLayout,
    activation_type,
    add_branches,
)

POSITIONS = "logits_positions"
"""The graph input that picks each row's position for its logits: (rows, 1, hidden), every
element of row r the index (within the run's tokens) of the position whose logits it wants."""


ROPE_LONG = "rope_long_factors"
"""With two rotary caches (`rope_switch`): the boolean graph input that gives every position of
a run the long factors (a prompt longer than the original context)."""


ELEMENTWISE = frozenset({"Mul", "Div", "Tanh", "Add", "Sub", "Cast"})
"""Ops the builder may put between the output head and `logits` that work on each position's
logits alone (Gemma 2's soft-capping: Div, Tanh, Mul by constants; a head's bias: Add), so
gathering before them is gathering after them."""


def output_head(graph: Any) -> Any:
    """The output head: the MatMul (or quantized MatMulNBits) that `logits` is computed from,
    through per-position element-wise ops only."""
    producers = {output: node for node in graph.node for output in node.output}
    constants = {w.name for w in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    node = producers.get("logits")
    seen = []
    while node is not None and node.op_type not in ("MatMul", "MatMulNBits"):
        seen.append(node.op_type)
        activations = [i for i in node.input if i and i not in constants]
        if node.op_type not in ELEMENTWISE or len(activations) != 1:
            break
        node = producers.get(activations[0])
    if node is None or node.op_type not in ("MatMul", "MatMulNBits"):
        raise ValueError(
            f"logits come from {' <- '.join(seen) or 'nothing'}, not from the builder's output "
            "head (a MatMul, then per-position element-wise ops only)"
        )
    return node


def gather_positions(model: Any, hidden: int) -> None:
    """Make `model` (an onnx ModelProto, changed in place) compute logits at one position per
    row, chosen by the `POSITIONS` input."""
    from onnx import TensorProto, helper

    graph = model.graph
    head = output_head(graph)
    graph.input.append(
        helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, ["batch_size", 1, hidden])
    )
    gathered = "/model/logits_positions/output_0"
    gather = helper.make_node(
        "GatherElements", [head.input[0], POSITIONS], [gathered], axis=1
    )
    head.input[0] = gathered
    nodes = list(graph.node)
    nodes.insert(nodes.index(head), gather)
    del graph.node[:]
    graph.node.extend(nodes)


def _branch_constants(branch: Any) -> list[tuple[Any, np.ndarray]] | None:
    """An If branch that only outputs constants: (its Constant node, the value) per output."""
    from onnx import numpy_helper

    producers = {o: n for n in branch.node for o in n.output}
    found = []
    for output in branch.output:
        node = producers.get(output.name)
        if node is None or node.op_type != "Constant" or node.attribute[0].name != "value":
            return None
        found.append((node, numpy_helper.to_array(node.attribute[0].t)))
    return found


def _scalar(graph: Any, name: str) -> int | None:
    from onnx import numpy_helper

    for tensor in graph.initializer:
        if tensor.name == name:
            return int(numpy_helper.to_array(tensor))
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            return int(numpy_helper.to_array(node.attribute[0].t))
    return None


def rope_switch(model: Any) -> int | None:
    """Make the rotary caches of a LongRoPE graph follow each sequence's own length; the
    original context length it switches at, or None for a graph with one rotary cache.

    The builder's graph picks one of two caches for a whole run: the long factors when the
    attention mask is wider than the original context (its `If`), as onnxruntime-genai and
    transformers decode one sequence: a token at position p < that length is rotated with the
    short factors, one at p >= it with the long ones, and a prompt longer than it with the long
    ones throughout. The batching engine's mask is as wide as its cache buffer for every row, so
    the choice followed the buffer's size (other requests' max_tokens), one for all rows.
    Rewritten: the If's condition is the `ROPE_LONG` input, and its short branch a cache whose
    positions below the switch hold the short factors and the rest the long ones; decode steps
    feed False (each position gets its sequence's own choice), a prompt longer than the switch
    True (`Decoder.prefill`)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    caches = {i for n in graph.node if n.op_type == "GroupQueryAttention" for i in n.input[7:9]}
    switch = next((n for n in graph.node if n.op_type == "If" and set(n.output) & caches), None)
    if switch is None:
        return None
    producers = {o: n for n in graph.node for o in n.output}
    condition = producers.get(switch.input[0])
    branches = {a.name: a.g for a in switch.attribute}
    threshold = (
        _scalar(graph, condition.input[1])
        if condition is not None and condition.op_type == "Greater"
        else None
    )
    long = _branch_constants(branches["then_branch"])
    short = _branch_constants(branches["else_branch"])
    if (
        threshold is None
        or long is None
        or short is None
        or len(long) != len(short)
        or any(
            s.shape[0] < threshold or s.shape[1:] != lv.shape[1:] or lv.shape[0] < threshold
            for (_, lv), (_, s) in zip(long, short, strict=True)
        )
    ):
        raise ValueError(
            f"the rotary caches come from an If ({switch.name}) this server does not know: "
            "not the builder's two caches chosen by the attention mask's width"
        )
    for (_, long_cache), (node, short_cache) in zip(long, short, strict=True):
        merged = np.concatenate([short_cache[:threshold], long_cache[threshold:]])
        node.attribute[0].t.CopyFrom(numpy_helper.from_array(merged, node.attribute[0].t.name))
    graph.input.append(helper.make_tensor_value_info(ROPE_LONG, TensorProto.BOOL, []))
    switch.input[0] = ROPE_LONG
    assert condition is not None
    if not any(condition.output[0] in n.input for n in graph.node):
        graph.node.remove(condition)
        used = {i for n in graph.node for i in n.input}
        for tensor in [t for t in graph.initializer if t.name in condition.input]:
            if tensor.name not in used:
                graph.initializer.remove(tensor)
    return threshold


def branch_design(device: Device, model: Any, library: Path | None) -> BranchDesign:
    """The branches' design for this graph (`lora.BranchDesign`): the one-node kernel where it
    runs (a CPU export with FP32 activations, its only type, and its `library` built), else
    four standard nodes; INT8 A and B on a quantized base, whose own rounding (INT4, INT8) is
    far coarser than INT8's per-rank-column scales on the adapter's small update, FP32 on an
    FP32 base, whose answers the adapter's merged FP32 export matches."""
    from onnx import TensorProto

    if (
        library is None
        or device is not Device.CPU
        or activation_type(model) != TensorProto.FLOAT
    ):
        return NODES
    quantized = any(node.op_type == "MatMulNBits" for node in model.graph.node)
    return BranchDesign(fused=True, int8=quantized)


def serving_session(
    layout: DecoderLayout,
    config: dict[str, Any],
    lora: bool,
    design: BranchDesign | None = None,
) -> tuple[Any, BranchLayout | None, int | None]:
    """An ONNX Runtime session of the served graph (`config`: genai_config.json's decoder),
    with `lora` a fed LoRA branch on every decoder MatMul and their layout (`lora`; None
    without), computed as `design` says (None: `branch_design`'s choice), and where the
    rotary caches switch to the long factors (`rope_switch`; None: one cache). The base's
    external weights are read from where they are. It runs on the execution providers of the
    device the export was built for (`genai_model.execution_providers`): CUDA for a CUDA
    export, refused where onnxruntime cannot run it there."""
    import onnx
    import onnxruntime as ort

    # Checked first: loading and rewriting a large graph only to refuse it would waste minutes.
    providers = execution_providers(layout.device, ort.get_available_providers())
    hidden = int(config["hidden_size"])
    model = onnx.load(str(layout.model_file), load_external_data=False)
    gather_positions(model, hidden)
    switch = rope_switch(model)
    branches = None
    if lora:
        if design is None:
            design = branch_design(layout.device, model, lora_branch.library())
        branches = add_branches(model, config, design)
    # Serialized and dropped before the session exists: memory freed after ONNX Runtime has
    # allocated stays with the process.
    graph = model.SerializeToString()
    del model
    options = ort.SessionOptions()
    # The graph comes as bytes; its external weights stay in the model's directory.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(layout.model_file.parent)
    )
    if branches is not None and branches.design.fused:
        library = lora_branch.library()
        if library is None:
            raise RuntimeError("the fused LoRA branch's library could not be built (logged)")
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(graph, options, providers=providers)
    check_session_providers(session, providers)
    return session, branches, switch


def positions(rows: int, hidden: int, chosen: list[int]) -> np.ndarray:
    """The `POSITIONS` input for rows whose logits are wanted at `chosen` (one per row)."""
    index = np.zeros((rows, 1, hidden), np.int64)
    index[: len(chosen)] = np.asarray(chosen, np.int64)[:, None, None]
    return index
