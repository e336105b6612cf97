"""The server as a real process on loopback: OpenAI client, bad requests, load, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kubetune_trainer.serve.engines.text import TextAssembler
from tests.trainer.export.test_export import exported_model

LIMITS = [
    "--max-tokens",
    "64",
    "--max-concurrency",
    "2",
    "--max-queue",
    "2",
    "--max-body-bytes",
    "65536",
    "--grace-seconds",
    "60",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, model: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = model.name
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubetune_trainer",
                "serve",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (
                self.process.stdout.read() if self.process.stdout else ""
            )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling for a condition, bounded by the deadline
        raise AssertionError("server did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server(exported_model("INT4"), *LIMITS)
    yield running
    running.stop()


def post(server: Server, path: str, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.url + path,
        content=content,
        timeout=300,
        headers={"Content-Type": "application/json"},
    )


def test_health_ready_and_models(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [server.name]


def test_openai_client_chat_and_completions(server: Server) -> None:
    from openai import OpenAI
    from openai.types.chat import ChatCompletionMessageParam

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the capital of France?"}
    ]
    chat = client.chat.completions.create(
        model=server.name,
        messages=messages,
        max_tokens=12,
        temperature=0,
    )
    answer = chat.choices[0].message.content
    assert answer and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.prompt_tokens > 10
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    stream = client.chat.completions.create(
        model=server.name,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer  # greedy: streaming and not streaming say the same thing
    assert (
        chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    )

    completion = client.completions.create(
        model=server.name, prompt="Once upon a time", max_tokens=10, temperature=0
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 10
    pieces = client.completions.create(
        model=server.name, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text


def test_seed_makes_sampling_reproducible(server: Server) -> None:
    body = {
        "model": server.name,
        "prompt": "My favourite food is",
        "max_tokens": 12,
        "temperature": 1.0,
        "top_p": 0.95,
        "seed": 1234,
    }
    first, second = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
    assert first.status_code == second.status_code == 200
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]


def test_stop_sequence_ends_the_text(server: Server) -> None:
    body = {"model": server.name, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 40, "temperature": 0}
    free = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    assert " 7" in free, free  # the model counts on; otherwise this test would prove nothing
    stopped = post(server, "/v1/completions", {**body, "stop": [" 7"]}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == free[: free.index(" 7")]


BAD_CHAT = [
    ("not json", b"{oops", 400),
    ("not an object", [1, 2], 400),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400),
    ("model wrong type", {"model": 3, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("missing messages", {"model": "M"}, 400),
    ("empty messages", {"model": "M", "messages": []}, 400),
    ("messages not a list", {"model": "M", "messages": "hi"}, 400),
    ("bad role", {"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("content wrong type", {"model": "M", "messages": [{"role": "user", "content": 5}]}, 400),
    (
        "max_tokens over limit",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65},
        400,
    ),
    (
        "max_tokens zero",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        400,
    ),
    (
        "max_tokens string",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"},
        400,
    ),
    (
        "negative temperature",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5},
        400,
    ),
    (
        "absurd temperature",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e9},
        400,
    ),
    (
        "top_p above 1",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5},
        400,
    ),
    (
        "top_p zero",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
        400,
    ),
    (
        "negative seed",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "seed": -1},
        400,
    ),
    (
        "too many stops",
        {
            "model": "M",
            "messages": [{"role": "user", "content": "hi"}],
            "stop": ["a", "b", "c", "d", "e"],
        },
        400,
    ),
    ("n above what the server admits",
     {"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 5}, 400),
    (
        "stream not bool",
        {"model": "M", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
        400,
    ),
]


@pytest.mark.parametrize(("case", "body", "status"), BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_requests_get_openai_errors(
    server: Server, case: str, body: object, status: int
) -> None:
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.name}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == status, (case, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_bad_completion_requests_and_limits(server: Server) -> None:
    cases = [
        ({"model": server.name}, 400),
        ({"model": server.name, "prompt": 42}, 400),
        ({"model": server.name, "prompt": "a " * 9000, "max_tokens": 64}, 400),  # > context
    ]
    for body, status in cases:
        response = post(server, "/v1/completions", body)
        assert response.status_code == status, response.text
    too_big = post(server, "/v1/completions", b'{"prompt": "' + b"x" * 70000 + b'"}')
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    context = post(server, "/v1/completions", cases[2][0]).json()["error"]
    assert context["code"] == "context_length_exceeded"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/chat/completions").json()["error"]["message"]


def test_concurrent_requests_complete_and_overflow_gets_429(server: Server) -> None:
    body = {
        "model": server.name,
        "prompt": "The three primary colours are",
        "max_tokens": 16,
        "temperature": 0,
    }
    expected = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    with ThreadPoolExecutor(4) as pool:  # exactly capacity: 2 running + 2 queued
        answers = list(pool.map(lambda _: post(server, "/v1/completions", body), range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert all(a.json()["choices"][0]["text"] == expected for a in answers)

    slow = {**body, "max_tokens": 64}
    with ThreadPoolExecutor(10) as pool:
        burst = list(pool.map(lambda _: post(server, "/v1/completions", slow), range(10)))
    codes = sorted(r.status_code for r in burst)
    assert 429 in codes and set(codes) <= {200, 429}, codes
    limited = next(r for r in burst if r.status_code == 429).json()["error"]
    assert limited["type"] == "rate_limit_error"
    assert all(r.json()["usage"]["completion_tokens"] == 64 for r in burst if r.status_code == 200)


def test_metrics_count_requests_tokens_errors_and_latency(server: Server) -> None:
    post(server, "/v1/completions", {"model": server.name, "prompt": "Hi", "max_tokens": 3})
    post(server, "/v1/completions", {"model": "nope", "prompt": "Hi"})
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "kubetune_requests_total",
        "kubetune_generated_tokens_total",
        "kubetune_request_errors_total",
        "kubetune_request_latency_seconds_bucket",
        "kubetune_time_to_first_token_seconds_bucket",
    ):
        assert name in text, name
    ttft_count = next(
        line
        for line in text.splitlines()
        if line.startswith("kubetune_time_to_first_token_seconds_count")
    )
    assert float(ttft_count.split()[-1]) >= 1
    assert 'code="model_not_found"' in text


def test_sigterm_lets_a_stream_finish_then_exits() -> None:
    """Readiness goes false at once, new requests are still served through the drain window
    (the Service may still route them here), and the running stream ends on its own."""
    server = Server(exported_model("INT4"), *LIMITS, "--drain-seconds", "20")
    try:
        body = {
            "model": server.name,
            "prompt": "Once upon a time, in a small village by the sea,",
            "max_tokens": 48,
            "temperature": 0,
            "stream": True,
        }
        lines: list[str] = []
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=body, timeout=300
        ) as response:
            iterator = response.iter_lines()
            for line in iterator:  # wait until generation is under way
                lines.append(line)
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    break
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (ready := httpx.get(server.url + "/readyz", timeout=5)).status_code == 200:
                assert time.monotonic() < deadline, "readiness never went false after SIGTERM"
                time.sleep(0.05)  # the signal is handled asynchronously
            assert ready.status_code == 503 and ready.json() == {"status": "draining"}
            late = post(server, "/v1/completions", {"model": server.name, "prompt": "Hi",
                                                    "max_tokens": 2, "temperature": 0})
            assert late.status_code == 200, late.text  # served inside the drain window
            lines.extend(iterator)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        text = "".join(e["choices"][0]["text"] for e in events)
        assert text.strip(), "the prompt must start a stream that is still running at SIGTERM"
        # The stream ran to its own end after SIGTERM: 48 tokens, or an end-of-text before that.
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert server.process.wait(120) == 0
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("pieces", "stop", "expected"),
    [
        (["Hel", "lo", " wor", "ld"], (), "Hello world"),
        (["a", "b", "S", "T", "c"], ("ST",), "ab"),
        (["a", "S", "x"], ("ST",), "aSx"),  # a partial stop that does not complete is released
    ],
)
def test_text_assembler_holds_back_partial_stops(
    pieces: list[str], stop: tuple[str, ...], expected: str
) -> None:
    assembler = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), stop)
    text = "".join(assembler.add(i) for i in range(len(pieces)) if not assembler.stopped)
    assert text + assembler.flush() == expected


def assembled(decode: Callable[[list[int]], str], ids: list[int]) -> str:
    assembler = TextAssembler(decode, ())
    return "".join(assembler.add(token) for token in ids) + assembler.flush()


TEXTS = [
    "Plain words, then 'quotes', tabs\tand\nnew lines.",
    "Accents: déjà vu, naïve façade; CJK: 你好 世界; emoji: 👍🏽 🇫🇷 done.",
    "  leading spaces and trailing ones  ",
]


def test_incremental_text_equals_decoding_all_ids() -> None:
    """Deltas decoded from short windows add up to what decoding every id at once gives."""
    import random

    from tokenizers import SentencePieceBPETokenizer

    from kubetune_trainer.tokenizer import ServingTokenizer

    byte_level = ServingTokenizer.load(exported_model("INT4"))
    rng = random.Random(0)
    cases = [byte_level.encode(text) for text in TEXTS]
    cases += [[rng.randrange(49152) for _ in range(60)] for _ in range(20)]  # split characters
    for ids in cases:
        assert assembled(byte_level.decode, ids) == byte_level.decode(ids)
    # SentencePiece-style decoding drops the leading space of whatever it decodes first.
    metaspace = SentencePieceBPETokenizer()
    metaspace.train_from_iterator(TEXTS * 4, vocab_size=120, show_progress=False)
    for text in TEXTS:
        ids = metaspace.encode(text).ids
        assert assembled(metaspace.decode, ids) == metaspace.decode(ids)


def test_genai_engine_serves_the_same_greedy_text(server: Server) -> None:
    """The default engine (batch) and `--engine genai` give the same greedy text."""
    body = {
        "model": server.name,
        "prompt": "The three primary colours are",
        "max_tokens": 12,
        "temperature": 0,
    }
    batched = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    genai = Server(exported_model("INT4"), *LIMITS, "--engine", "genai")
    try:
        answer = post(genai, "/v1/completions", body).json()
        assert answer["choices"][0]["text"] == batched
        assert answer["usage"]["completion_tokens"] == 12
    finally:
        genai.stop()


def test_sampling_follows_temperature_and_top_p() -> None:
    import numpy as np

    from kubetune_trainer.serve.engines.batch.sampling import sample
    from kubetune_trainer.serve.protocol import GenerationRequest

    def request(temperature: float, top_p: float) -> GenerationRequest:
        return GenerationRequest(
            model="",
            chat=False,
            messages=None,
            prompt="x",
            max_tokens=1,
            temperature=temperature,
            top_p=top_p,
            seed=0,
            stop=(),
            stream=False,
            include_usage=False,
        )

    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    assert sample(logits, request(0, 1.0), rng) == 1
    nucleus = {sample(logits, request(1.0, 0.5), rng) for _ in range(200)}
    assert nucleus == {1}  # token 1 alone holds more than half of the mass
    wide = {sample(logits, request(1.0, 1.0), rng) for _ in range(500)}
    assert {1, 2} <= wide

    # A flat distribution: the 0.9 nucleus holds most of the tokens, none far below the top.
    flat = -np.arange(4000) / 2000
    mass = np.cumsum(np.exp(flat)) / np.exp(flat).sum()
    size = int(np.searchsorted(mass, 0.9)) + 1
    drawn = [sample(flat, request(1.0, 0.9), rng) for _ in range(2000)]
    assert max(drawn) < size and max(drawn) > size * 0.9 > 1000
