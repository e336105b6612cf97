"""The end of `kubetune run`: serve the ONNX model on localhost, measure, show an answer.

The fine-tuned model is asked through the ONNX Runtime server it will be served with. When a
held-out test split exists (`--test FILE`, or the built-in dataset's `test.jsonl`), the base
model is exported the same way (cached when it is built in) and asked the same questions
through a server of its own, so the two accuracies and the task metrics differ only in the
weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from kubetune.api import RunConfig
from kubetune.api.dataplane import (
    API_KEY_ENV,
    ExportReport,
    Score,
    TestSplitScores,
    TrainingReport,
    cache_root,
)
from kubetune.api.metrics import Task
from kubetune.api.spec import Quantization
from kubetune.local.evaluate import (
    auto_summary,
    chat,
    evaluate,
    is_ready,
    load_chat_examples,
    side_by_side,
)
from kubetune.local.processes import (
    SERVE_ENGINE,
    Child,
    Interrupted,
    export_command,
    run_child,
    serve_command,
    wait_for,
)
from kubetune.local.rundir import export_done, write_report

HOST = "127.0.0.1"
ENGINE = f"onnxruntime ({SERVE_ENGINE} engine)"
"""Recorded with the test-split scores, which are re-measured when it changes."""
READY_TIMEOUT_SECONDS = 300.0
FALLBACK_QUESTION = [{"role": "user", "content": "Say hello in one short sentence."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def inherited_api_key(environ: Mapping[str, str]) -> str | None:
    """The key a server started with `environ` asks for (it strips it the same way)."""
    key = environ.get(API_KEY_ENV)
    return None if key is None else key.strip()


def shipped_test_split(report: TrainingReport) -> Path | None:
    """The held-out test file the trainer found beside a built-in dataset (`testSplit` in
    report.json), if any."""
    path = report.test_split
    return Path(path) if path is not None and Path(path).is_file() else None


class Server:
    """`python -m kubetune_trainer serve` on a local port, ready when `/readyz` says so.

    The server inherits this environment, so with `KUBETUNE_API_KEY` set it asks for that key,
    and every request made here sends it (`api_key`)."""

    def __init__(self, model_dir: Path, name: str, port: int, log_path: Path) -> None:
        self.name = name
        self.port = port or free_port()
        self.root = f"http://{HOST}:{self.port}"
        self.base_url = f"{self.root}/v1"
        self.api_key = inherited_api_key(os.environ)
        self.child = Child(serve_command(model_dir, HOST, self.port, name), log_path)

    def wait_ready(self) -> None:
        try:
            wait_for(lambda: is_ready(self.root), READY_TIMEOUT_SECONDS, "model server",
                     alive=lambda: self.child.process.poll() is None)
        except (RuntimeError, TimeoutError) as error:
            self.child.stop()
            raise RuntimeError(f"{error}:\n{self.child.log_tail()}") from None

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *_: object) -> None:
        self.child.stop()


def base_export(config: RunConfig, run_dir: Path,
                tuned: ExportReport) -> tuple[Path, list[str]]:
    """Where the base model's comparison export goes and the command that makes it: the
    weights the fine-tuned one got (what `Auto` chose, for `Auto`). A built-in base is cached
    for every run (it never changes); any other base, or one GPTQ calibrates on this run's
    training records, goes in the run directory."""
    serving = config.spec.serving
    source = config.spec.model.source
    if source.startswith("hf://"):
        raise RuntimeError("the base of an hf:// model is not exported locally")
    calibrated = tuned.quantization == Quantization.GPTQ.value
    if source.startswith("builtin://") and not calibrated:
        name = f"{source.removeprefix('builtin://')}-{tuned.weights}-{serving.device.value}"
        target = cache_root() / "onnx" / name.lower()
    else:
        target = run_dir / "base-onnx"
    # The exporter resolves the source itself, as the trainer does in a pod.
    command = export_command(source, target, str(tuned.precision), serving.device.value,
                             tuned.quantization)
    if calibrated:
        command += ["--calibration-from", str(run_dir)]
    return target, command


def base_onnx(config: RunConfig, run_dir: Path, tuned: ExportReport) -> Path:
    """The base model exported as `base_export` says, once."""
    target, command = base_export(config, run_dir, tuned)
    if export_done(target, tuned.weights):
        return target
    print(f"Export: the base model too, for the comparison ({target})...", file=sys.stderr)
    child = Child(command, run_dir / "logs" / "export-base.log")
    if run_child(child) != 0:
        raise RuntimeError(f"exporting the base model failed:\n{child.log_tail()}")
    return target


def still_valid(cached: TestSplitScores | None, test_path: Path, weights: str,
                task: Task = Task.GENERATION) -> TestSplitScores | None:
    """The report's test-split scores when they are for this split, these weights, this
    engine and this task, and the base was measured (a base that could not be is tried
    again)."""
    if (cached is not None and cached.path == str(test_path) and cached.base is not None
            and cached.precision == weights and cached.engine == ENGINE
            and cached.task is task and cached.fine_tuned.metrics is not None):
        return cached
    return None


def measure_test_split(config: RunConfig, run_dir: Path, tuned: Server, test_path: Path,
                       report: TrainingReport, exported: ExportReport) -> TestSplitScores:
    """Base and fine-tuned exact-match accuracy and task metrics on the test split, cached in
    the report."""
    evaluation = config.spec.evaluation
    cached = still_valid(report.test, test_path, exported.weights, evaluation.task)
    if cached is not None:
        return cached
    examples = load_chat_examples(test_path)
    print(f"Evaluating {len(examples)} held-out test requests (ONNX Runtime, greedy)...",
          file=sys.stderr)
    fine_tuned = evaluate(tuned.base_url, tuned.name, examples, api_key=tuned.api_key,
                          evaluation=evaluation)
    base: Score | None = None
    try:
        base_server = Server(base_onnx(config, run_dir, exported), f"{config.name}-base", 0,
                             run_dir / "logs" / "serve-base.log")
        with base_server:
            base = evaluate(base_server.base_url, base_server.name, examples,
                            api_key=base_server.api_key, evaluation=evaluation)
    except RuntimeError as error:
        print(f"Base model not measured: {error}", file=sys.stderr)
    return TestSplitScores(path=str(test_path), engine=ENGINE, precision=exported.weights,
                           task=evaluation.task, base=base, fine_tuned=fine_tuned)


def finish_with_server(config: RunConfig, run_dir: Path, args: argparse.Namespace,
                       report: TrainingReport) -> int:
    test_path: Path | None = args.test or shipped_test_split(report)
    server = Server(run_dir / "onnx", config.name, args.port, run_dir / "logs" / "serve.log")
    try:
        return _serve_and_show(run_dir, args, report, server, test_path, config)
    except RuntimeError as error:
        print(f"kubetune run: serving failed: {error}", file=sys.stderr)
        return 1
    finally:
        server.child.stop()


def _serve_and_show(run_dir: Path, args: argparse.Namespace, report: TrainingReport,
                    server: Server, test_path: Path | None, config: RunConfig) -> int:
    server.wait_ready()
    exported = ExportReport.read(run_dir / "onnx" / "export.json")
    if exported is None or not exported.ok:
        raise RuntimeError("the model is not exported")
    question = FALLBACK_QUESTION
    if test_path is not None:
        test = measure_test_split(config, run_dir, server, test_path, report, exported)
        report.test = test
        write_report(run_dir, report)
        print(side_by_side(test.base, test.fine_tuned, "test", config.spec.evaluation.task))
        question = load_chat_examples(test_path)[0][0]
    if exported.auto is not None:
        print(auto_summary(exported.auto, exported.weights))
    answer = chat(server.base_url, server.name, question, api_key=server.api_key)
    print(f"\nEndpoint (OpenAI-compatible, ONNX Runtime): {server.base_url}")
    print(f"Request: {question[-1]['content']}")
    print(f"Answer:  {answer.strip()}")
    print(f"\nRun directory: {run_dir} (report.json, loss.png, onnx/)")
    if not args.serve:
        return 0
    body = json.dumps({"model": server.name, "messages": question})
    # The key stays in the environment: the hint names the variable, never the value.
    key_header = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if server.api_key else ""
    print(f"\nServing until Ctrl-C. Try:\n  curl -s {server.base_url}/chat/completions "
          f"-H 'Content-Type: application/json'{key_header} -d {shlex.quote(body)}")
    try:
        code = run_child(server.child)
    except Interrupted:
        print("\nStopped serving.", file=sys.stderr)
        return 0
    print(f"kubetune run: the model server exited with code {code}:\n"
          f"{server.child.log_tail()}", file=sys.stderr)
    return code or 1
