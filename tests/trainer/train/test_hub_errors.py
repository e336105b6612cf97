"""Hub failures: what retrying cannot fix exits 2 naming the source; the network stays retryable
(issue 28, item 9).

There is no internet here. The Hub's answers are played by an HTTP transport installed with
huggingface_hub's own `set_client_factory`, so huggingface_hub turns each answer into the
exception it raises in production (`hf_raise_for_status`, its retries, `hf_hub_download`'s
fallbacks) and transformers wraps it as it does for a real Hub; the trainer's `main` then
maps it to an exit code and report.json. The offline cases use no fake at all.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.dataplane import CONFIG_ERROR_EXIT_CODE
from kubetune_trainer.train import run as train
from tests.trainer.conftest import run_config

MODEL = "hf://kubetune-test/no-such-model"
DATASET = "hf://kubetune-test/no-such-data"
RETRYABLE_EXIT_CODE = 1


Answer = Callable[[Any], Any]
"""Given the request, an `httpx` response, or raises the transport error the network would."""


def status(code: int, **headers: str) -> Answer:
    def answer(request: Any) -> Any:
        from huggingface_hub.utils import httpx

        return httpx.Response(code, headers=headers, request=request)

    return answer


def network(kind: str) -> Answer:
    def answer(request: Any) -> Any:
        from huggingface_hub.utils import httpx

        raise getattr(httpx, kind)(f"fake {kind}", request=request)

    return answer


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Answer], list[str]]]:
    """Make the Hub answer every request with `answer`; returns the URLs requested."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http, httpx

    requested: list[str] = []

    def install(answer: Answer) -> list[str]:
        def handle(request: Any) -> Any:
            requested.append(str(request.url))
            return answer(request)

        huggingface_hub.set_client_factory(lambda: httpx.Client(
            transport=httpx.MockTransport(handle), follow_redirects=True))
        return requested

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # The Hub client retries transient failures with waits of up to 8 s; the waits, not the
    # retries, are skipped.
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    yield install
    huggingface_hub.set_client_factory(_http.default_client_factory)


def _main(tmp_path: Path, tiny_dataset: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
          *, model: str | None = None, dataset: str | None = None,
          revision: str | None = None) -> tuple[int, str]:
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    document = run_config(*tiny_dataset)
    if model is not None:
        document["spec"]["model"] = {"source": model, "revision": revision}
    if dataset is not None:
        document["spec"]["dataset"] = {"source": dataset}
    config = tmp_path / "run.json"
    config.write_text(json.dumps(document))
    code = train.main(["--config", str(config), "--output", str(tmp_path / "out")])
    error = json.loads((tmp_path / "out" / "report.json").read_text())["error"]
    return code, str(error)


CONFIGURATION = [
    pytest.param(status(404, **{"X-Error-Code": "RepoNotFound"}), "no such repository",
                 id="repository-not-found"),
    # The Hub answers 401 for a missing repository as for a private one read anonymously.
    pytest.param(status(401), "no such repository", id="anonymous-401"),
    pytest.param(status(401, **{"X-Error-Message": "Invalid credentials in Authorization header"}),
                 "refused the token", id="token-refused"),
    pytest.param(status(403, **{"X-Error-Code": "GatedRepo"}), "gated", id="gated"),
    pytest.param(status(403), "refused access", id="forbidden"),
    pytest.param(status(404, **{"X-Error-Code": "RevisionNotFound"}), "revision",
                 id="revision-not-found"),
]
TRANSIENT = [
    pytest.param(network("ReadTimeout"), id="read-timeout"),
    pytest.param(network("ConnectError"), id="connect-error"),
    pytest.param(status(503), id="unavailable"),
    pytest.param(status(429), id="rate-limited"),
]


@pytest.mark.parametrize(("answer", "reason"), CONFIGURATION)
def test_a_model_the_hub_will_not_give_is_a_configuration_error(
        tmp_path: Path, tiny_dataset: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        hub: Callable[[Answer], list[str]], answer: Answer, reason: str) -> None:
    requested = hub(answer)
    code, error = _main(tmp_path, tiny_dataset, monkeypatch, model=MODEL, revision="v9")
    assert any("kubetune-test/no-such-model" in url for url in requested)
    assert code == CONFIG_ERROR_EXIT_CODE, error
    assert error.startswith(f"spec.model.source {MODEL}"), error
    assert reason in error


@pytest.mark.parametrize("answer", TRANSIENT)
def test_a_model_the_hub_cannot_give_now_stays_retryable(
        tmp_path: Path, tiny_dataset: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        hub: Callable[[Answer], list[str]], answer: Answer) -> None:
    requested = hub(answer)
    code, error = _main(tmp_path, tiny_dataset, monkeypatch, model=MODEL)
    assert requested
    assert code == RETRYABLE_EXIT_CODE, error


@pytest.mark.parametrize(("answer", "reason"), [
    *CONFIGURATION[:1], *CONFIGURATION[3:4],
    pytest.param(status(404, **{"X-Error-Code": "EntryNotFound"}), "not in the repository",
                 id="file-not-found"),
])
def test_a_dataset_the_hub_will_not_give_is_a_configuration_error(
        tmp_path: Path, tiny_dataset: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        hub: Callable[[Answer], list[str]], answer: Answer, reason: str) -> None:
    requested = hub(answer)
    code, error = _main(tmp_path, tiny_dataset, monkeypatch, dataset=DATASET)
    assert any("kubetune-test/no-such-data" in url for url in requested)
    assert code == CONFIG_ERROR_EXIT_CODE, error
    assert error.startswith(f"spec.dataset.source {DATASET}"), error
    assert reason in error


@pytest.mark.parametrize("answer", TRANSIENT[:2])
def test_a_dataset_the_hub_cannot_give_now_stays_retryable(
        tmp_path: Path, tiny_dataset: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        hub: Callable[[Answer], list[str]], answer: Answer) -> None:
    hub(answer)
    code, error = _main(tmp_path, tiny_dataset, monkeypatch, dataset=DATASET)
    assert code == RETRYABLE_EXIT_CODE, error


@pytest.mark.parametrize(("field", "source", "reason"), [
    ("model", MODEL, "not in the local Hugging Face cache"),
    ("dataset", DATASET, "not in the local Hugging Face cache"),
    ("model", "hf://kubetune-test/model/extra", "not a valid repository id"),
    ("model", "hf://kubetune--test/model", "not a valid repository id"),
])
def test_offline_or_malformed_hub_sources_are_configuration_errors(
        tmp_path: Path, tiny_dataset: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        field: str, source: str, reason: str) -> None:
    # The tests run with HF_HUB_OFFLINE=1 (conftest): nothing reaches a network.
    code, error = _main(tmp_path, tiny_dataset, monkeypatch, **{field: source})
    assert code == CONFIG_ERROR_EXIT_CODE, error
    assert error.startswith(f"spec.{field}.source {source}"), error
    assert reason in error
