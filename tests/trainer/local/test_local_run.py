"""`kubetune run` end to end on the CPU with the built-in model and a few records.

The runs use the generator's data (a few records), a handful of optimizer steps and the same
commands the pods run. What they check: the artifacts and report, a served answer, resuming
after Ctrl-C, and that a bad manifest or a bad dataset line is refused with its name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from kubetune.cli import main as kubetune_main

ROOT = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _dataset(directory: Path) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("kubectl_dataset",
                                                  ROOT / "examples/kubectl_dataset.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    sizes = {"train": 24, "validation": 4, "test": 3}
    return dict(generator.write_splits(directory, seed=11, sizes=sizes))


def _manifest(tmp_path: Path, data: dict[str, Path], max_steps: int, serving: bool,
              train_file: Path | None = None) -> Path:
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"source": "builtin://smollm2-135m-instruct"},
            "dataset": {"source": f"file://{train_file or data['train']}", "format": "Chat",
                        "validation": {"source": f"file://{data['validation']}"}},
            "method": "LoRA",
            "lora": {"rank": 4, "alpha": 8, "dropout": "0"},
            "training": {"maxSteps": max_steps, "batchSize": 4, "maxSeqLength": 96,
                         "learningRate": "1e-3", "logEverySteps": 1},
            "resources": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": 2, "keep": 2},
            "serving": {"enabled": serving, "precision": "FP32", "device": "CPU"},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _kubetune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_bad_manifest_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _manifest(tmp_path, {"train": tmp_path / "t.jsonl", "validation": tmp_path / "v"},
                     2, False)
    document = yaml.safe_load(path.read_text())
    document["spec"]["lora"]["rank"] = 0
    document["spec"]["training"]["learningRate"] = "fast"
    path.write_text(yaml.safe_dump(document))
    assert kubetune_main(["run", str(path), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "spec.lora.rank" in error
    assert "spec.training.learningRate" in error
    assert not (tmp_path / "run").exists()


def test_bad_dataset_line_is_named(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    lines = data["train"].read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "no answer here"}]}'
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    manifest = _manifest(tmp_path, data, 2, False, train_file=broken)
    result = _kubetune("run", str(manifest), "--output", str(tmp_path / "run"), "--no-serve")
    assert result.returncode == 2, result.stderr
    assert f"{broken}:3" in result.stderr
    assert "assistant" in result.stderr


def test_bad_test_split_line_is_named_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # `--test` is read only after training and export: a bad line once cost the whole run
    # and then ended in a traceback (exit 1) instead of file:line.
    from kubetune.local import run as local_run

    monkeypatch.setattr(local_run, "execute", lambda *a: pytest.fail("the run started"))
    data = {"train": tmp_path / "t.jsonl", "validation": tmp_path / "v.jsonl"}
    test_split = tmp_path / "test.jsonl"
    test_split.write_text('{"messages": [{"role": "user", "content": "a\u2028b"},'
                          ' {"role": "assistant", "content": "c"}]}\n{"messages": 3}\n')
    manifest = _manifest(tmp_path, data, 2, True)
    code = kubetune_main(["run", str(manifest), "--output", str(tmp_path / "run"),
                          "--test", str(test_split)])
    assert code == 2
    assert f"{test_split}:2: " in capsys.readouterr().err


def test_a_run_dir_of_another_spec_is_refused(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.api import load_manifest
    from kubetune.local.run import prepare_run

    data = {"train": tmp_path / "t.jsonl", "validation": tmp_path / "v.jsonl"}
    first = load_manifest(_manifest(tmp_path, data, 2, False))
    prepare_run(first, tmp_path / "run")
    second = load_manifest(_manifest(tmp_path, data, 3, False))
    with pytest.raises(ValueError, match="different spec"):
        prepare_run(second, tmp_path / "run")


@pytest.mark.slow
def test_run_trains_exports_evaluates_and_answers(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    manifest = _manifest(tmp_path, data, 2, True)
    run_dir = tmp_path / "run"
    result = _kubetune("run", str(manifest), "--output", str(run_dir), "--no-serve",
                       "--test", str(data["test"]))
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "Succeeded" and report["steps"] == 2
    assert report["gate"]["passed"] is True
    assert report["test"]["fineTuned"]["total"] == 3
    assert report["test"]["base"]["total"] == 3
    for artifact in ("run.json", "metrics.jsonl", "loss.png", "adapter", "merged",
                     "onnx/export.json"):
        assert (run_dir / artifact).exists(), artifact
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Exact-match accuracy on the held-out test split" in result.stdout
    answer = next(line for line in result.stdout.splitlines() if line.startswith("Answer:"))
    assert answer.removeprefix("Answer:").strip()
    assert "http://127.0.0.1:" in result.stdout

    again = _kubetune("run", str(manifest), "--output", str(run_dir), "--no-serve",
                      "--test", str(data["test"]))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Training: already complete, skipped." in again.stderr
    assert "Export: already complete, skipped." in again.stderr


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    manifest = _manifest(tmp_path, data, 10, False)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "kubetune.cli", "run", str(manifest), "--output",
               str(run_dir)]
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        try:
            _wait_for(lambda: (run_dir / "checkpoints/step-00000002/COMPLETE").is_file(), 600,
                      "the first checkpoint")
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 130, (tmp_path / "stderr").read_text()[-3000:]
    assert "Run the same command again to resume" in (tmp_path / "stderr").read_text()
    # The trainer got the forwarded SIGINT, checkpointed the step it was on and stopped
    # (issue 13, finding 14): nothing it trained is lost.
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "Failed" and "SIGINT" in report["error"], report
    stopped = report["steps"]
    assert (run_dir / f"checkpoints/step-{stopped:08d}/COMPLETE").is_file()

    resumed = _kubetune("run", str(manifest), "--output", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the newest checkpoint" in resumed.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "Succeeded" and report["steps"] == 10
    assert report["resumedFromStep"] == stopped


TICKETS = {
    "billing": ["I was charged twice this month", "Please refund my last invoice",
                "My card was declined at checkout", "Why is my invoice higher than usual",
                "I want my money back for the annual plan", "The receipt shows the wrong VAT"],
    "tech": ["The app crashes when I log in", "The page shows error 500",
             "I cannot reset my password", "The upload button does nothing",
             "The app freezes on start", "Sync stopped working on my phone"],
}


def _tickets(directory: Path) -> dict[str, Path]:
    """A two-queue ticket classifier's splits (train, validation and test share no ticket)."""
    directory.mkdir(parents=True)
    system = "Route the support ticket: answer billing or tech."
    records = [(text, label) for label, texts in TICKETS.items() for text in texts]
    records = records[0::2] + records[1::2]  # interleave the two queues
    splits = {"train": records[:6], "validation": records[6:9], "test": records[9:]}
    paths = {}
    for split, chosen in splits.items():
        paths[split] = directory / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({"messages": [
            {"role": "system", "content": system}, {"role": "user", "content": text},
            {"role": "assistant", "content": label}]}) + "\n" for text, label in chosen))
    return paths


@pytest.mark.slow
def test_run_reports_a_classification_tasks_metrics_everywhere(tmp_path: Path) -> None:
    data = _tickets(tmp_path / "data")
    manifest = _manifest(tmp_path, data, 2, True)
    document = yaml.safe_load(manifest.read_text())
    document["spec"]["evaluation"] = {"task": "Classification", "labels": list(TICKETS)}
    # Two steps teach nothing: this checks the reports, not the gate.
    document["spec"]["serving"]["gate"] = {"mustBeatBase": False}
    manifest.write_text(yaml.safe_dump(document))
    run_dir = tmp_path / "run"
    result = _kubetune("run", str(manifest), "--output", str(run_dir), "--no-serve",
                       "--test", str(data["test"]))
    assert result.returncode == 0, result.stderr[-3000:]

    wanted = {"accuracy", "macroF1", "outOfLabels"}
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "Classification"
    assert set(report["metrics"]["values"]) == wanted | {"evalLoss", "perplexity"}
    assert set(report["baseMetrics"]["values"]) == wanted | {"evalLoss", "perplexity"}
    for model in ("base", "fineTuned"):  # through the served endpoint: no loss
        assert set(report["test"][model]["metrics"]["values"]) == wanted
        assert report["test"][model]["metrics"]["records"] == 3
    exported = json.loads((run_dir / "onnx" / "export.json").read_text())
    assert set(exported["metrics"]["values"]) == wanted | {"evalLoss", "perplexity"}
    records = [json.loads(line) for line in
               (run_dir / "evaluation.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {r["expected"] for r in records} <= set(TICKETS)
    assert "Classification metrics on the held-out test split (3 records):" in result.stdout
    assert "macroF1" in result.stdout and "F1 billing" in result.stdout + result.stderr
    assert "Classification metrics on 3 validation records:" in result.stderr
