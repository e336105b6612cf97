"""`--api-key` (or KUBETUNE_API_KEY): every route but the probes and `/metrics` needs
`Authorization: Bearer <key>`, a missing or wrong one gets a 401 in OpenAI's error shape, and
`/v1/models` shows names, never a path on the server or the key.

The real app on loopback with an engine that echoes the prompt (no model needed)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp import web

from kubetune.api.dataplane import API_KEY_ENV
from kubetune_trainer.serve.http import authorized
from kubetune_trainer.serve.protocol import Limits
from kubetune_trainer.serve.schema import ErrorResponse
from kubetune_trainer.serve.server import build_app, parse_options
from kubetune_trainer.serve.state import STATE
from tests.trainer.serve.fakes import EchoEngine, serving

LIMITS = Limits(max_tokens=16, default_max_tokens=4, context_length=512,
                request_timeout_seconds=20)
KEY = "kt-test-0123456789abcdef"
ADAPTER_DIR = Path("/srv/models/team-a/gen-3/adapter")
"""Where the adapter lies on the server: a client must never see it."""
TIMEOUT = 30

PROTECTED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/openapi.json", None),
]
OPEN = ["/healthz", "/readyz", "/metrics"]


def app_serving(api_key: str | None) -> web.Application:
    app = build_app(Path("/nonexistent"), "m", LIMITS, adapters={"wide": ADAPTER_DIR},
                    api_key=api_key)
    app[STATE].engine = EchoEngine(LIMITS)  # type: ignore[assignment]
    return app


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(app_serving(KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def open_server() -> Iterator[str]:
    with serving(app_serving(None)) as url:
        yield url


def call(url: str, method: str, path: str, body: object, **headers: str) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers=headers, timeout=TIMEOUT)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.status_code, response.text[:300])
    error = ErrorResponse.model_validate_json(response.content).error  # OpenAI's shape
    assert error.type == "invalid_request_error" and error.code == "invalid_api_key"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert KEY not in response.text


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_every_api_route_refuses_a_request_without_the_key(
    server: str, method: str, path: str, body: object
) -> None:
    assert_refused(call(server, method, path, body))


@pytest.mark.parametrize("header", [
    "Bearer wrong-key",
    f"Bearer {KEY}x",  # the key is a prefix of what was sent
    f"Bearer {KEY[:-1]}",  # what was sent is a prefix of the key
    f"Basic {KEY}",  # another scheme
    KEY,  # no scheme
    "Bearer",  # no credential
    "Bearer caf\u00e9",  # not ASCII: compared as bytes, no crash
])
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED[:3])
def test_a_wrong_key_is_refused(
    server: str, method: str, path: str, body: object, header: str
) -> None:
    request = httpx.Request(method, server + path, json=body,
                            headers={"Authorization": header.encode()})
    assert_refused(httpx.Client(timeout=TIMEOUT).send(request))


def test_an_unknown_path_without_the_key_is_refused_too(server: str) -> None:
    """Without the key a client learns nothing, not even which routes exist."""
    assert_refused(call(server, "GET", "/v1/embeddings", None))
    assert call(server, "GET", "/v1/embeddings", None,
                Authorization=f"Bearer {KEY}").status_code == 404


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_the_right_key_is_served(server: str, method: str, path: str, body: object) -> None:
    response = call(server, method, path, body, Authorization=f"Bearer {KEY}")
    assert response.status_code == 200, response.text[:300]


def test_the_scheme_is_case_insensitive(server: str) -> None:
    """RFC 9110: the auth scheme is case-insensitive; the key is not."""
    assert call(server, "GET", "/v1/models", None,
                Authorization=f"bearer {KEY}").status_code == 200
    assert_refused(call(server, "GET", "/v1/models", None,
                        Authorization=f"Bearer {KEY.upper()}"))


@pytest.mark.parametrize("path", OPEN)
def test_probes_and_metrics_need_no_key(server: str, path: str) -> None:
    """The kubelet's probes and Prometheus send no Authorization header."""
    assert httpx.get(server + path, timeout=TIMEOUT).status_code == 200
    assert httpx.head(server + path, timeout=TIMEOUT).status_code == 200


def test_the_openai_client_sends_the_key(server: str) -> None:
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    assert [model.id for model in client.models.list()] == ["m", "wide"]
    completion = client.completions.create(model="wide", prompt="hello", max_tokens=2)
    assert completion.choices[0].text
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="not-it", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.models.list()
    assert raised.value.code == "invalid_api_key"


@pytest.mark.parametrize("fixture", ["server", "open_server"])
def test_models_show_names_not_server_paths_nor_the_key(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(fixture)
    response = call(url, "GET", "/v1/models", None, Authorization=f"Bearer {KEY}")
    listing = response.json()
    assert str(ADAPTER_DIR) not in response.text and "/srv/" not in response.text
    assert KEY not in response.text
    base, adapter = listing["data"]
    assert base["id"] == "m" and base["object"] == "model"
    # vLLM's shape: an adapter names its base as `parent`; its `root` is a name here.
    assert adapter == {**adapter, "id": "wide", "parent": "m", "root": "wide"}


def test_without_a_key_nothing_asks_for_one(open_server: str) -> None:
    for method, path, body in PROTECTED:
        assert call(open_server, method, path, body).status_code == 200, path


def test_the_key_never_reaches_the_log(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        call(server, "GET", "/v1/models", None, Authorization=f"Bearer {KEY}x")
        call(server, "GET", "/v1/models", None, Authorization=f"Bearer {KEY}")
        build_app(Path("/nonexistent"), "m", LIMITS, api_key=KEY)
    assert KEY not in caplog.text


def test_authorized_compares_the_whole_bearer_credential() -> None:
    assert authorized(f"Bearer {KEY}", KEY)
    assert authorized(f"BEARER   {KEY}", KEY)  # scheme in any case, spaces between
    for header in (None, "", "Bearer", f"Token {KEY}", f"Bearer {KEY}{KEY}", f"Bearer\t{KEY}x",
                   f"Bearer {KEY} x"):
        assert not authorized(header, KEY), header


# ----------------------------------------------------------------------- where the key comes from


def test_the_key_comes_from_the_flag_or_else_the_environment() -> None:
    model = ["--model", "/m"]
    assert parse_options(model, {}).api_key is None
    assert parse_options(model, {API_KEY_ENV: KEY}).api_key == KEY
    # A Secret written with a trailing newline: HTTP cannot carry it, so it is not the key's.
    assert parse_options(model, {API_KEY_ENV: KEY + "\n"}).api_key == KEY
    assert parse_options([*model, "--api-key", "flag-key"], {API_KEY_ENV: KEY}).api_key == (
        "flag-key"
    )


@pytest.mark.parametrize(("argv", "environ"), [
    (["--api-key", ""], {}),
    ([], {API_KEY_ENV: ""}),  # an empty Secret must not turn authentication off
    ([], {API_KEY_ENV: "  \n"}),
    (["--api-key", "two words"], {}),
    (["--api-key", "caf\u00e9-key"], {}),
])
def test_a_key_no_client_could_send_stops_the_server(
    argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_options(["--model", "/m", *argv], environ)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "--api-key" in error and API_KEY_ENV in error
    assert "caf\u00e9" not in error and "two words" not in error  # never echoed


def test_the_document_says_which_routes_need_the_key(server: str, open_server: str) -> None:
    document = call(server, "GET", "/openapi.json", None, Authorization=f"Bearer {KEY}").json()
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for operation in item.values():
            if path in OPEN:
                assert "security" not in operation, path
            else:
                assert operation["security"] == [{"apiKey": []}], path
                assert "401" in operation["responses"], path
    plain = call(open_server, "GET", "/openapi.json", None).json()
    assert "securitySchemes" not in plain["components"]


def test_kubetune_runs_client_sends_the_key_its_server_asks_for(server: str) -> None:
    from kubetune.local.evaluate import chat
    from kubetune.local.serve import inherited_api_key

    question = [{"role": "user", "content": "hi"}]
    assert chat(server + "/v1", "m", question, max_tokens=2, api_key=KEY)
    with pytest.raises(RuntimeError, match="HTTP 401"):
        chat(server + "/v1", "m", question, max_tokens=2)
    # The local server inherits the environment: its clients read the key from there too.
    assert inherited_api_key({API_KEY_ENV: KEY + "\n"}) == KEY
    assert inherited_api_key({}) is None
