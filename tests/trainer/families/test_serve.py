"""Serving every model family (`catalog.FAMILIES`): the tiny model of each (or its variant,
`exports.VARIANTS`) exported at FP32 and INT4 GPTQ by test_export.py's exporters (`exports.py`),
served by both engines.

- FP32, one server per family and engine: a chat is rendered with the family's own chat
  template (the ids transformers' `apply_chat_template` gives) and answered as PyTorch answers
  it, greedy; on the batching engine a LoRA adapter on every linear layer (PEFT's
  `all-linear`: packed `qkv_proj`/`gate_up_proj` on Phi-3, separate projections elsewhere)
  answers as the adapter merged into the model does, in the same batch as the base.
- INT4, both engines in this process: the same answers as unbatched greedy decoding of the
  INT4 graph; the adapter answers the same alone or beside the base, and not as the base.
- Every end-of-turn token the family's generation_config.json lists ends an answer (finish
  `stop`) in both engines, through what the exporter writes: on a copy of the FP32 export whose
  weights make each token's successor fixed (`chain_model`), so each one is generated on cue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import re
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kubetune_trainer.genai_model import stop_token_ids
from kubetune_trainer.serve.protocol import Limits
from kubetune_trainer.tokenizer import ServingTokenizer
from tests.trainer.families.catalog import FAMILIES
from tests.trainer.families.conftest import SCRATCH
from tests.trainer.families.exports import exported, model_dir
from tests.trainer.serve.test_serve import Server, post
from tests.trainer.serve.test_serve_batch import reference_ids, request

NAMES = sorted(FAMILIES)
TOKENS = 8
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "Once upon a time, in a small village by the sea,"
ADAPTER = "tuned"


EXPORT_NEEDS = {  # test -> the exports it reads, per family (exports.queue_ahead)
    "test_fp32_chat_in_the_familys_template_and_adapters": ("FP32", None),
    "test_every_end_of_turn_token_ends_the_answer_in_both_engines": ("FP32", None),
    "test_int4_by_both_engines_and_an_adapter_on_it": ("INT4", "GPTQ"),
    "test_long_rope_factors_follow_each_rows_own_length_in_the_batch": ("FP32", None),
}


def export_of(name: str, precision: str, quantization: str | None = None) -> Path:
    """The model's export (test_export.py's, shared: `exports.py`), as the server loads it."""
    return Path(exported(name, precision, quantization)["output"])


@functools.cache
def adapter(name: str) -> Path:
    """A LoRA adapter on every linear layer of the family's model (PEFT's `all-linear`), with
    random lora_B so that it changes the answers; saved as PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir(name)), dtype=torch.float32)
    torch.manual_seed(1)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for key, parameter in adapted.named_parameters():
            if "lora_B" in key:
                parameter.normal_(std=0.05)
    target = SCRATCH / "adapters" / name
    adapted.save_pretrained(str(target))
    return target


def end_of_turn(name: str) -> list[int]:
    """The ids the family's generation_config.json ends a turn with."""
    config = json.loads((model_dir(name) / "generation_config.json").read_text())
    ids = config["eos_token_id"]
    return ids if isinstance(ids, list) else [ids]


def chat_ids(name: str) -> list[int]:
    """`CHAT` rendered and tokenized by transformers with the family's own chat template."""
    return list(_chat_ids(name))


@functools.cache
def _chat_ids(name: str) -> tuple[int, ...]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(name)))
    rendered: Any = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return tuple(rendered["input_ids"])


def completion_ids(name: str) -> list[int]:
    return ServingTokenizer.load(model_dir(name)).encode(PROMPT)


def until_stop(tokens: Iterable[int], stops: Iterable[int]) -> list[int]:
    """Greedy tokens up to and including the first end-of-turn token."""
    kept: list[int] = []
    for token in tokens:
        kept.append(token)
        if token in set(stops):
            break
    return kept


@functools.cache
def references(name: str) -> dict[tuple[str, str], list[int]]:
    """PyTorch's greedy tokens, by (model: "base" or ADAPTER merged in, prompt: "chat" or
    "completion"), as the exporter merges an adapter (PEFT's merge_and_unload)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = {"chat": chat_ids(name), "completion": completion_ids(name)}
    stops = end_of_turn(name)
    found = {}
    for model_name in ("base", ADAPTER):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir(name)), dtype=torch.float32)
        if model_name == ADAPTER:
            model = PeftModel.from_pretrained(model, str(adapter(name))).merge_and_unload()
        model.eval()
        for prompt, ids in prompts.items():
            tokens = list(ids)
            with torch.no_grad():
                for _ in range(TOKENS):
                    tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
                    if tokens[-1] in stops:
                        break
            found[(model_name, prompt)] = tokens[len(ids) :]
    return found


def text_of(tokenizer: ServingTokenizer, tokens: list[int], stops: Iterable[int]) -> str:
    return tokenizer.decode([t for t in tokens if t not in set(stops)])


@pytest.mark.parametrize("engine", ["batch", "genai"])
@pytest.mark.parametrize("name", NAMES)
def test_fp32_chat_in_the_familys_template_and_adapters(name: str, engine: str) -> None:
    model = export_of(name, "FP32")
    tokenizer = ServingTokenizer.load(model)
    stops = stop_token_ids(model, tokenizer)
    expected = references(name)
    extra = ["--engine", engine, "--max-tokens", "32", "--max-concurrency", "4"]
    if engine == "batch":
        extra += ["--lora-modules", f"{ADAPTER}={adapter(name)}"]
    server = Server(model, *extra)
    try:
        tokenized = post(server, "/tokenize", {"model": server.name, "messages": CHAT}).json()
        assert tokenized["tokens"] == chat_ids(name)  # the family's template, as transformers

        def ask(served: str, prompt: str) -> dict[str, Any]:
            body: dict[str, Any] = {"model": served, "max_tokens": TOKENS, "temperature": 0}
            if prompt == "chat":
                response = post(server, "/v1/chat/completions", {**body, "messages": CHAT})
            else:
                response = post(server, "/v1/completions", {**body, "prompt": PROMPT})
            assert response.status_code == 200, response.text
            return dict(response.json())

        asked = [("base", "chat"), ("base", "completion")]
        if engine == "batch":  # base and adapter rows share the batch
            asked += [(ADAPTER, "chat"), (ADAPTER, "completion")]
        with ThreadPoolExecutor(len(asked)) as pool:
            answers = list(pool.map(
                lambda a: ask(server.name if a[0] == "base" else a[0], a[1]), asked))
        for (served, prompt), answer in zip(asked, answers, strict=True):
            want = expected[(served, prompt)]
            choice = answer["choices"][0]
            text = choice["message"]["content"] if prompt == "chat" else choice["text"]
            assert text == text_of(tokenizer, want, stops), (served, prompt)
            assert answer["usage"]["completion_tokens"] == len(want), (served, prompt)
            assert choice["finish_reason"] == ("stop" if want[-1] in stops else "length")
            if prompt == "chat":
                assert answer["usage"]["prompt_tokens"] == len(chat_ids(name))
        if engine == "batch":
            assert any(expected[(ADAPTER, p)] != expected[("base", p)]
                       for p in ("chat", "completion"))  # else it could not tell them apart
            listed = httpx.get(server.url + "/v1/models").json()["data"]
            assert [m["id"] for m in listed] == [server.name, ADAPTER]
    finally:
        server.stop()


async def _collect(engine: Any, model: str, ids: list[int], tokens: int) -> tuple[str, int, str]:
    events, _ = engine.start(dataclasses.replace(request("", tokens), model=model), ids,
                             asyncio.get_running_loop())
    text = []
    while (event := await events.get()).kind == "delta":
        text.append(event.text)
    assert event.kind == "done", event.text
    return "".join(text), event.completion_tokens, str(event.finish)


def generate(engine: Any, asked: list[tuple[str, list[int], int]]) -> list[tuple[str, int, str]]:
    """Each (model, prompt ids, max tokens) at once, so that they share the batch."""

    async def run() -> list[tuple[str, int, str]]:
        return list(await asyncio.gather(*(_collect(engine, *a) for a in asked)))

    return asyncio.run(run())


def engines(model: Path, adapters: dict[str, Path] | None = None) -> Iterable[Any]:
    """The batching engine (with `adapters`), then the genai engine, each shut down after use."""
    from kubetune_trainer.serve.engines.batch.scheduler import BatchEngine
    from kubetune_trainer.serve.engines.genai import GenAIEngine

    limits = Limits(max_concurrency=6)
    for make in (lambda: BatchEngine(model, limits, adapters), lambda: GenAIEngine(model, limits)):
        engine = make()
        try:
            yield engine
        finally:
            engine.shutdown()


def plain_tokens(tokenizer: ServingTokenizer, count: int) -> list[int]:
    """`count` ordinary tokens (ASCII words, no special token), for the chain model's cues."""
    found = []
    for token in range(tokenizer.vocab_size // 4, tokenizer.vocab_size):
        text = tokenizer.decode([token]).strip()
        if token not in tokenizer.special_ids and re.fullmatch(r"[A-Za-z]{3,}", text):
            found.append(token)
            if len(found) == count:
                return found
    raise AssertionError("too few plain tokens")


def chain_model(export: Path, target: Path, chain: dict[int, int]) -> Path:
    """A copy of an FP32 export whose greedy next token depends on the last token alone, and is
    `chain[token]` for each token in `chain`.

    Only weights change, none of the graph the server runs: the layers' output projections
    (o_proj, down_proj) are zero, so each position's hidden state is its token's embedding; the
    final norm's weight is one; and the output head maps the embeddings of `chain`'s tokens to
    one-hot logits of their successors (solved exactly, every other token's logit 0; the
    positive RMS-norm scale and any soft-cap keep that argmax). A tied head gets an untied
    copy of the embeddings first.
    """
    import onnx
    from onnx import numpy_helper

    from kubetune_trainer.serve.engines.batch.graph import output_head

    model = onnx.load(str(export / "model.onnx"))
    graph = model.graph
    weights = {w.name: w for w in graph.initializer}

    def value(name: str) -> np.ndarray:
        return numpy_helper.to_array(weights[name])

    def put(name: str, array: np.ndarray) -> None:
        weights[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))

    producers = {output: node for node in graph.node for output in node.output}
    head = output_head(graph)
    lookup = next(n for n in graph.node if n.op_type == "Gather" and "embed_tokens" in n.name)
    table = lookup.input[0]
    if table in weights:
        embeddings = value(table)
        graph.initializer.remove(weights.pop(table))  # replaced by the copy below
    else:  # tied: the embeddings are the head's weight, transposed
        assert producers[table].op_type == "Transpose", producers[table]
        embeddings = value(producers[table].input[0]).T
    graph.initializer.append(numpy_helper.from_array(embeddings, "chain.embed_tokens.weight"))
    lookup.input[0] = "chain.embed_tokens.weight"
    for node in graph.node:
        if re.search(r"/(o_proj|down_proj)/(MatMul|Add)$", node.name):
            for name in node.input[1:]:
                if name in weights:
                    put(name, np.zeros_like(value(name)))
    norm = producers[head.input[0]]
    for name in norm.input:
        if name in weights and value(name).ndim == 1:
            put(name, np.ones_like(value(name)))
    sources = sorted(chain)
    successors = sorted(set(chain.values()))
    cues = embeddings[sources].T.astype(np.float64)  # hidden x cues
    onehot = np.zeros((len(sources), len(successors)))
    for row, source in enumerate(sources):
        onehot[row, successors.index(chain[source])] = 1
    head_weight = np.zeros_like(value(head.input[1]))
    head_weight[:, successors] = cues @ np.linalg.solve(cues.T @ cues, onehot)
    put(head.input[1], head_weight)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for item in export.iterdir():
        if not item.name.startswith("model.onnx"):
            shutil.copy2(item, target / item.name)
    onnx.save(model, str(target / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")
    return target


@pytest.mark.parametrize("name", NAMES)
def test_every_end_of_turn_token_ends_the_answer_in_both_engines(name: str) -> None:
    export = export_of(name, "FP32")
    tokenizer = ServingTokenizer.load(export)
    listed = end_of_turn(name)
    written = json.loads((export / "genai_config.json").read_text())["model"]["eos_token_id"]
    # The exporter carries generation_config.json's end-of-turn ids to what the server reads.
    assert set(listed) <= set(written if isinstance(written, list) else [written])
    stops = sorted(stop_token_ids(export, tokenizer))
    assert set(listed) <= set(stops)
    words = plain_tokens(tokenizer, 2 * len(stops))
    cue = {stop: (words[2 * i], words[2 * i + 1]) for i, stop in enumerate(stops)}
    # far -> near -> stop: the stop comes from a decode step; near -> stop: from the prefill.
    chain = {**{far: near for far, near in cue.values()},
             **{near: stop for stop, (_, near) in cue.items()}}
    model = chain_model(export, SCRATCH / "chains" / name, chain)
    asked = [(far, near) for far, near in cue.values()]
    for engine in engines(model):
        answers = generate(engine, [("", [first], 6) for pair in asked for first in pair])
        expected = [a for far, near in asked
                    for a in ((tokenizer.decode([near]), 2, "stop"), ("", 1, "stop"))]
        assert answers == expected, (type(engine).__name__, [tokenizer.backend.id_to_token(s)
                                                            for s in stops])


@pytest.mark.parametrize("name", NAMES)
def test_int4_by_both_engines_and_an_adapter_on_it(name: str) -> None:
    from kubetune_trainer.serve.engines.base import AdapterHost

    model = export_of(name, "INT4", "GPTQ")
    tokenizer = ServingTokenizer.load(model)
    stops = stop_token_ids(model, tokenizer)
    prompts = [chat_ids(name), completion_ids(name)]
    expected = [until_stop(reference_ids(model, ids, TOKENS, None), stops) for ids in prompts]
    for engine in engines(model, {ADAPTER: adapter(name)}):
        asked = [("", ids, TOKENS) for ids in prompts]
        if not isinstance(engine, AdapterHost):  # genai: no adapters
            answers = generate(engine, asked)
        else:
            alone = generate(engine, [(ADAPTER, ids, TOKENS) for ids in prompts])
            answers = generate(engine, asked + [(ADAPTER, ids, TOKENS) for ids in prompts])
            assert answers[len(prompts) :] == alone  # rows do not depend on their neighbours
            assert alone != answers[: len(prompts)]  # and the adapter changes the answers
        for (text, count, finish), want in zip(answers[: len(prompts)], expected, strict=True):
            assert (text, count) == (text_of(tokenizer, want, stops), len(want)), type(engine)
            assert finish == ("stop" if want[-1] in stops else "length")


def logprob_reference(model: Path, prompt: list[int], tokens: int) -> list[tuple[int, float]]:
    """Greedy tokens and their log-probabilities from the exported graph as it is, one
    sequence, past and present as separate tensors (the attention mask as long as the
    sequence: onnxruntime-genai's and transformers' choice of rotary factors)."""
    import onnxruntime as ort

    from kubetune_trainer.serve.engines.logprobs import log_softmax

    config = json.loads((model / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [f"past_key_values.{layer}.{part}" for layer in range(config["num_hidden_layers"])
             for part in ("key", "value")]
    shape = (1, config["num_key_value_heads"], 0, config["head_size"])
    kv = {name: np.zeros(shape, np.float32) for name in names}
    ids, found = np.array([prompt]), []
    for _ in range(tokens):
        mask = np.ones((1, kv[names[0]].shape[2] + ids.shape[1]), np.int64)
        logits, *present = session.run(
            ["logits"] + [n.replace("past_key_values", "present") for n in names],
            {"input_ids": ids, "attention_mask": mask, **kv})
        kv = dict(zip(names, present, strict=True))
        row = log_softmax(logits[0, -1])
        found.append((int(row.argmax()), float(row.max())))
        ids = np.array([[found[-1][0]]])
    return found


LONG_ROPE = [name for name in NAMES if "LongRoPE" in FAMILIES[name].traits]


@pytest.mark.parametrize("name", LONG_ROPE)
def test_long_rope_factors_follow_each_rows_own_length_in_the_batch(name: str) -> None:
    """Two rotary caches (short factors up to the original context, long beyond): in one
    batch, a short answer beside one whose cache runs past the switch (the batch's cache buffer
    is then wider than the switch), an answer that crosses it while decoding, and a prompt
    longer than it (prefilled in chunks, with the long factors throughout), each with the
    log-probabilities of decoding it alone."""
    from kubetune_trainer.serve.engines.batch.scheduler import BatchEngine

    model = export_of(name, "FP32")
    switch = int(json.loads((model_dir(name) / "config.json").read_text())
                 ["original_max_position_embeddings"])
    text = completion_ids(name)
    prompts = [text, (text * switch)[: switch - 3], (text * switch)[: switch + 5]]
    expected = [logprob_reference(model, ids, TOKENS) for ids in prompts]
    engine = BatchEngine(model, Limits(max_concurrency=4, context_length=2 * switch))
    try:

        async def run() -> list[list[tuple[int, float]]]:
            loop = asyncio.get_running_loop()
            queues = [engine.start(dataclasses.replace(request("", TOKENS), logprobs=0), ids,
                                   loop)[0] for ids in prompts]
            found = []
            for events in queues:
                chosen = []
                while (event := await events.get()).kind == "delta":
                    chosen += [(entry.chosen.bytes, entry.chosen.logprob)
                               for entry in event.logprobs]
                assert event.kind == "done", event.text
                found.append(chosen)
            return found

        answers = asyncio.run(run())
    finally:
        engine.shutdown()
    for ids, answer, want in zip(prompts, answers, expected, strict=True):
        assert [list(engine.grammars.spell(t)) for t, _ in want] == [b for b, _ in answer]
        np.testing.assert_allclose([p for _, p in answer], [p for _, p in want], atol=1e-4,
                                   err_msg=f"a {len(ids)}-token prompt")
