"""Export of every family's tiny model (catalog.py): at FP32 token for token and logit for logit
with PyTorch, at INT4 re-rounded by GPTQ, the serving tokenizer held to the training one on
llama.cpp's own test vectors, and `precision: Auto` scoring answers that end where the server
ends them. The exports, and the variants of the catalog's models some tests read, are
`exports.py`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetune_trainer.export.auto import OnnxDecoder
from kubetune_trainer.export.requantize import BLOCK, dequantize
from kubetune_trainer.export.tokenizer_parity import check_parity
from kubetune_trainer.tokenizer import ServingTokenizer
from tests.trainer.export.test_requantize import builder_nodes, rtn_with_scales
from tests.trainer.families import catalog, matrix
from tests.trainer.families.catalog import FAMILIES
from tests.trainer.families.exports import (
    PARAMETRIZED,
    ends_turn_prompt,
    exported,
    greedy_tokens,
    model_dir,
)

NAMES = sorted(FAMILIES)
EXPORT_NEEDS = {  # test -> the exports it reads, per family (exports.queue_ahead)
    "test_fp32_export_is_pytorch_token_for_token_and_logit_for_logit": ("FP32", None),
    "test_served_ids_are_training_ids_on_llama_cpp_test_vectors": ("FP32", None),
    "test_int4_gptq_export_rerounds_every_weight": ("INT4", "GPTQ"),
    "test_a_sliding_window_on_every_layer_reaches_the_onnx_model": ("FP32", None),
    "test_auto_scores_an_answer_where_the_server_ends_it": ("FP32", None),
    "test_each_precision_exports_each_family_within_its_parity_bar": PARAMETRIZED,
}
EXPORT_FAMILY = {
    "test_a_sliding_window_on_every_layer_reaches_the_onnx_model": "mistral",
    "test_auto_scores_an_answer_where_the_server_ends_it": "phi3-ends-turn",
}


def sequence(length: int, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(100, 1000, length)]


def logits_gap(name: str, onnx_dir: Path, length: int) -> float:
    """The largest difference between PyTorch's and ONNX Runtime's logits at every position
    of a `length`-token sequence, relative to the logits' own largest magnitude."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = sequence(length)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir(name)), dtype=torch.float32)
    with torch.inference_mode():
        expected = model.eval()(input_ids=torch.tensor([ids])).logits[0].numpy()
    actual, _ = OnnxDecoder(onnx_dir).run(ids, None, len(ids))
    return float(np.abs(expected - actual).max() / np.abs(expected).max())


def long_enough(name: str) -> int:
    """A sequence past each length at which the family's attention changes within its
    context: its sliding window, LongRoPE's switch to the long factors."""
    config = json.loads((model_dir(name) / "config.json").read_text())
    context = config["max_position_embeddings"]
    switches = [config.get("sliding_window"), config.get("original_max_position_embeddings")]
    return 64 + max([s for s in switches if s and s < context], default=0)


@pytest.mark.parametrize("name", NAMES)
def test_fp32_export_is_pytorch_token_for_token_and_logit_for_logit(name: str) -> None:
    """Phi-3 128k's rope factors (its long ones past the switch), Gemma 3's per-layer-type
    RoPE, Gemma 2's and Mistral's sliding windows, Phi-4-mini's partial rotary: all computed
    as PyTorch computes them, to float32's rounding, beyond each window and switch."""
    report = exported(name, "FP32")
    assert report["ok"] and report["precision"] == "FP32"
    assert report["tokenizerParity"]["ok"]
    parity = report["outputParity"]
    assert parity["exactMatches"] == parity["prompts"] == 3
    assert logits_gap(name, report["output"], long_enough(name)) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_int4_gptq_export_rerounds_every_weight(name: str) -> None:
    """GPTQ finds each MatMul's weight by structure (packed and split projections, biases,
    q/k norms, tied heads) and re-rounds it: the layers' calibration error falls below RTN's,
    the stored weights are not RTN's, and the export passes the INT4 parity bar."""
    report = exported(name, "INT4", "GPTQ")
    assert report["ok"] and (report["precision"], report["quantization"]) == ("INT4", "GPTQ")
    assert report["calibrationSequences"] > 50 and 0 < report["outputErrorVsRtn"] < 1
    assert report["tokenizerParity"]["ok"] and report["outputParity"]["ok"]
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM

    graph = onnx.load(str(report["output"] / "model.onnx"), load_external_data=True).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir(name)), dtype=torch.float32)
    expected = builder_nodes(model)
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert {n.name.removesuffix("_Q4") for n in nodes} == set(expected)
    for node in nodes:
        weight, _ = expected[node.name.removesuffix("_Q4")]
        packed = stored[node.input[1]]
        gptq = dequantize(packed, stored[node.input[2]].reshape(packed.shape[0], -1))
        rtn, scales = rtn_with_scales(weight)
        changed = float(np.mean(gptq != rtn))
        assert changed > 0.05, f"{node.name}: {changed:.1%} of weights differ from RTN's"
        # still a 4-bit rounding of this weight: within a few of RTN's steps of it
        steps = np.abs(gptq - weight) / (np.abs(scales).repeat(BLOCK, axis=1) + 1e-12)
        assert np.median(steps) < 1, node.name


def each_precision() -> list[Any]:
    """(name, precision, quantization) for every family and CPU precision, `exhaustive` where
    `matrix.in_every_run` leaves it to the full matrix."""
    return [pytest.param(name, precision, quantization,
                         id=f"{name}-{matrix.variant(precision, quantization)}",
                         marks=() if matrix.in_every_run(name, precision, quantization)
                         else pytest.mark.exhaustive)
            for name in NAMES for precision, quantization in matrix.QUANTIZED]


@pytest.mark.parametrize(("name", "precision", "quantization"), each_precision())
def test_each_precision_exports_each_family_within_its_parity_bar(
        name: str, precision: str, quantization: str | None) -> None:
    """The builder's INT8 and INT4 roundings (the head in 8 bits for RTNLast and KQuantMixed)
    find each family's weights, and the export passes its tokenizer and output parity checks.
    `Auto` builds and scores every candidate: none fails to build (Phi-3's GPTQ once did, and
    Auto fell back to slower ones), and it serves one of them or FP32."""
    report = exported(name, precision, quantization)
    assert report["ok"], report["failures"]
    assert report["tokenizerParity"]["ok"] and report["outputParity"]["ok"]
    if precision != "Auto":
        assert (report["precision"], report["quantization"]) == (precision, quantization)
        return
    auto = report["auto"]
    assert auto["candidates"], "Auto tried no candidate"
    unbuilt = [c for c in auto["candidates"] if c["agreement"] is None]
    assert not unbuilt, unbuilt
    chosen = (report["precision"], report["quantization"])
    assert chosen in {(c["precision"], c["quantization"]) for c in auto["candidates"]
                      if c["passed"]} | {("FP32", None)}


@pytest.mark.parametrize("name", NAMES)
def test_served_ids_are_training_ids_on_llama_cpp_test_vectors(
    name: str, record_property: Any,
) -> None:
    """llama.cpp's tokenizer test texts for the family's vocab: the served ids are the
    training tokenizer's on every one. How many also equal llama.cpp's own ids is recorded
    (transformers and llama.cpp differ on some, e.g. SentencePiece's leading spaces)."""
    report = exported(name, "FP32")
    serving = ServingTokenizer.load(report["output"])
    vectors = catalog.test_vectors(FAMILIES[name].vocab)
    result = check_parity(model_dir(name), serving, [text for text, _ in vectors])
    assert result["ok"], result["mismatches"]
    same = sum(serving.encode(text, add_special_tokens=False) == ids for text, ids in vectors)
    record_property("llama_cpp_equal", f"{same}/{len(vectors)}")
    print(f"{name}: served ids equal llama.cpp's on {same} of {len(vectors)} test vectors")
    assert same > 0


def test_a_sliding_window_on_every_layer_reaches_the_onnx_model() -> None:
    """Mistral's window applies to every layer; with no layer_types in its config the builder
    gave no layer one, and past the window the ONNX model attended where PyTorch does not
    (the parity sequences cross the 16-token window: test_fp32_... checks the numbers)."""
    report = exported("mistral", "FP32")
    assert json.loads((model_dir("mistral") / "config.json").read_text())["sliding_window"] == 16
    assert report["builderConfigChanges"] == [
        "sliding_window 16 applied to every layer (layer_types)"]


def test_auto_scores_an_answer_where_the_server_ends_it() -> None:
    """Phi-3 ends its turn with `<|end|>`, which is not its tokenizer's `eos_token`
    (`<|endoftext|>`). `precision: Auto` scores each candidate's greedy answers against
    PyTorch's: both must end where the server ends an answer (every end-of-turn token), or an
    exported model that answers exactly as PyTorch does runs past `<|end|>`, scores 0 and
    loses to FP32. Here the FP32 export of a Phi-3 that answers in two tokens then `<|end|>`
    scores PyTorch's accuracy: 1."""
    from kubetune_trainer.export import auto
    from kubetune_trainer.heldout import IGNORE, HeldOut, HeldOutRecord

    name = "phi3-ends-turn"
    directory = model_dir(name)
    tokenizer = ServingTokenizer.load(directory)
    end = tokenizer.backend.token_to_id("<|end|>")
    assert end != tokenizer.eos_token_id and end in auto.pytorch_stop_ids(directory)
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    prompt = ends_turn_prompt(tokenizer)
    answer = greedy_tokens(model.eval(), prompt, 6)
    cut = answer.index(end)
    assert cut >= 2
    record = HeldOutRecord(
        input_ids=prompt + answer[:cut + 1], labels=[IGNORE] * len(prompt) + answer[:cut + 1],
        prompt=prompt, reference=tokenizer.decode(answer[:cut]))
    reference = auto.torch_reference(directory, HeldOut(records=[record]))
    assert reference.score.accuracy == 1.0
    score = auto.onnx_score(exported(name, "FP32")["output"], reference)
    assert score.accuracy == 1.0 and score.agreement == 1.0
