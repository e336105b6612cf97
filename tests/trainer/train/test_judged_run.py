"""A real CPU training run judged by a real LLM judge: the built-in model's INT4 export served
by this project's server (with an API key) compares the base and the fine-tuned answers, and
the run reports `judgeWinRate`, the counts and each record's verdicts. The 135M judge proves
the plumbing, not the judgement (docs/metrics.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api.dataplane import JUDGE_API_KEY_ENV, TrainingReport
from kubetune.api.metrics import Metric, Task
from kubetune.api.spec import EvaluationSpec, JudgeSpec
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.judge import JudgeError
from kubetune_trainer.train.evaluate import Evaluation
from kubetune_trainer.train.run import ask_judge
from tests.trainer.conftest import QA, chat_line, run_config, start_training, succeeded
from tests.trainer.export.test_export import exported_model
from tests.trainer.serve.test_serve import LIMITS, Server, free_port
from tests.trainer.train.test_task_evaluation import chat

KEY = "kt-judge-run-0123456789abcdef"


@pytest.fixture(scope="module")
def judge_server() -> Iterator[Server]:
    running = Server(exported_model("INT4"), *LIMITS, "--api-key", KEY)
    yield running
    running.stop()


def judge(server: Server) -> dict[str, object]:
    return {"endpoint": f"{server.url}/v1", "model": server.name,
            "apiKeySecretRef": {"name": "judge-key", "key": "token"}}


def test_a_chat_run_with_a_judge_reports_its_win_rate_and_each_verdict(
        tmp_path: Path, builtin_model: Path, judge_server: Server) -> None:
    data = tmp_path / "data"
    data.mkdir()
    train, validation = data / "train.jsonl", data / "validation.jsonl"
    train.write_text("".join(chat_line(q, a) + "\n" for q, a in QA))
    validation.write_text("".join(chat_line(q, a) + "\n" for q, a in QA[:3]))
    config = run_config(train, validation, steps=2)
    config["spec"]["evaluation"] = {"task": "Chat", "judge": judge(judge_server)}
    output = tmp_path / "out"
    succeeded(start_training(config, output, env={
        "KUBETUNE_EVAL_MAX_RECORDS": "3", "KUBETUNE_JUDGE_MAX_TOKENS": "16",
        JUDGE_API_KEY_ENV: KEY}))

    report = TrainingReport.read(output / "report.json")
    assert report is not None and report.task is Task.CHAT and report.judge is not None
    counts = report.judge
    assert (counts.records, counts.comparisons) == (3, 6)
    assert counts.wins + counts.losses + counts.ties == 6 and counts.unparsed <= counts.ties
    assert counts.endpoint == f"{judge_server.url}/v1" and counts.model == judge_server.name
    assert report.metrics is not None and report.base_metrics is not None
    assert report.metrics.values[Metric.JUDGE_WIN_RATE] == (counts.wins + counts.ties / 2) / 6
    assert Metric.JUDGE_WIN_RATE not in report.base_metrics.values  # the win rate is vs base

    lines = [json.loads(line) for line in (output / "evaluation.jsonl").read_text().splitlines()]
    assert sorted(line["line"] for line in lines) == [1, 2, 3]
    scores = [line["judge"]["score"] for line in lines]
    assert scores == sorted(scores)  # the records the judge liked least come first
    outcomes = [c["outcome"] for line in lines for c in line["judge"]["comparisons"]]
    assert (outcomes.count("win"), outcomes.count("loss")) == (counts.wins, counts.losses)
    for line in lines:
        first, second = line["judge"]["comparisons"]
        assert (first["fineTunedShownAs"], second["fineTunedShownAs"]) == ("B", "A")
        assert first["reply"].strip() and second["reply"].strip()  # the server's real replies
    assert KEY not in (output / "report.json").read_text()


def test_a_judge_that_refuses_or_cannot_be_reached_fails_naming_the_endpoint(
        judge_server: Server) -> None:
    spec = EvaluationSpec(task=Task.CHAT, judge=JudgeSpec.model_validate(judge(judge_server)))
    examples = [chat("Show nodes", "kubectl get nodes", 1)]
    before = Evaluation(answers=["kubectl nodes"])
    after = Evaluation(answers=["kubectl get nodes"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv(JUDGE_API_KEY_ENV, "kt-not-the-key-0123456789")
        # A wrong key answers the same on every retry: a configuration error (exit code 2).
        with pytest.raises(ConfigError, match="HTTP 401") as refused:
            ask_judge(spec, examples, before, after)
        assert f"{judge_server.url}/v1/chat/completions" in str(refused.value)
        assert "spec.evaluation.judge" in str(refused.value)
        absent = JudgeSpec(endpoint=f"http://127.0.0.1:{free_port()}/v1", model="judge")
        gone = spec.model_copy(update={"judge": absent})
        # Nothing listening may be a judge restarting: retryable (exit code 1), never a tie.
        with pytest.raises(JudgeError) as unreachable:
            ask_judge(gone, examples, before, after)
        assert unreachable.value.retryable
        assert f"{absent.endpoint}/chat/completions" in str(unreachable.value)
