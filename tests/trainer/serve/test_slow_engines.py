"""A slow, silent, wedged or failing engine, or a slow tokenizer, against the real app (no
model): requests end at their time limit, the event loop stays free while a prompt is tokenized,
`/tokenize` and `/detokenize` are admitted as completions are, a failure mid-stream reaches the
client as an error, and `/healthz` fails while the engine has work it does not advance."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kubetune_trainer.serve.http import liveness
from kubetune_trainer.serve.protocol import GenerationRequest, Limits, RequestError
from kubetune_trainer.serve.state import STATE, ServerState
from kubetune_trainer.tokenizer import ServingTokenizer
from tests.trainer.serve.fakes import (
    EchoEngine,
    EndlessEngine,
    FailingEngine,
    SilentEngine,
    WedgedEngine,
    app_with,
    serving,
)

BODY = {"model": "m", "prompt": "hi", "max_tokens": 1000}
WAIT = 30  # seconds: generous bounds on waits for a condition, never a measured duration


def test_a_request_past_its_time_limit_gets_what_was_generated() -> None:
    engine = EndlessEngine()
    app = app_with(engine, Limits(request_timeout_seconds=0.5))
    with serving(app) as url:
        answer = httpx.post(url + "/v1/completions", json=BODY, timeout=WAIT)
        assert engine.cancelled.wait(WAIT), "the engine went on generating past the limit"
        assert app[STATE].admission.admitted == 0 and app[STATE].inflight == 0  # slot freed
    assert answer.status_code == 200, answer.text
    [choice] = answer.json()["choices"]
    assert choice["finish_reason"] == "length" and choice["text"] == "x" * len(choice["text"])
    assert answer.json()["usage"]["completion_tokens"] == len(choice["text"]) > 0


def test_a_stream_past_its_time_limit_ends_cleanly() -> None:
    engine = EndlessEngine()
    with serving(app_with(engine, Limits(request_timeout_seconds=0.5))) as url:
        body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
        lines: list[str] = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=WAIT) as response:
            for line in response.iter_lines():
                lines += [line] if line.startswith("data: ") else []
                # ~50 chunks fit in the limit; thousands mean it never ended (bounded, not timed)
                assert len(lines) < 3000, "the stream went on past its time limit"
        assert engine.cancelled.wait(WAIT)
    assert lines[-1] == "data: [DONE]"
    *chunks, usage = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["usage"]["completion_tokens"] > 0


def test_a_request_that_times_out_before_any_token_gets_a_504() -> None:
    engine = SilentEngine()
    app = app_with(engine, Limits(request_timeout_seconds=0.3))
    with serving(app) as url:
        answer = httpx.post(url + "/v1/completions", json=BODY, timeout=WAIT)
        assert engine.cancelled.wait(WAIT)
        assert app[STATE].admission.admitted == 0
    assert answer.status_code == 504
    error = answer.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "request_timeout"
    assert error["message"]


class SlowTokenizer(EchoEngine):
    """Tokenizing the prompt "slow" blocks until `release` (a huge prompt, a slow template)."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self.tokenizing, self.release = threading.Event(), threading.Event()

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt == "slow":
            self.tokenizing.set()
            self.release.wait(WAIT)
        return super().prompt_ids(request)


def test_tokenizing_a_prompt_does_not_block_the_event_loop() -> None:
    engine = SlowTokenizer(Limits())
    with serving(app_with(engine, Limits())) as url, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(
            httpx.post, url + "/v1/completions", json={**BODY, "prompt": "slow",
                                                       "max_tokens": 3}, timeout=WAIT
        )
        try:
            assert engine.tokenizing.wait(WAIT)
            # The slow prompt is being tokenized right now; the loop still answers.
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
            fast = httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": 3}, timeout=5)
            assert fast.status_code == 200, fast.text
            assert not slow.done()
        finally:
            engine.release.set()
        assert slow.result().status_code == 200


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_healthz_fails_while_the_engine_has_work_it_does_not_advance() -> None:
    clock = Clock()
    engine = WedgedEngine(clock)
    limits = Limits(engine_stall_seconds=60)
    with serving(app_with(engine, limits)) as url, ThreadPoolExecutor(1) as pool:
        clock.now += 3600
        assert httpx.get(url + "/healthz").status_code == 200  # idle for an hour: alive
        pending = pool.submit(httpx.post, url + "/v1/completions", json=BODY, timeout=WAIT)
        try:
            assert engine.started.wait(WAIT)
            clock.now += 59
            assert httpx.get(url + "/healthz").status_code == 200  # slow, within the limit
            clock.now += 2
            wedged = httpx.get(url + "/healthz")
            assert wedged.status_code == 503
            assert wedged.json()["status"] == "stalled" and "61s" in wedged.json()["error"]
        finally:
            engine.release.set()
        assert pending.result().status_code == 200
        clock.now += 3600
        assert httpx.get(url + "/healthz").json() == {"status": "alive"}  # idle again


def test_liveness_is_a_threshold_on_the_stall() -> None:
    assert liveness(0.0, 60)[0] == 200
    assert liveness(60.0, 60)[0] == 200
    assert liveness(60.5, 60)[0] == 503
    assert liveness(float("inf"), 60) == (
        503, {"status": "stalled", "error": "the engine's thread has stopped"}
    )


def test_draining_then_closed_answer_503s_in_json() -> None:
    """What SIGTERM's two phases answer (the process test in test_serve.py covers the signal)."""
    app = app_with(EchoEngine(Limits()), Limits())
    with serving(app) as url:
        app[STATE].draining = True
        ready = httpx.get(url + "/readyz")
        assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
        served = httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": 2})
        assert served.status_code == 200  # still served while draining
        app[STATE].closed = True
        refused = httpx.post(url + "/v1/completions", json=BODY)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"


class GatedTokenizer(ServingTokenizer):
    """The real tokenizer, except that the first encode or decode waits until `release` (a
    1 MiB prompt being tokenized); `entered` says it is waiting."""

    def __init__(self, real: ServingTokenizer) -> None:
        super().__init__(**vars(real))
        self.entered, self.release = threading.Event(), threading.Event()

    def _first_waits(self) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(WAIT)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._first_waits()
        return super().encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int]) -> str:
        self._first_waits()
        return super().decode(ids)


TOKEN_REQUESTS = [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [31, 32]})]


@pytest.mark.parametrize(("path", "body"), TOKEN_REQUESTS)
def test_token_endpoints_are_admitted_as_completions_are(path: str, body: dict[str, Any]) -> None:
    """A `/tokenize` or `/detokenize` takes a place in admission while its work runs in the
    thread pool that completions tokenize on: beyond capacity the next request of any kind
    gets a 429, and once the server is closed they get its 503, as completions do."""
    limits = Limits(max_concurrency=1, max_queue=0)  # room for one request
    engine = EchoEngine(limits)
    engine.tokenizer = tokenizer = GatedTokenizer(engine.tokenizer)
    app = app_with(engine, limits)
    with serving(app) as url, ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, url + path, json=body, timeout=WAIT)
        try:
            assert tokenizer.entered.wait(WAIT)
            for other_path, other_body in [*TOKEN_REQUESTS, ("/v1/completions", BODY)]:
                refused = httpx.post(url + other_path, json=other_body, timeout=WAIT)
                assert refused.status_code == 429, (other_path, refused.text)
                assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert app[STATE].inflight == 1  # counted in flight: draining waits for it
        finally:
            tokenizer.release.set()
        assert held.result().status_code == 200, held.result().text
        assert app[STATE].admission.admitted == 0 and app[STATE].inflight == 0  # place freed
        assert httpx.post(url + path, json=body, timeout=WAIT).status_code == 200
        app[STATE].closed = True
        closed = httpx.post(url + path, json=body, timeout=WAIT)
        assert closed.status_code == 503, closed.text
        assert closed.json()["error"]["code"] == "shutting_down"


def test_token_work_holds_its_place_until_its_thread_ends_even_when_the_client_leaves() -> None:
    """A client that sends a 1 MiB prompt and disconnects cancels its handler, but not the
    thread tokenizing it: the place must stay taken until that thread ends, or such clients
    queue unbounded work on the pool behind an admission that counts none of it."""

    async def scenario() -> None:
        state = ServerState("m", Path("/nonexistent"), Limits(max_concurrency=1, max_queue=0),
                            "batch")
        release = threading.Event()
        handler = asyncio.create_task(state.run_admitted(lambda: release.wait(WAIT)))
        await asyncio.sleep(0.1)  # the handler takes its place and starts its thread
        handler.cancel()  # what aiohttp does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await handler
        assert (state.admission.admitted, state.inflight) == (1, 1)  # the thread still runs
        with pytest.raises(RequestError) as refused:
            await state.run_admitted(lambda: True)
        assert refused.value.status == 429
        release.set()
        await asyncio.wait_for(state.idle.wait(), WAIT)  # the thread ended: place freed
        assert (state.admission.admitted, state.inflight) == (0, 0)
        assert await state.run_admitted(lambda: True) is True

    asyncio.run(scenario())


def test_a_failure_mid_stream_ends_with_an_error_event_not_a_normal_end() -> None:
    """After some tokens the engine fails: the client must not read the partial output as
    complete. Like vLLM, the stream carries `data: {"error": {...}}` (OpenAI's error shape)
    before `[DONE]`, and no usage chunk; OpenAI's client raises on it."""
    with serving(app_with(FailingEngine(), Limits())) as url:
        body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=WAIT) as response:
            assert response.status_code == 200  # sent with the first token, before the failure
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        *chunks, failure = [json.loads(line[6:]) for line in lines[:-1]]
        assert failure == {"error": {
            "message": f"generation failed: {FailingEngine.failure}", "type": "server_error",
            "param": None, "code": "generation_failed",
        }}
        assert "".join(c["choices"][0]["text"] for c in chunks) == '{"a": '
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # not "finished"

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="generation failed: grammar"):
            for _ in stream:
                pass
