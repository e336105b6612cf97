"""A CUDA export is served on CUDA (issue 28, item 13).

The export says which device it was built for in genai_config.json (the builder's `-e cuda`
writes a `cuda` entry into the decoder's provider options); both engines run it on that
device's execution provider, and refuse, with the reason, where onnxruntime cannot.

Where no GPU exists, onnxruntime's side is faked (its provider list and its session
constructor; onnxruntime-genai's CUDA check, Config and Model) and KubeTune's code runs as it
is. The `gpu` tier at the end serves a real CUDA export when a GPU is lent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetune.api.spec import Device
from kubetune_trainer.genai_model import CPU_PROVIDER, CUDA_PROVIDER, ProviderError, built_for
from kubetune_trainer.serve.engines.batch.decoder import Decoder
from kubetune_trainer.serve.protocol import Limits
from tests.trainer.export.test_export import exported_model

MISSING_CUDA = (
    "this export was built for CUDA but onnxruntime has no CUDAExecutionProvider: "
    "install onnxruntime-gpu"
)


def builder_config(model_dir: Path, output: Path, device: str, precision: str) -> Path:
    """genai_config.json as the builder writes it for `device` (config only: no weights)."""
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
        "-o", str(output), "-p", precision, "-e", device, "-c", str(output / "cache"),
        "--extra_options", "config_only=true",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return output / "genai_config.json"


@pytest.fixture(scope="module")
def cuda_export(tmp_path_factory: pytest.TempPathFactory, builtin_model: Path) -> Path:
    """The built-in model's INT4 export with the genai_config.json the builder writes for
    CUDA: what `export --device CUDA --precision INT4` leaves, as the server reads it (the
    graph itself is the CPU build's, which the faked CUDA sessions below run on the CPU)."""
    cpu = exported_model("INT4")
    config = builder_config(builtin_model, tmp_path_factory.mktemp("builder"), "cuda", "int4")
    export = tmp_path_factory.mktemp("cuda-export")
    for item in cpu.iterdir():
        if item.is_file() and item.name != "genai_config.json":
            shutil.copy2(item, export / item.name)  # ONNX Runtime refuses linked weights
    built = json.loads(config.read_text())["model"]["decoder"]["session_options"]
    ours = json.loads((cpu / "genai_config.json").read_text())
    ours["model"]["decoder"]["session_options"] = built
    (export / "genai_config.json").write_text(json.dumps(ours))
    return export


class OnCuda:
    """What onnxruntime-gpu's session reports on a GPU machine (`get_providers`), around a
    real CPU session that runs the graph."""

    def __init__(self, session: Any, providers: list[str]) -> None:
        self.session, self.providers = session, providers

    def get_providers(self) -> list[str]:
        return self.providers

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """onnxruntime as onnxruntime-gpu on a GPU machine: it offers CUDA, and each session is
    created with the providers asked for (recorded here) and reports them."""
    import onnxruntime as ort

    created: list[list[str]] = []
    real = ort.InferenceSession

    def session(*args: Any, providers: list[str], **kwargs: Any) -> OnCuda:
        created.append(list(providers))
        return OnCuda(real(*args, providers=[CPU_PROVIDER], **kwargs), list(providers))

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setattr(ort, "InferenceSession", session)
    yield created


def test_the_builders_cuda_export_is_built_for_cuda(
    cuda_export: Path, builtin_model: Path, tmp_path: Path
) -> None:
    assert built_for(cuda_export) is Device.CUDA
    assert built_for(exported_model("INT4")) is Device.CPU
    cpu_config = builder_config(builtin_model, tmp_path, "cpu", "int4")
    assert built_for(cpu_config.parent) is Device.CPU


def test_the_batch_engine_runs_a_cuda_export_on_the_cuda_provider(
    cuda_export: Path, sessions: list[list[str]]
) -> None:
    from kubetune_trainer.serve.engines.batch.scheduler import BatchEngine

    engine = BatchEngine(cuda_export, Limits(max_concurrency=2))
    try:
        assert sessions == [[CUDA_PROVIDER, CPU_PROVIDER]]
        assert engine.decoder.session.get_providers()[0] == CUDA_PROVIDER
        assert engine.warm_up() > 0  # and it generates through that session
    finally:
        engine.shutdown()


def test_a_cpu_export_stays_on_the_cpu_where_cuda_is_offered(
    sessions: list[list[str]],
) -> None:
    Decoder(exported_model("INT4"))
    assert sessions == [[CPU_PROVIDER]]


def test_a_cuda_export_without_the_cuda_provider_is_refused_with_the_reason(
    cuda_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    from kubetune_trainer.serve.server import check_device

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_PROVIDER])
    with pytest.raises(ProviderError, match=MISSING_CUDA):
        Decoder(cuda_export)
    # The server says so before its port opens, so the pod fails instead of never turning ready.
    with pytest.raises(SystemExit, match=MISSING_CUDA):
        check_device("", cuda_export, "batch")
    with pytest.raises(SystemExit, match=MISSING_CUDA):
        check_device("CUDA", cuda_export, "genai")


def test_a_session_that_dropped_cuda_is_refused(
    cuda_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu without a visible GPU creates the session on the CPU, with a warning."""
    import onnxruntime as ort

    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setattr(
        ort, "InferenceSession",
        lambda *args, providers, **kwargs: real(*args, providers=[CPU_PROVIDER], **kwargs),
    )
    with pytest.raises(ProviderError, match=f"could not start {CUDA_PROVIDER}"):
        Decoder(cuda_export)


def test_the_server_refuses_an_export_built_for_another_device(
    cuda_export: Path, sessions: list[list[str]]
) -> None:
    from kubetune_trainer.serve.server import check_device

    with pytest.raises(SystemExit, match=r"--device CPU: .* was built for CUDA"):
        check_device("CPU", cuda_export, "batch")
    with pytest.raises(SystemExit, match=r"--device CUDA: .* was built for CPU"):
        check_device("CUDA", exported_model("INT4"), "batch")
    check_device("CUDA", cuda_export, "batch")
    check_device("", exported_model("INT4"), "batch")


class RecordingConfig:
    """onnxruntime-genai's Config, recording the providers it is given."""

    def __init__(self, path: str) -> None:
        self.path, self.providers = path, ["from genai_config.json"]

    def clear_providers(self) -> None:
        self.providers = []

    def append_provider(self, name: str) -> None:
        self.providers.append(name)


@pytest.fixture
def genai_on_cuda(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """onnxruntime-genai-cuda on a GPU machine: each Model's providers are recorded, and the
    model is loaded on the CPU."""
    import onnxruntime as ort
    import onnxruntime_genai as og

    loaded: list[list[str]] = []
    real_config, real_model = og.Config, og.Model

    def model(config: RecordingConfig) -> Any:
        loaded.append(config.providers)
        on_cpu = real_config(config.path)
        on_cpu.clear_providers()
        return real_model(on_cpu)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setattr(og, "is_cuda_available", lambda: True)
    monkeypatch.setattr(og, "Config", RecordingConfig)
    monkeypatch.setattr(og, "Model", model)
    return loaded


def test_the_genai_engine_runs_a_cuda_export_on_cuda(
    cuda_export: Path, genai_on_cuda: list[list[str]]
) -> None:
    from kubetune_trainer.serve.engines.genai import GenAIEngine

    engine = GenAIEngine(cuda_export, Limits(max_concurrency=1))
    engine.shutdown()
    GenAIEngine(exported_model("INT4"), Limits(max_concurrency=1)).shutdown()
    assert genai_on_cuda == [["cuda"], []]  # the CPU export: no provider, onnxruntime's CPU


def test_the_genai_engine_refuses_a_cuda_export_without_onnxruntime_genai_cuda(
    cuda_export: Path, genai_on_cuda: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime_genai as og

    from kubetune_trainer.serve.engines.genai import GenAIEngine

    monkeypatch.setattr(og, "is_cuda_available", lambda: False)
    with pytest.raises(ProviderError, match="install onnxruntime-genai-cuda"):
        GenAIEngine(cuda_export, Limits(max_concurrency=1))
    assert genai_on_cuda == []


# --------------------------------------------------------------------------- on a real GPU


def _cuda_ready() -> str | None:
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    import torch

    if not torch.cuda.is_available():
        return "needs CUDA: no GPU on this machine (torch.cuda.is_available())"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_ready() is not None, reason=str(_cuda_ready()))
def test_a_cuda_export_serves_on_the_gpu(builtin_model: Path, tmp_path: Path) -> None:
    """Export for CUDA (FP16, what `precision: Auto` picks there), serve it with the batch
    engine on the GPU, and check each answer against unbatched greedy decoding of the same
    graph in a plain CUDA session."""
    import onnxruntime as ort

    from kubetune.local.processes import export_command
    from tests.trainer.serve.test_serve import Server, post

    output = tmp_path / "onnx"
    result = subprocess.run(
        export_command(builtin_model, output, "FP16", "CUDA"),
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert built_for(output) is Device.CUDA
    decoder = Decoder(output)
    assert decoder.session.get_providers()[0] == CUDA_PROVIDER

    from kubetune_trainer.tokenizer import ServingTokenizer

    tokenizer = ServingTokenizer.load(output)
    config = json.loads((output / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(
        str(output / "model.onnx"), providers=[CUDA_PROVIDER, CPU_PROVIDER]
    )
    names = [f"past_key_values.{layer}.{part}" for layer in range(config["num_hidden_layers"])
             for part in ("key", "value")]
    dtype = np.float16 if "float16" in session.get_inputs()[-1].type else np.float32

    def greedy(prompt: str, tokens: int) -> str:
        kv = {n: np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), dtype)
              for n in names}
        ids, generated = np.array([tokenizer.encode(prompt)]), []
        for _ in range(tokens):
            mask = np.ones((1, kv[names[0]].shape[2] + ids.shape[1]), np.int64)
            logits, *present = session.run(
                ["logits", *(n.replace("past_key_values", "present") for n in names)],
                {"input_ids": ids, "attention_mask": mask, **kv},
            )
            kv = dict(zip(names, present, strict=True))
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
            ids = np.array([[token]])
        return tokenizer.decode(generated)

    server = Server(output, "--device", "CUDA")
    try:
        for prompt in ("The three primary colours are", "def quicksort(items):\n"):
            body = {"model": server.name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
            response = post(server, "/v1/completions", body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == greedy(prompt, 12), prompt
    finally:
        server.stop()
    shutil.rmtree(output, ignore_errors=True)
