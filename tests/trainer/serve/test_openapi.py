"""`/openapi.json` describes every route the app has, its request models accept exactly what
the parser accepts, and anything a client sends through the real app ends in a response below
500 (an OpenAI-shaped error for every 4xx) within a bounded time (no model needed: the engine
renders and tokenizes prompts with the built-in model's tokenizer and echoes them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubetune_trainer.serve.protocol import GenerationRequest, Limits, RequestError
from kubetune_trainer.serve.requests import parse_request
from kubetune_trainer.serve.schema import ErrorResponse, request_models
from kubetune_trainer.serve.server import build_app
from tests.trainer.serve.fakes import EchoEngine, app_with, serving

LIMITS = Limits(max_tokens=64, default_max_tokens=16, context_length=512,
                max_body_bytes=1 << 16, request_timeout_seconds=20)
TIMEOUT = 30  # seconds: a hang fails the test, a slow machine does not


def test_the_document_lists_every_route_the_app_has() -> None:
    app = build_app(Path("/nonexistent"), "m", LIMITS)
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None  # aiohttp adds HEAD to GET
    }
    with serving(app) as url:
        document = httpx.get(url + "/openapi.json").json()
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == documented
    assert document["openapi"].startswith("3.")
    # Every reference resolves to a published schema.
    references = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                references.add(node["$ref"].removeprefix("#/components/schemas/"))
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(document)
    assert references and references <= set(document["components"]["schemas"])
    bounds = document["components"]["schemas"]["CompletionRequest"]["properties"]["max_tokens"]
    assert {"type": "integer", "minimum": 1, "maximum": 64} in bounds["anyOf"]  # the limits


# Bodies close to valid ones, with each field now and then of a wrong type or out of range:
# mostly valid values, so that accepted bodies are common and each refusal has one cause.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8,
)
EDGES: st.SearchStrategy[Any] = st.sampled_from([
    0, -1, 65, 2**63, 10**30, 1.5, -0.0, float("nan"), float("inf"), True, False, None, "1", [], {}
])


def field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly `good`; else a wrong type, an edge value or anything at all."""
    # (one_of would weigh the copies as one branch: it removes duplicates)
    return st.integers(0, 9).flatmap(lambda i: good if i < 8 else EDGES if i == 8 else JSON)


def number(low: float, high: float) -> st.SearchStrategy[Any]:
    return field(st.floats(low, high) | st.integers(int(low), int(high)))


PART = field(st.fixed_dictionaries({"type": field(st.just("text")),
                                    "text": field(st.text(max_size=8))}))
MESSAGE = field(st.fixed_dictionaries(
    {"role": field(st.sampled_from(("system", "user", "assistant"))),
     "content": field(st.text(max_size=12) | st.lists(PART, max_size=2))},
    optional={"name": JSON},
))
OPTIONAL = {
    "max_tokens": field(st.integers(1, 64)), "max_completion_tokens": field(st.integers(1, 64)),
    "temperature": number(0, 2), "top_p": number(0.01, 1), "n": field(st.integers(1, 20)),
    "seed": field(st.integers(0, 2**63 - 1)), "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2), "logprobs": field(st.booleans() | st.integers(0, 6)),
    "top_logprobs": field(st.integers(0, 21)),
    "echo": field(st.just(False)), "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={
        "include_usage": field(st.booleans())})),
    "stop": field(st.text(min_size=1, max_size=4)
                  | st.lists(st.text(min_size=1, max_size=4), max_size=4)),
    "user": JSON, "top_k": JSON,
    "response_format": field(st.sampled_from([
        {"type": "text"}, {"type": "json_object"}, {"type": "xml"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
        {"type": "json_schema", "json_schema": {"schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": None}},
    ])),
    "tools": field(st.just([])), "min_p": JSON, "ignore_eos": JSON,
}
BODIES = st.fixed_dictionaries(
    {
        "model": st.integers(0, 9).flatmap(
            lambda i: st.just("m") if i < 8 else st.just("other") if i == 8 else JSON
        ),
        # Both, always: each endpoint ignores the other's field (a missing one: JSON's null).
        "prompt": field(st.text(max_size=24) | st.lists(st.text(max_size=8), min_size=1,
                                                        max_size=1)),
        "messages": field(st.lists(MESSAGE, min_size=1, max_size=3)),
    },
    optional=OPTIONAL,
)


def parses(body: dict[str, Any], chat: bool) -> bool:
    try:
        parse_request(body, chat, ("m",), LIMITS)
    except RequestError as refused:
        assert 400 <= refused.status < 500, refused
        return False
    return True


# Where the parser and the schema once disagreed: 0 == False in Python, a falsy non-object
# passed for stream_options, and max_tokens went unchecked beside max_completion_tokens.
@example({"model": "m", "prompt": "x", "logprobs": 0}, False)
@example({"model": "m", "prompt": "x", "logprobs": 0}, True)
@example({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
         True)
@example({"model": "m", "prompt": "x", "top_k": False}, False)
@example({"model": "m", "prompt": "x", "ignore_eos": 0}, False)
@example({"model": "m", "prompt": "x", "presence_penalty": 0.5}, False)
@example({"model": "m", "prompt": "x", "echo": 0.0}, False)
@example({"model": "m", "prompt": "x", "stream_options": 0}, False)
@example({"model": "m", "prompt": "x", "stream_options": ""}, False)
@example({"model": "m", "prompt": "x", "max_tokens": "10", "max_completion_tokens": 5}, False)
@example({"model": "m", "prompt": "x", "max_tokens": 10**6, "max_completion_tokens": 5}, False)
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES, st.booleans())
def test_the_published_request_schema_accepts_what_the_parser_accepts(
    body: dict[str, Any], chat: bool
) -> None:
    """The document's models and the parser agree on every body (so neither drifts)."""
    model = request_models(LIMITS)[1 if chat else 0]
    try:
        model.model_validate(body)
        valid = body["model"] == "m"  # a model name the schema cannot know: the parser's 404
    except ValidationError:
        valid = False
    assert parses(body, chat) == valid, body


PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
OTHER = ["/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/v1",
         "/v1/completions/x", "/v1/embeddings", "/%2e%2e/etc", "/v1/models?x=1"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
CONTENT_TYPES = [None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/json; charset=latin-1"]


def encoded(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


RAW = (
    BODIES.map(encoded)
    | JSON.map(encoded)
    | st.binary(max_size=64)
    | st.sampled_from([
        b"[" * 100_000, b'{"model": "m", "seed": ' + b"9" * 5000 + b"}", b"", b"null",
        b'{"model": "m", "prompt": "' + b"x" * 70_000 + b'"}',  # over the body limit
        b'{"model": "m", "prompt": "' + "\u00e9 ".encode() * 4000 + b'"}',  # over the context
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
        b'{"model": "m", "prompt": "hi", "stop": ["' + b"z" * 20_000 + b'"]}',
        b'{"model": "m", "prompt": "hi", "temperature": NaN}',
        b'{"model": "m", "prompt": "hi", "max_tokens": 1e400}',
    ])
)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(app_with(EchoEngine(LIMITS), LIMITS)) as url:
        yield url


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400 and response.request.method != "HEAD":
        ErrorResponse.model_validate_json(response.content)  # OpenAI's error shape


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PATHS), RAW, st.sampled_from(CONTENT_TYPES))
def test_any_body_gets_an_answer_below_500(
    server: str, path: str, body: bytes, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = httpx.post(server + path, content=body, headers=headers, timeout=TIMEOUT)
    check(response)
    if response.status_code == 200 and response.headers["Content-Type"].startswith("text/event"):
        assert response.text.rstrip().endswith("data: [DONE]")


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PATHS + OTHER), st.sampled_from(METHODS), st.binary(max_size=32))
def test_any_method_on_any_path_gets_an_answer_below_500(
    server: str, path: str, method: str, body: bytes
) -> None:
    check(httpx.request(method, server + path, content=body, timeout=TIMEOUT))


class BrokenEngine(EchoEngine):
    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        raise RuntimeError("a bug")


def test_a_server_bug_is_a_json_500_not_a_plain_text_page() -> None:
    with serving(app_with(BrokenEngine(LIMITS), LIMITS)) as url:
        response = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "hi"},
                              timeout=TIMEOUT)
    assert response.status_code == 500
    error = ErrorResponse.model_validate_json(response.content).error
    assert error.type == "server_error" and error.code == "internal_error"
