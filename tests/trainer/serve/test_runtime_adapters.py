"""Adapters that change while the server runs (`--enable-runtime-lora`): loaded, replaced and
unloaded under traffic, with no failed request, each answer that of the adapter its request
started on (the exact FP32 references of test_adapters: each adapter's merged export); the
set a pool's ConfigMap gives a replica at start (`--lora-modules-file`); refusals by name."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubetune_trainer.serve.protocol import Limits
from kubetune_trainer.serve.server import build_app, parse_options
from tests.trainer.export.test_export import exported_model
from tests.trainer.serve.fakes import serving
from tests.trainer.serve.test_adapters import (
    PROMPTS,
    TOKENS,
    adapter_runs,  # noqa: F401  (the module-scoped fixture)
    complete,
    greedy_text,
    merged_export,
    q_proj,
    write_adapter,
)
from tests.trainer.serve.test_serve import Server, post

LONG = 48  # tokens of the answer that is in flight while its adapter is replaced


@pytest.fixture(scope="module")
def references(adapter_runs: dict[str, Path]) -> dict[tuple[str, str, int], str]:  # noqa: F811
    """Each adapter's merged model's greedy answer: (adapter, prompt, tokens) -> text."""
    found = {}
    for name, run in adapter_runs.items():
        for prompt in PROMPTS:
            found[(name, prompt, TOKENS)] = greedy_text(merged_export(run), prompt, TOKENS)
        found[(name, PROMPTS[2], LONG)] = greedy_text(merged_export(run), PROMPTS[2], LONG)
    return found


@pytest.fixture(scope="module")
def dora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("dora") / "dora", {"use_dora": True}, q_proj())


@pytest.fixture(scope="module")
def server(
    adapter_runs: dict[str, Path],  # noqa: F811
    dora: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """Started with `b` (the `wide` adapter) and a DoRA adapter in its set file: the DoRA one
    is skipped, `b` served; runtime loading on."""
    adapter_set = tmp_path_factory.mktemp("set") / "adapters.json"
    adapter_set.write_text(json.dumps({"adapters": [
        {"name": "b", "path": str(adapter_runs["wide"] / "adapter")},
        {"name": "bad", "path": str(dora)},
    ]}))
    limits = ["--max-tokens", "64", "--max-concurrency", "6"]
    running = Server(exported_model("FP32"), *limits, "--lora-modules-file", str(adapter_set),
                     "--enable-runtime-lora")
    yield running
    running.stop()


def load(server: Server, name: str, path: Path) -> httpx.Response:
    return post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


def served_models(server: Server) -> list[str]:
    return [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]


def stream(server: Server, model: str, prompt: str, tokens: int) -> Iterator[str]:
    """A streamed greedy completion's text deltas, as they arrive."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            yield chunk["choices"][0]["text"]


def test_the_set_file_is_served_from_the_start_and_a_bad_adapter_in_it_is_skipped(
    server: Server, references: dict[tuple[str, str, int], str]
) -> None:
    assert served_models(server) == [server.name, "b"]
    assert complete(server, "b", PROMPTS[0]) == references[("wide", PROMPTS[0], TOKENS)]


def test_load_replace_and_unload_under_a_stream_that_never_fails(
    server: Server,
    adapter_runs: dict[str, Path],  # noqa: F811
    references: dict[tuple[str, str, int], str],
) -> None:
    """A client streams from `b` the whole time; meanwhile `a` is loaded (as `narrow`),
    replaced (by `wide`) while one of its answers is in flight, and unloaded."""
    stop = threading.Event()
    b_answers: list[str] = []
    failures: list[BaseException] = []

    def stream_b() -> None:
        try:
            while not stop.is_set():
                for prompt in PROMPTS:
                    b_answers.append("".join(stream(server, "b", prompt, TOKENS)))
        except BaseException as error:  # reported below, in the test's thread
            failures.append(error)

    client = threading.Thread(target=stream_b)
    client.start()
    try:
        loaded = load(server, "a", adapter_runs["narrow"] / "adapter")
        assert loaded.status_code == 200, loaded.text
        assert loaded.json() == {"lora_name": "a", "status": "loaded"}
        assert served_models(server) == [server.name, "b", "a"]
        for prompt in PROMPTS:
            assert complete(server, "a", prompt) == references[("narrow", prompt, TOKENS)]

        # An answer from `a` begins, then `a` is replaced: that answer ends as it began.
        in_flight = stream(server, "a", PROMPTS[2], LONG)
        first = next(in_flight)
        replaced = load(server, "a", adapter_runs["wide"] / "adapter")
        assert replaced.status_code == 200, replaced.text
        assert replaced.json()["status"] == "replaced"
        assert first + "".join(in_flight) == references[("narrow", PROMPTS[2], LONG)]
        for prompt in PROMPTS:  # every request after the 200: the new weights
            assert complete(server, "a", prompt) == references[("wide", prompt, TOKENS)]

        unloaded = post(server, "/v1/unload_lora_adapter", {"lora_name": "a"})
        assert unloaded.status_code == 200, unloaded.text
        assert served_models(server) == [server.name, "b"]
        gone = post(server, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
        assert gone.status_code == 404 and "'a'" in gone.json()["error"]["message"]
    finally:
        stop.set()
        client.join(300)
    assert not failures, failures
    assert len(b_answers) >= len(PROMPTS)
    expected = [references[("wide", PROMPTS[i % len(PROMPTS)], TOKENS)]
                for i in range(len(b_answers))]
    assert b_answers == expected


def test_a_bad_adapter_is_refused_naming_why_and_the_rest_keep_serving(
    server: Server,
    dora: Path,
    tmp_path: Path,
    references: dict[tuple[str, str, int], str],
) -> None:
    refusals = {
        "DoRA": load(server, "c", dora),
        "does not exist": load(server, "c", tmp_path / "nowhere"),
        "takes 960 features but the base model's hidden size is 576": load(
            server, "c", write_adapter(tmp_path / "shape", {}, q_proj(features=960))
        ),
    }
    for reason, refused in refusals.items():
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert "adapter 'c'" in error["message"] and reason in error["message"], error
    base = load(server, server.name, dora)
    assert base.status_code == 400 and "base model's own name" in base.text
    missing = post(server, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"})
    assert missing.status_code == 404 and "'never-loaded'" in missing.json()["error"]["message"]
    empty = post(server, "/v1/load_lora_adapter", {"lora_name": "c"})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "lora_path"
    assert served_models(server) == [server.name, "b"]
    assert complete(server, "b", PROMPTS[1]) == references[("wide", PROMPTS[1], TOKENS)]


def test_the_routes_are_off_unless_enabled_and_need_the_api_key() -> None:
    body = {"lora_name": "a", "lora_path": "/x"}
    with serving(build_app(Path("/nonexistent"), "m", Limits())) as url:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            off = httpx.post(url + path, json=body)
            assert off.status_code == 404, off.text
            assert "--enable-runtime-lora" in off.json()["error"]["message"]
    app = build_app(Path("/nonexistent"), "m", Limits(), api_key="k3y", runtime_lora=True)
    with serving(app) as url:
        assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == 401
        keyed = httpx.post(url + "/v1/load_lora_adapter", json=body,
                           headers={"Authorization": "Bearer k3y"})
        assert keyed.status_code == 503  # past the key: the model is not loaded here


def test_runtime_lora_and_the_set_file_come_from_flags_or_the_environment() -> None:
    assert not parse_options(["--model", "m"], {}).enable_runtime_lora
    assert parse_options(["--model", "m"], {"KUBETUNE_RUNTIME_LORA": "1"}).enable_runtime_lora
    assert parse_options(["--model", "m", "--enable-runtime-lora"], {}).enable_runtime_lora
    environ = {"KUBETUNE_SERVE_LORA_MODULES_FILE": "/etc/set.json"}
    assert parse_options(["--model", "m"], environ).lora_modules_file == Path("/etc/set.json")
    assert parse_options(["--model", "m"], {}).lora_modules_file is None


def test_a_set_file_that_is_not_an_adapter_set_stops_the_server_naming_it(tmp_path: Path) -> None:
    from kubetune_trainer.serve.server import load_adapters

    model = exported_model("INT4")
    wrong = tmp_path / "set.json"
    wrong.write_text(json.dumps({"adapters": [{"name": "a"}]}))
    with pytest.raises(SystemExit, match=r"set.json is not an AdapterSet: adapters.0.path"):
        load_adapters([], "base", "batch", model, wrong)
    with pytest.raises(SystemExit, match=r"nowhere\.json"):
        load_adapters([], "base", "batch", model, tmp_path / "nowhere.json")
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"adapters": [{"name": "a", "path": "/x"}]}))
    with pytest.raises(SystemExit, match=r"given twice: \['a'\]"):
        load_adapters(["a=/y"], "base", "batch", model, twice)
