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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kubetune_trainer.genai_model import DecoderLayout
from kubetune_trainer.serve.adapters import read_adapter
from kubetune_trainer.serve.engines.batch.lora import add_branches

POSITIONS = "logits_positions"
"""The graph input that picks each row's position for its logits: (rows, 1, hidden), every
element of row r the index (within the run's tokens) of the position whose logits it wants."""


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


def serving_session(
    layout: DecoderLayout, config: dict[str, Any], adapters: dict[str, Path] | None
) -> tuple[Any, list[np.ndarray]]:
    """An ONNX Runtime session of the served graph (`config`: genai_config.json's decoder),
    with branches for the LoRA adapters (by name: their PEFT directories), and each adapter's
    mask row, the base's first (none without adapters). The base's external weights are read
    from where they are."""
    import onnx
    import onnxruntime as ort

    hidden = int(config["hidden_size"])
    model = onnx.load(str(layout.model_file), load_external_data=False)
    gather_positions(model, hidden)
    masks: list[np.ndarray] = []
    if adapters:
        # Read here, so their weights are gone before the session allocates (see below).
        loaded = [read_adapter(name, path, hidden) for name, path in adapters.items()]
        masks = add_branches(model, loaded, config)
        del loaded
    # Serialized and dropped before the session exists: memory freed after ONNX Runtime has
    # allocated stays with the process (measured: ~100 MB more at 4 adapters otherwise).
    graph = model.SerializeToString()
    del model
    options = ort.SessionOptions()
    # The graph comes as bytes; its external weights stay in the model's directory.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(layout.model_file.parent)
    )
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"]), masks


def positions(rows: int, hidden: int, chosen: list[int]) -> np.ndarray:
    """The `POSITIONS` input for rows whose logits are wanted at `chosen` (one per row)."""
    index = np.zeros((rows, 1, hidden), np.int64)
    index[: len(chosen)] = np.asarray(chosen, np.int64)[:, None, None]
    return index
