"""The batching engine's logits at one position per row (`engines/batch/graph.py`) on output
heads the builder writes: a plain MatMul, or one soft-capped (Gemma 2: logits = cap *
tanh(head / cap)), where the gather goes before the head and the capping still applies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kubetune_trainer.serve.engines.batch.graph import POSITIONS, gather_positions, positions

HIDDEN, VOCAB, CAP = 4, 6, 3.0


def head_graph(softcap: bool, last: str = "Mul") -> Any:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32),
                                     "lm_head.MatMul.weight")
    cap = numpy_helper.from_array(np.array(CAP, np.float32), "/model/constants/FLOAT/3.0")
    head_out = "/lm_head/MatMul/output_0" if softcap else "logits"
    nodes = [helper.make_node("MatMul", ["x", "lm_head.MatMul.weight"], [head_out],
                              name="/lm_head/MatMul")]
    if softcap:
        nodes += [
            helper.make_node("Div", [head_out, cap.name], ["/lm_head/softcap/Div/output_0"]),
            helper.make_node("Tanh", ["/lm_head/softcap/Div/output_0"],
                             ["/lm_head/softcap/Tanh/output_0"]),
            helper.make_node(last, ["/lm_head/softcap/Tanh/output_0", cap.name]
                             if last == "Mul" else ["/lm_head/softcap/Tanh/output_0"],
                             ["logits"]),
        ]
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "seq", HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", "seq", VOCAB])],
        [weight, cap],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("softcap", [False, True], ids=["plain head", "soft-capped head"])
def test_logits_at_each_rows_chosen_position(softcap: bool) -> None:
    import onnxruntime as ort
    from onnx import numpy_helper

    model = head_graph(softcap)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    gather_positions(model, HIDDEN)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 5, HIDDEN)).astype(np.float32)
    logits = session.run(["logits"], {"x": x, POSITIONS: positions(2, HIDDEN, [4, 1])})[0]
    chosen = np.stack([x[0, 4], x[1, 1]]) @ weight
    expected = CAP * np.tanh(chosen / CAP) if softcap else chosen
    assert logits.shape == (2, 1, VOCAB)
    np.testing.assert_allclose(logits[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_logits_from_an_op_across_the_vocabulary_are_refused() -> None:
    # Only element-wise ops are known to commute with the gather; anything else is refused
    # rather than assumed to.
    with pytest.raises(ValueError, match="logits come from Softmax, not from the builder's"):
        gather_positions(head_graph(True, last="Softmax"), HIDDEN)
