"""A model that fails to load: the server stays up but says it is dead.

`/healthz` is the liveness probe: it answers 503 with the load error once loading has failed
(the kubelet restarts the container; a still-loading server stays alive), and the error is
written to the termination-message path, so the pod's `lastState.terminated.message` (and
from it the FineTuneJob's Serving condition) says why. The server runs as a real process on a
model directory whose config parses but whose ONNX files are missing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kubetune_trainer.serve.http import liveness

WAIT = 120  # seconds: a bound on waiting for the process, never a measured duration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_model_that_fails_to_load_fails_liveness_and_says_why(tmp_path: Path) -> None:
    model = tmp_path / "onnx"
    model.mkdir()
    # Enough for the command line to start the server (context length, hidden size); the
    # engine then finds no model.onnx and fails to load.
    (model / "genai_config.json").write_text(
        json.dumps({"model": {"context_length": 64, "decoder": {"hidden_size": 8}}})
    )
    termination_log = tmp_path / "termination-log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer", "serve", "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), "--drain-seconds", "0",
         "--grace-seconds", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1",
             "KUBETUNE_TERMINATION_LOG": str(termination_log)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        answer = None
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                answer = httpx.get(url + "/healthz", timeout=2)
                if answer.status_code != 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling for a condition, bounded by the deadline
        assert answer is not None and answer.status_code == 503, "liveness never failed"
        body = answer.json()
        assert body["status"] == "failed"
        assert body["error"], body  # the engine's own words (here: a file not found)
        ready = httpx.get(url + "/readyz", timeout=2)
        assert ready.status_code == 503 and ready.json()["error"] == body["error"]
        message = termination_log.read_text()
        assert message.startswith("model failed to load: ") and body["error"] in message
    finally:
        process.terminate()
        process.wait(WAIT)


def test_liveness_fails_once_loading_failed_but_not_while_loading() -> None:
    assert liveness(0.0, 60) == (200, {"status": "alive"})  # loading, or idle
    assert liveness(0.0, 60, load_error="OSError: no model.onnx") == (
        503, {"status": "failed", "error": "OSError: no model.onnx"}
    )


def test_a_refusal_before_the_port_opens_is_the_termination_message(tmp_path: Path) -> None:
    termination_log = tmp_path / "termination-log"
    finished = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "serve", "--model", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=WAIT,
        env={**os.environ, "KUBETUNE_TERMINATION_LOG": str(termination_log)},
    )  # fmt: skip
    assert finished.returncode == 1
    assert "has no genai_config.json" in termination_log.read_text()
