"""The batching engine against plain greedy decoding, token for token, without a server.

Rows of different lengths share every step (right padded, prefilled together), leave at
different times (the last row moves into the freed one) and a request joins mid-flight: each
must still produce exactly what the model decodes for it alone.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from kubetune_trainer.serve.engines.batch import scheduler as serve_batch
from kubetune_trainer.serve.engines.batch.scheduler import BatchEngine
from kubetune_trainer.serve.protocol import GenerationRequest, Limits
from tests.trainer.export.test_export import exported_model

PROMPTS = [
    ("Once upon a time, in a small village by the sea,", 24),
    ("The three primary colours are", 9),
    ("def quicksort(items):\n", 17),
    ("Here is a detailed explanation of how photosynthesis works, step by step:", 30),
]
LATE = ("The history of the printing press begins", 12)


def reference_ids(model: Path, prompt: list[int], tokens: int, eos: int | None) -> list[int]:
    """Greedy decoding, one sequence, past and present as separate tensors: no batching."""
    import onnxruntime as ort

    config = json.loads((model / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    heads, size = config["num_key_value_heads"], config["head_size"]
    names = [
        f"past_key_values.{layer}.{part}"
        for layer in range(config["num_hidden_layers"])
        for part in ("key", "value")
    ]
    outputs = ["logits"] + [name.replace("past_key_values", "present") for name in names]
    kv = {name: np.zeros((1, heads, 0, size), np.float32) for name in names}
    ids, generated = np.array([prompt]), []
    for _ in range(tokens):
        mask = np.ones((1, kv[names[0]].shape[2] + ids.shape[1]), np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, **kv}
        logits, *present = session.run(outputs, feeds)
        kv = dict(zip(names, present, strict=True))
        token = int(logits[0, -1].argmax())
        generated.append(token)
        if token == eos:
            break
        ids = np.array([[token]])
    return generated


def request(prompt: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(
        model="",
        chat=False,
        messages=None,
        prompt=prompt,
        max_tokens=tokens,
        temperature=0,
        top_p=1.0,
        seed=None,
        stop=(),
        stream=False,
        include_usage=False,
    )


async def collect(engine: BatchEngine, prompt: str, tokens: int) -> tuple[str, int]:
    events, _ = engine.start(
        request(prompt, tokens), engine.tokenizer.encode(prompt), asyncio.get_running_loop()
    )
    text = []
    while (event := await events.get()).kind == "delta":
        text.append(event.text)
    assert event.kind == "done", event.text
    return "".join(text), event.completion_tokens


@pytest.mark.parametrize("prefill_tokens", [serve_batch.PREFILL_TOKENS, 8])
def test_batched_decoding_equals_unbatched_greedy(
    prefill_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 8 tokens per prefill run, each prompt is prefilled alone and in chunks."""
    monkeypatch.setattr(serve_batch, "PREFILL_TOKENS", prefill_tokens)
    model = exported_model("INT4")
    engine = BatchEngine(model, Limits(max_concurrency=4))
    try:

        async def run() -> list[tuple[str, int]]:
            together = [asyncio.create_task(collect(engine, p, n)) for p, n in PROMPTS]
            first = await asyncio.wait(together, return_when=asyncio.FIRST_COMPLETED)
            assert first  # one row has left; the late request takes a freed row mid-flight
            late = await collect(engine, *LATE)
            return [*(await asyncio.gather(*together)), late]

        answers = asyncio.run(run())
    finally:
        engine.shutdown()
    for (prompt, tokens), (text, count) in zip([*PROMPTS, LATE], answers, strict=True):
        ids = engine.tokenizer.encode(prompt)
        expected = reference_ids(model, ids, tokens, engine.eos)
        assert count == len(expected), prompt
        assert text == engine.tokenizer.decode(expected), prompt


def test_cancelled_sequence_leaves_the_batch_and_others_finish() -> None:
    prompt, tokens = "Once upon a time, in a small village by the sea,", 200
    model = exported_model("INT4")
    engine = BatchEngine(model, Limits(max_concurrency=2))
    try:

        async def run() -> tuple[int, tuple[str, int]]:
            events, cancel = engine.start(
                request(prompt, tokens), engine.tokenizer.encode(prompt), asyncio.get_running_loop()
            )
            other = asyncio.create_task(collect(engine, *LATE))
            assert (await events.get()).kind == "delta"
            cancel.set()  # what the server does when the client goes away
            while (event := await events.get()).kind == "delta":
                pass
            assert event.kind == "done" and event.finish == "stop"
            return event.completion_tokens, await other

        generated, (text, count) = asyncio.run(run())
    finally:
        engine.shutdown()
    uncancelled = reference_ids(model, engine.tokenizer.encode(prompt), tokens, engine.eos)
    assert generated < len(uncancelled) // 2
    expected = reference_ids(model, engine.tokenizer.encode(LATE[0]), LATE[1], engine.eos)
    assert count == len(expected) and text == engine.tokenizer.decode(expected)


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = exported_model("INT4")
    engine = BatchEngine(model, Limits(max_concurrency=2))
    step = engine.cache.step

    def fail_once(tokens: list[int], lengths: list[int]) -> np.ndarray:
        monkeypatch.setattr(engine.cache, "step", step)
        raise RuntimeError("injected")

    monkeypatch.setattr(engine.cache, "step", fail_once)
    try:

        async def run() -> tuple[list[str], tuple[str, int]]:
            prompt, tokens = LATE
            events, _ = engine.start(
                request(prompt, tokens), engine.tokenizer.encode(prompt), asyncio.get_running_loop()
            )
            kinds = [(await events.get()).kind]
            while kinds[-1] == "delta":
                kinds.append((await events.get()).kind)
            return kinds, await collect(engine, prompt, tokens)

        kinds, (text, count) = asyncio.run(run())
    finally:
        engine.shutdown()
    assert kinds[-1] == "error"
    expected = reference_ids(model, engine.tokenizer.encode(LATE[0]), LATE[1], engine.eos)
    assert count == len(expected) and text == engine.tokenizer.decode(expected)


def test_a_step_that_does_not_return_shows_as_a_stall_and_idle_as_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scheduler's heartbeat: a wedged decode step is a growing stall; idle is none."""
    model = exported_model("INT4")
    engine = BatchEngine(model, Limits(max_concurrency=2))
    now = [1000.0]
    engine.heartbeat.clock = lambda: now[0]
    step = engine.cache.step
    entered, release = threading.Event(), threading.Event()

    def wedged(tokens: list[int], lengths: list[int]) -> np.ndarray:
        entered.set()
        release.wait(120)
        return step(tokens, lengths)

    monkeypatch.setattr(engine.cache, "step", wedged)
    try:
        now[0] += 3600
        assert engine.stalled_seconds() == 0  # idle for an hour is not a stall

        async def run() -> tuple[float, str, float]:
            prompt, tokens = LATE
            events, _ = engine.start(
                request(prompt, tokens), engine.tokenizer.encode(prompt), asyncio.get_running_loop()
            )
            try:
                assert await asyncio.to_thread(entered.wait, 120)
                now[0] += 500
                stalled = engine.stalled_seconds()
            finally:
                release.set()
            while (event := await events.get()).kind == "delta":
                pass
            now[0] += 3600
            return stalled, event.kind, engine.stalled_seconds()

        stalled, last, after = asyncio.run(run())
    finally:
        release.set()
        engine.shutdown()
    assert stalled == 500 and last == "done"
    assert after == 0  # the request is done: the engine is idle again
