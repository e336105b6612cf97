"""The OpenAI surface beyond a plain completion, on a real server process over real HTTP:
`/tokenize` and `/detokenize`, and the metrics an autoscaler reads."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.trainer.export.test_export import exported_model
from tests.trainer.serve.test_serve import LIMITS, Server, post


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server(exported_model("INT4"), *LIMITS)
    yield running
    running.stop()


def test_tokenize_counts_what_a_completion_will_bill(server: Server) -> None:
    prompt = "Tokens, counted: naïve café 🙂"
    tokens = post(server, "/tokenize", {"model": server.name, "prompt": prompt}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 5
    assert tokens["max_model_len"] > 0
    completion = post(server, "/v1/completions",
                      {"model": server.name, "prompt": prompt, "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == tokens["count"]
    back = post(server, "/detokenize", {"model": server.name, "tokens": tokens["tokens"]})
    assert back.json() == {"prompt": prompt}

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat_tokens = post(server, "/tokenize", {"messages": messages}).json()  # model: optional
    chat = post(server, "/v1/chat/completions",
                {"model": server.name, "messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == chat_tokens["count"]
    without = post(server, "/tokenize",
                   {"messages": messages, "add_generation_prompt": False}).json()
    assert without["count"] < chat_tokens["count"]  # the assistant's header is the difference
    assert chat_tokens["tokens"][: without["count"]] == without["tokens"]


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, "2"]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, True]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
])
def test_bad_token_requests_get_openai_errors(
    server: Server, path: str, body: dict, status: int, param: str
) -> None:
    answer = post(server, path, body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(name + " ") or line.startswith(name + "{"))


def test_metrics_an_autoscaler_reads(server: Server) -> None:
    before = httpx.get(server.url + "/metrics").text
    assert metric(before, "kubetune_kv_cache_usage_ratio") == 0
    gaps_before = metric(before, "kubetune_inter_token_latency_seconds_count")

    body = {"model": server.name, "prompt": "Once upon a time", "max_tokens": 64,
            "temperature": 0, "stream": True}
    during: list[str] = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as stream:
        for line in stream.iter_lines():  # scrape mid-stream: it holds cache and a slot
            if line.startswith("data: {") and not during:
                during.append(httpx.get(server.url + "/metrics").text)
    assert during
    assert metric(during[0], "kubetune_requests_running") == 1
    assert 0 < metric(during[0], "kubetune_kv_cache_usage_ratio") < 1

    after = httpx.get(server.url + "/metrics").text
    assert metric(after, "kubetune_kv_cache_usage_ratio") == 0
    assert metric(after, "kubetune_requests_running") == 0
    # 64 tokens, no end-of-sequence: 63 gaps between them, each observed once.
    assert metric(after, "kubetune_inter_token_latency_seconds_count") - gaps_before == 63
    assert metric(after, "kubetune_inter_token_latency_seconds_sum") > 0


def test_waiting_requests_show_in_the_metrics(server: Server) -> None:
    """Two running (max-concurrency 2) and two queued: the autoscaler's signal."""
    body = {"model": server.name, "prompt": "Count to a hundred:", "max_tokens": 64,
            "temperature": 0}
    threads = [threading.Thread(target=post, args=(server, "/v1/completions", body))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    seen = []
    while any(thread.is_alive() for thread in threads):  # bounded by the requests' own end
        text = httpx.get(server.url + "/metrics").text
        seen.append((metric(text, "kubetune_requests_running"),
                     metric(text, "kubetune_requests_waiting")))
        if seen[-1] == (2, 2):
            break
    for thread in threads:
        thread.join()
    assert (2, 2) in seen, seen[-5:]
