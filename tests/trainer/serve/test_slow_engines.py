"""A slow, silent or wedged engine, or a slow tokenizer, against the real app (no model):
requests end at their time limit, the event loop stays free while a prompt is tokenized, and
`/healthz` fails while the engine has work it does not advance."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from kubetune_trainer.serve.http import liveness
from kubetune_trainer.serve.protocol import GenerationRequest, Limits
from kubetune_trainer.serve.state import STATE
from tests.trainer.serve.fakes import (
    EchoEngine,
    EndlessEngine,
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
