"""Export of every family's tiny model (catalog.py): at FP32 token for token and logit for logit
with PyTorch, at INT4 re-rounded by GPTQ, and the serving tokenizer held to the training one on
llama.cpp's own test vectors.

Exports run once per test process, in two exporter processes (`EXPORTS`). Three models
differ from the catalog's, each for a trait its sizes or random weights hide (VARIANTS, and
each change's docstring): Mistral's and Gemma 3's sliding windows and Phi-3 128k's LongRoPE
switch are moved inside the parity sequences, and Gemma 3 starts with small residual branches
so that its logits are not flat. GPTQ is calibrated on a varied set, as a run's would be
(llama.cpp's test texts, the parity texts, chat records; a few hundred tokens): on four short
records it fits those and moves the other outputs more than RTN does (Llama 3: twice RTN's
logit error on the parity prompts, agreement 0.52 < 0.55).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import multiprocessing
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetune_trainer.export import run as export_module
from kubetune_trainer.export.auto import OnnxDecoder
from kubetune_trainer.export.requantize import BLOCK, dequantize
from kubetune_trainer.export.tokenizer_parity import PLAIN_TEXTS, check_parity
from kubetune_trainer.heldout import Calibration
from kubetune_trainer.tokenizer import ServingTokenizer
from tests.trainer.conftest import QA
from tests.trainer.export.test_requantize import builder_nodes, rtn_with_scales
from tests.trainer.families import catalog
from tests.trainer.families.catalog import FAMILIES, Family, build_tiny_model
from tests.trainer.families.conftest import tiny_model

SCRATCH = Path(tempfile.mkdtemp(prefix="kubetune-family-exports-"))
atexit.register(shutil.rmtree, SCRATCH, True)
NAMES = sorted(FAMILIES)


def _short_window(config: Any) -> None:
    """A 16-token sliding window, which the parity sequences cross (the catalog's Mistral
    window, 4096, is as long as its context and never acts; Gemma 3's 512 is past them)."""
    config.sliding_window = 16


def _early_long_rope(config: Any) -> None:
    """LongRoPE switches to its long factors past original_max_position_embeddings (4096 in
    the catalog, past any parity sequence): at 32 tokens the parity sequences cross it."""
    config.original_max_position_embeddings = 32
    config.rope_parameters["original_max_position_embeddings"] = 32


def _small_residual_branches(model: Any) -> None:
    """Gemma's post-attention and post-feedforward norms at gain 0.1 (its RMSNorm scales by
    1 + weight) rather than 1. At gain 1 each layer adds a unit-scale random vector to a
    residual stream whose token embedding is ~0.16 per element, so nothing of the token
    reaches the tied head: Gemma 3's logits are random and flat, their top two 0.057 apart
    over 262,144 tokens, while INT4's rounding (the head and the embedding share one 4-bit
    table) moves them by 0.047 (rms): INT4 RTN agrees with PyTorch on 0.48 of the parity
    tokens, KQuant 0.52, GPTQ 0.54 (bar: 0.55; Gemma 2's soft-capped logits pass at 0.65+).
    Small residual branches at initialisation (as GPT-2's scaled init or ReZero start them)
    keep the token in the stream and give the logits a margin (0.23), as Qwen's tiny models
    have by themselves (0.33; INT4 agreement 0.99)."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("post_attention_layernorm.weight",
                              "post_feedforward_layernorm.weight")):
                parameter.fill_(0.1 - 1.0)


@dataclass(frozen=True)
class Variant:
    """A change of the catalog's tiny model for a trait its sizes hide or its random weights
    cannot show; each function's docstring says why."""

    config: Callable[[Any], None] | None = None
    weights: Callable[[Any], None] | None = None


VARIANTS = {
    "mistral": Variant(config=_short_window),
    "phi3-128k": Variant(config=_early_long_rope),
    "gemma3": Variant(config=_short_window, weights=_small_residual_branches),
}


@functools.cache
def model_dir(name: str) -> Path:
    """The model exported for `name`: the catalog's tiny model, or VARIANTS' change of it."""
    variant = VARIANTS.get(name)
    if variant is None:
        return tiny_model(name)
    family, change = FAMILIES[name], variant.config

    def config(vocab: int) -> Any:
        built = FAMILIES[name].config(vocab)
        if change is not None:
            change(built)
        return built

    family = dataclasses.replace(family, config=config)  # its name: the cached tokenizer
    directory = build_tiny_model(family, SCRATCH / "models" / name)
    if variant.weights is not None:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        variant.weights(model)
        model.save_pretrained(str(directory))
    return directory


def calibration_texts(family: Family) -> list[str]:
    return [text for text, _ in catalog.test_vectors(family.vocab)] + list(PLAIN_TEXTS)


@functools.cache
def run_dir(name: str) -> Path:
    """A run directory as training leaves it: `merged/` (the model, linked) and a
    `calibration.json` of varied text and chat records, encoded as training encodes them."""
    source = model_dir(name)
    run = SCRATCH / "runs" / name
    (run / "merged").mkdir(parents=True)
    for item in source.iterdir():
        (run / "merged" / item.name).symlink_to(item)
    tokenizer = ServingTokenizer.load(source)
    sequences = [tokenizer.encode(text)[:128] for text in calibration_texts(FAMILIES[name])]
    for question, answer in QA:
        prompt = (tokenizer.encode_chat([{"role": "user", "content": question}])
                  if tokenizer.chat_template else tokenizer.encode(question))
        sequences.append(prompt + tokenizer.encode(answer, add_special_tokens=False))
    Calibration(sequences=[s for s in sequences if len(s) > 1]).write(run)
    return run


EXPORTS = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
"""Two exporters, each exporting in its own process, one export after another: transformers'
model loading is not safe beside another load or a model's construction in the same process
(it patches torch's initialisers and default device process-wide), and a worker imports torch
and transformers once for all its exports."""
atexit.register(EXPORTS.shutdown, wait=True, cancel_futures=True)


def output_of(name: str, precision: str, quantization: str | None) -> Path:
    return SCRATCH / "onnx" / f"{name}-{precision}-{quantization}"


@functools.cache
def scheduled(name: str, precision: str, quantization: str | None = None) -> Future[int]:
    argv = ["--input", str(run_dir(name)), "--output",
            str(output_of(name, precision, quantization)), "--precision", precision]
    return EXPORTS.submit(export_module.main,
                          argv + (["--quantization", quantization] if quantization else []))


def exported(name: str, precision: str, quantization: str | None = None) -> dict[str, Any]:
    """export.json of `name`'s run exported at `precision` (once per process), with the
    model's directory as `report["output"]`."""
    code = scheduled(name, precision, quantization).result()
    output = output_of(name, precision, quantization)
    report: dict[str, Any] = json.loads((output / "export.json").read_text())
    assert code == 0, report["failures"]
    return {**report, "output": output}


NEEDS = {  # test -> the exports it reads, per family
    "test_fp32_export_is_pytorch_token_for_token_and_logit_for_logit": ("FP32", None),
    "test_served_ids_are_training_ids_on_llama_cpp_test_vectors": ("FP32", None),
    "test_int4_gptq_export_rerounds_every_weight": ("INT4", "GPTQ"),
    "test_a_sliding_window_on_every_layer_reaches_the_onnx_model": ("FP32", None),
}


@pytest.fixture(scope="module", autouse=True)
def exports_ahead(request: pytest.FixtureRequest) -> None:
    """The exports the selected tests read, queued FP32 first as the tests read them; each
    model is built (here, while the exporters work on those before it) just before its first
    export is queued."""
    wanted: set[tuple[str, str, str | None]] = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        need = NEEDS.get(getattr(item, "originalname", ""))
        params = getattr(item, "callspec", None)
        name = params.params.get("name", "mistral") if params else "mistral"
        if need is not None:
            wanted.add((name, *need))
    for name, precision, quantization in sorted(wanted, key=lambda w: (w[1] != "FP32", w[0])):
        run_dir(name)
        scheduled(name, precision, quantization)


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
    actual, _ = OnnxDecoder(onnx_dir, None).run(ids, None, len(ids))
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
