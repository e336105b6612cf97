"""The family tests' exports (test_export.py, test_serve.py): each family's tiny model, or a
variant of it (`VARIANTS`), in a run directory as training leaves it, exported once per test
process by two exporter processes, the exports every selected test needs queued ahead
(`queue_ahead`, FP32 first) so that the exporters work while the tests read what is done.

A test module says what it reads in `EXPORT_NEEDS` (test -> precision and quantization, for
each family it is parametrized with; `PARAMETRIZED` when they are the test's parameters) and
`EXPORT_FAMILY` (test -> the one model a test with no `name` parameter reads). Three variants
differ from the catalog's models, each for a trait its sizes or random weights hide (each
change's docstring): Mistral's and Gemma 3's sliding windows and Phi-3 128k's LongRoPE switch
are moved inside the parity sequences, and Gemma 3 starts with small residual branches so that
its logits are not flat; `phi3-ends-turn` is a Phi-3 that ends its answer with `<|end|>`. GPTQ
is calibrated on a varied set, as a run's would be (llama.cpp's test texts, the parity texts,
chat records; a few hundred tokens): on four short records it fits those and moves the other
outputs more than RTN does (Llama 3: twice RTN's logit error on the parity prompts, agreement
0.52 < 0.55).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import multiprocessing
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.export import run as export_module
from kubetune_trainer.export.tokenizer_parity import PLAIN_TEXTS
from kubetune_trainer.heldout import Calibration
from kubetune_trainer.tokenizer import ServingTokenizer
from tests.trainer.conftest import QA
from tests.trainer.families import catalog
from tests.trainer.families.catalog import FAMILIES, Family, build_tiny_model
from tests.trainer.families.conftest import tiny_model

SCRATCH = Path(tempfile.mkdtemp(prefix="kubetune-family-exports-"))
atexit.register(shutil.rmtree, SCRATCH, True)
def _short_window(config: Any) -> None:
    """A 16-token sliding window, which the parity sequences cross (the catalog's Mistral
    window, 4096, is as long as its context and never acts; Gemma 3's 512 is past them)."""
    config.sliding_window = 16


def _early_long_rope(config: Any) -> None:
    """LongRoPE switches to its long factors past original_max_position_embeddings (4096 in
    the catalog, past any parity sequence): at 32 tokens the parity sequences cross it."""
    config.original_max_position_embeddings = 32
    config.rope_parameters["original_max_position_embeddings"] = 32


def _small_residual_branches(model: Any, directory: Path) -> None:
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


def ends_turn_prompt(tokenizer: ServingTokenizer) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": "I need a command."}])


def greedy_tokens(model: Any, prompt: list[int], steps: int) -> list[int]:
    """PyTorch's argmax continuation of `prompt`, ending on no token."""
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _ends_turn_early(model: Any, directory: Path) -> None:
    """Phi-3 answers `ends_turn_prompt` with a few tokens and then `<|end|>`: a random model
    never writes an end-of-turn token by itself, so `<|end|>`'s output row becomes twice the
    row of the token it would write at some step k (its logit doubles that token's, positive
    as a top logit is) and the answer ends there (k is the first step where the earlier ones
    stay as they were)."""
    import torch

    from kubetune_trainer.tokenizer import ServingTokenizer

    tokenizer = ServingTokenizer.load(directory)
    end, prompt = tokenizer.backend.token_to_id("<|end|>"), ends_turn_prompt(tokenizer)
    head = model.get_output_embeddings().weight
    original = greedy_tokens(model, prompt, 6)
    saved = head[end].detach().clone()
    for step in range(2, 6):
        with torch.no_grad():
            head[end] = 2 * head[original[step]]
        if greedy_tokens(model, prompt, step + 1) == [*original[:step], end]:
            return
        with torch.no_grad():
            head[end] = saved
    raise AssertionError(f"no step of {original} can end the turn with <|end|>")


@dataclass(frozen=True)
class Variant:
    """A change of the catalog's tiny model (`base`'s, when the variant has a name of its own)
    for a trait its sizes hide or its random weights cannot show; each function's docstring
    says why."""

    config: Callable[[Any], None] | None = None
    weights: Callable[[Any, Path], None] | None = None
    base: str | None = None


VARIANTS = {
    "mistral": Variant(config=_short_window),
    "phi3-128k": Variant(config=_early_long_rope),
    "gemma3": Variant(config=_short_window, weights=_small_residual_branches),
    "phi3-ends-turn": Variant(weights=_ends_turn_early, base="phi3"),
}


def family_of(name: str) -> Family:
    variant = VARIANTS.get(name)
    return FAMILIES[variant.base or name] if variant else FAMILIES[name]


@functools.cache
def model_dir(name: str) -> Path:
    """The model exported for `name`: the catalog's tiny model, or VARIANTS' change of it."""
    variant = VARIANTS.get(name)
    if variant is None:
        return tiny_model(name)
    base, change = family_of(name), variant.config

    def config(vocab: int) -> Any:
        built = base.config(vocab)
        if change is not None:
            change(built)
        return built

    family = dataclasses.replace(base, config=config)  # its name: the cached tokenizer
    directory = build_tiny_model(family, SCRATCH / "models" / name)
    if variant.weights is not None:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        variant.weights(model, directory)
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
    sequences = [tokenizer.encode(text)[:128] for text in calibration_texts(family_of(name))]
    for question, answer in QA:
        prompt = (tokenizer.encode_chat([{"role": "user", "content": question}])
                  if tokenizer.chat_template else tokenizer.encode(question))
        sequences.append(prompt + tokenizer.encode(answer, add_special_tokens=False))
    Calibration(sequences=[s for s in sequences if len(s) > 1]).write(run)
    return run


def die_with_parent() -> None:
    """A worker's initializer: the kernel sends it SIGKILL when the test process ends. atexit
    runs only on a clean exit; a pytest killed by a signal (a CI timeout, Ctrl-C twice) left
    both workers exporting everything queued, for most of an hour, beside the next run."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


EXPORTS = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                              initializer=die_with_parent)
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


PARAMETRIZED = ("from the test's parameters", None)
"""An `EXPORT_NEEDS` value: the test's `precision` and `quantization` parameters say."""


def queue_ahead(items: Iterable[pytest.Item]) -> None:
    """Queue the exports the selected tests read (their modules' `EXPORT_NEEDS`), FP32 first
    as the tests read them; each model is built (here, while the exporters work on those
    before it) just before its first export is queued."""
    wanted: set[tuple[str, str, str | None]] = set()
    for item in items:
        module = getattr(item, "module", None)
        test = getattr(item, "originalname", "")
        need = getattr(module, "EXPORT_NEEDS", {}).get(test)
        if need is None:
            continue
        params = getattr(item, "callspec", None)
        name = (params.params["name"] if params and "name" in params.params
                else module.EXPORT_FAMILY[test])
        if need is PARAMETRIZED:
            assert params is not None
            need = (params.params["precision"], params.params["quantization"])
        wanted.add((name, *need))
    for name, precision, quantization in sorted(
            wanted, key=lambda w: (w[1] != "FP32", w[0], w[2] or "")):
        run_dir(name)
        scheduled(name, precision, quantization)
