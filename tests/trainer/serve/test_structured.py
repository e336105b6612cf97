"""Structured output: `response_format` is compiled when the request arrives (a bad or
unsupported schema is a 400 that says what is wrong), and the answer of a real server process,
either engine, batched beside free-text requests, always parses and validates against it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest

from kubetune_trainer.builtin import builtin_model_dir
from kubetune_trainer.serve.protocol import Limits, RequestError
from kubetune_trainer.serve.requests import parse_request
from kubetune_trainer.serve.structured import Grammars, grammar_for
from kubetune_trainer.tokenizer import ServingTokenizer
from tests.trainer.export.test_export import exported_model
from tests.trainer.serve.test_serve import LIMITS, Server, post

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "capital": {"type": "boolean"}},
    "required": ["city", "capital"],
    "additionalProperties": False,
}


def json_schema(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


# ------------------------------------------------------------------------- the request


def refusal(response_format: Any) -> RequestError:
    body = {"model": "m", "prompt": "x", "response_format": response_format}
    with pytest.raises(RequestError) as refused:
        parse_request(body, False, ("m",), Limits())
    return refused.value


@pytest.mark.parametrize(
    ("response_format", "param", "code", "says"),
    [
        (json_schema({"type": "strin"}), "response_format.json_schema.schema",
         "unsupported_schema", "strin"),
        (json_schema({"type": "string", "pattern": "(?=a)b"}),
         "response_format.json_schema.schema", "unsupported_schema", "look-around"),
        (json_schema({"$ref": "#/definitions/missing"}), "response_format.json_schema.schema",
         "unsupported_schema", "missing"),
        ({"type": "xml"}, "response_format.type", "invalid_value", "json_schema"),
        ({"type": "json_schema"}, "response_format.json_schema", "invalid_value", "name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
         "response_format.json_schema.schema", "invalid_value", "schema"),
        ("json", "response_format", "invalid_value", "object"),
    ],
)
def test_a_bad_or_unsupported_format_is_a_400_saying_what(
    response_format: Any, param: str, code: str, says: str
) -> None:
    error = refusal(response_format)
    assert (error.status, error.param, error.code) == (400, param, code)
    assert says in error.message


def test_the_formats_that_constrain_carry_a_grammar_and_text_does_not() -> None:
    def grammar(response_format: Any) -> str | None:
        body = {"model": "m", "prompt": "x", "response_format": response_format}
        return parse_request(body, False, ("m",), Limits()).grammar

    assert grammar(None) is None and grammar({"type": "text"}) is None
    assert grammar({"type": "json_object"}) and grammar(json_schema(PERSON))
    # OpenAI's `schema` is optional: then any JSON value is the constraint.
    assert grammar({"type": "json_schema", "json_schema": {"name": "any"}})
    assert grammar_for(json_schema(PERSON)) == grammar_for(json_schema(PERSON))  # pure


# ---------------------------------------------------------------- the constraint alone


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    model = builtin_model_dir("smollm2-135m-instruct")
    tokenizer = ServingTokenizer.load(model)
    return Grammars(model / "tokenizer.json", 49152, tokenizer.eos_token_id)


@pytest.mark.parametrize("seed", range(8))
def test_sampling_from_noise_through_the_mask_yields_a_valid_document(
    grammars: Grammars, seed: int
) -> None:
    """Whatever the model would say (here: random logits, so every allowed token is tried
    somewhere), the tokens the mask lets through spell a document the schema accepts."""
    rng = np.random.default_rng(seed)
    constraint = grammars.constraint(grammar_for(json_schema(PERSON)))
    assert constraint is not None
    tokens: list[int] = []
    while not constraint.complete and len(tokens) < 300:
        logits = rng.normal(size=49152).astype(np.float32) * 4
        constraint.mask(logits)
        assert np.isfinite(logits).sum() >= 1  # something is always allowed
        probabilities = np.exp(logits - logits.max())
        token = int(rng.choice(len(logits), p=probabilities / probabilities.sum()))
        tokens.append(token)
        constraint.advance(token)
    assert constraint.complete, len(tokens)
    tokenizer = ServingTokenizer.load(builtin_model_dir("smollm2-135m-instruct"))
    document = json.loads(tokenizer.decode(tokens))
    jsonschema.validate(document, PERSON)


# ------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server(exported_model("INT4"), *LIMITS[:2], "--max-concurrency", "4",
                     "--max-queue", "8")
    yield running
    running.stop()


def chat_body(server: Server, question: str, response_format: Any, **extra: Any) -> dict:
    return {
        "model": server.name,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 64,
        "temperature": 0,
        "response_format": response_format,
        **extra,
    }


def test_the_openai_client_gets_json_that_validates(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model=server.name,
        messages=[{"role": "user", "content": "Describe a person who has pets, as JSON."}],
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    content = answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop" and content
    jsonschema.validate(json.loads(content), PERSON)

    stream = client.chat.completions.create(
        model=server.name,
        messages=[{"role": "user", "content": "Describe a person who has pets, as JSON."}],
        max_tokens=64,
        temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content


def test_json_object_and_completions_and_sampling_all_parse(server: Server) -> None:
    chat = post(server, "/v1/chat/completions",
                chat_body(server, "Tell me about Paris.", {"type": "json_object"}))
    assert chat.status_code == 200, chat.text
    assert isinstance(json.loads(chat.json()["choices"][0]["message"]["content"]), dict)

    for seed in range(3):
        completion = post(server, "/v1/completions", {
            "model": server.name, "prompt": "The city of", "max_tokens": 48,
            "temperature": 1.0, "seed": seed, "response_format": json_schema(CITY),
        })
        assert completion.status_code == 200, completion.text
        choice = completion.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), CITY)


def test_constrained_and_free_requests_share_the_batch(server: Server) -> None:
    """Two schemas and free text at once, several times over: each answer keeps its own
    constraint (a mask applied to the wrong row would break one of them), and the free text is
    the same as when it ran alone."""
    free = chat_body(server, "Name three colours.", None, max_tokens=24)
    alone = post(server, "/v1/chat/completions", free).json()["choices"][0]["message"]
    bodies = [
        chat_body(server, "Describe a person who has pets, as JSON.", json_schema(PERSON)),
        chat_body(server, "Which city is the capital of France?", json_schema(CITY)),
        free,
        chat_body(server, "Describe another person, as JSON.", json_schema(PERSON),
                  temperature=0.8, seed=7),
    ] * 2
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(server, "/v1/chat/completions", b), bodies))
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status_code == 200, answer.text
        content = answer.json()["choices"][0]["message"]["content"]
        if body["response_format"] is None:
            assert content == alone["content"]
        else:
            schema = body["response_format"]["json_schema"]["schema"]
            jsonschema.validate(json.loads(content), schema)


def test_running_out_of_tokens_mid_document_says_length(server: Server) -> None:
    answer = post(server, "/v1/chat/completions",
                  chat_body(server, "Describe a person, as JSON.", json_schema(PERSON),
                            max_tokens=3))
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["finish_reason"] == "length"


def test_an_unsupported_schema_is_refused_over_http(server: Server) -> None:
    answer = post(server, "/v1/chat/completions",
                  chat_body(server, "x", json_schema({"type": "object", "properties": {
                      "a": {"type": "string", "pattern": "(?<=x)y"}}})))
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "unsupported_schema" and "look-around" in error["message"]
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_the_genai_engine_enforces_the_schema_too() -> None:
    genai = Server(exported_model("INT4"), *LIMITS, "--engine", "genai")
    try:
        for body in (
            chat_body(genai, "Describe a person who has pets, as JSON.", json_schema(PERSON)),
            chat_body(genai, "Which city is the capital of France?", json_schema(CITY),
                      temperature=1.0, seed=3),
        ):
            answer = post(genai, "/v1/chat/completions", body)
            assert answer.status_code == 200, answer.text
            choice = answer.json()["choices"][0]
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]),
                                body["response_format"]["json_schema"]["schema"])
    finally:
        genai.stop()
