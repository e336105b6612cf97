"""The OpenAI surface beyond a plain completion, on a real server process over real HTTP:
`/tokenize` and `/detokenize`, the metrics an autoscaler reads, and log-probabilities."""

from __future__ import annotations

import json
import math
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


# ------------------------------------------------------------------------- logprobs


def chat_logprobs(server: Server, stream: bool = False, **extra: object) -> dict:
    body = {"model": server.name, "messages": [{"role": "user", "content": "Name a fruit."}],
            "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 3,
            "stream": stream, **extra}
    if not stream:
        answer = post(server, "/v1/chat/completions", body)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]
    content, entries = "", []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                content += choice["delta"].get("content") or ""
                entries += (choice["logprobs"] or {}).get("content", [])
    return {"message": {"content": content}, "logprobs": {"content": entries}}


def test_the_openai_client_reads_chat_logprobs(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=16, temperature=0, logprobs=True, top_logprobs=3,
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert answer.usage is not None
    generated = answer.usage.completion_tokens - (choice.finish_reason == "stop")  # not the EOS
    assert len(entries) == generated
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        alternatives = [a.logprob for a in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert sum(math.exp(a) for a in alternatives) <= 1 + 1e-5
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(alternatives[0], abs=1e-6) and entry.logprob <= 0
        assert bytes(entry.bytes or []).decode() == entry.token
    streamed = chat_logprobs(server, stream=True)
    assert streamed["message"]["content"] == choice.message.content
    assert [e["token"] for e in streamed["logprobs"]["content"]] == [e.token for e in entries]


def test_completions_logprobs_line_up_with_the_text(server: Server) -> None:
    body = {"model": server.name, "prompt": "The sky is", "max_tokens": 12, "temperature": 0,
            "logprobs": 2}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 12
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    offsets = [0]
    for token in logprobs["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs["text_offset"] == offsets
    for token, chosen, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                  logprobs["top_logprobs"], strict=True):
        assert top[token] == pytest.approx(chosen)  # greedy: the best alternative
    plain = post(server, "/v1/completions", {**body, "logprobs": None}).json()["choices"][0]
    assert plain["logprobs"] is None and plain["text"] == choice["text"]


def test_sampled_tokens_report_their_own_logprob(server: Server) -> None:
    choice = chat_logprobs(server, temperature=1.5, seed=11, max_tokens=24)
    entries = choice["logprobs"]["content"]
    assert entries and any(e["token"] != e["top_logprobs"][0]["token"] for e in entries)
    for entry in entries:
        assert entry["logprob"] <= entry["top_logprobs"][0]["logprob"] + 1e-6


def test_both_engines_report_the_same_logprobs() -> None:
    """The batch engine's log-softmax of its own session's logits and the genai engine's of
    onnxruntime-genai's agree: two independent paths to the same numbers."""
    genai = Server(exported_model("INT4"), *LIMITS, "--engine", "genai")
    batch = Server(exported_model("INT4"), *LIMITS)
    try:
        answers = [chat_logprobs(s)["logprobs"]["content"] for s in (batch, genai)]
    finally:
        genai.stop()
        batch.stop()
    assert answers[0] and [e["token"] for e in answers[0]] == [e["token"] for e in answers[1]]
    for ours, theirs in zip(*answers, strict=True):
        assert ours["logprob"] == pytest.approx(theirs["logprob"], abs=2e-3)
        assert [a["token"] for a in ours["top_logprobs"]][:1] == [
            a["token"] for a in theirs["top_logprobs"]][:1]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_logprobs_requests_are_400s_naming_the_field(
    server: Server, body: dict, param: str
) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    answer = post(server, path, {"model": server.name, **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


# ------------------------------------------------------------------------------ n > 1


def test_n_answers_sampled_apart_and_reproducible_with_a_seed(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    def ask() -> object:
        return client.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "Tell me a word."}],
            max_tokens=12, temperature=1.2, seed=5, n=3,
        )

    answer, again = ask(), ask()
    texts = [c.message.content for c in answer.choices]  # type: ignore[attr-defined]
    assert [c.index for c in answer.choices] == [0, 1, 2]  # type: ignore[attr-defined]
    assert len(set(texts)) > 1  # each answer its own sample
    assert texts == [c.message.content for c in again.choices]  # type: ignore[attr-defined]
    # Answer i is the single answer with seed 5 + i; the prompt is billed once.
    singles = [post(server, "/v1/chat/completions", {
        "model": server.name, "messages": [{"role": "user", "content": "Tell me a word."}],
        "max_tokens": 12, "temperature": 1.2, "seed": 5 + i}).json() for i in range(3)]
    assert [s["choices"][0]["message"]["content"] for s in singles] == texts
    usage = answer.usage  # type: ignore[attr-defined]
    assert usage.prompt_tokens == singles[0]["usage"]["prompt_tokens"]
    assert usage.completion_tokens == sum(s["usage"]["completion_tokens"] for s in singles)


def test_n_streams_every_answer_with_usage_at_the_end(server: Server) -> None:
    body = {"model": server.name, "prompt": "Once upon a time", "max_tokens": 10,
            "temperature": 0, "n": 2, "stream": True, "stream_options": {"include_usage": True},
            "logprobs": 1}
    texts, finishes, tokens = ["", ""], [None, None], [[], []]
    usage = None
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
                continue
            choice = event["choices"][0]
            texts[choice["index"]] += choice["text"]
            finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
            tokens[choice["index"]] += (choice["logprobs"] or {}).get("tokens", [])
    whole = post(server, "/v1/completions", {**body, "stream": False, "n": 1}).json()
    assert texts == [whole["choices"][0]["text"]] * 2  # greedy: both answers alike
    assert finishes == ["length", "length"]
    assert ["".join(t) for t in tokens] == texts
    assert usage is not None and usage["completion_tokens"] == 20
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"]


def test_more_answers_than_the_server_admits_is_a_400(server: Server) -> None:
    answer = post(server, "/v1/completions", {"model": server.name, "prompt": "x", "n": 5})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "n"
