"""`precision: Auto` on CPU: the rule (pure), and real exports of the built-in model that build,
score and choose candidates against FP32 in PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.metrics import Task
from kubetune.api.spec import Precision, Quantization
from kubetune_trainer.builtin import builtin_model_dir
from kubetune_trainer.export import auto
from kubetune_trainer.export import run as export_module
from kubetune_trainer.heldout import IGNORE, Calibration, HeldOut, HeldOutRecord
from kubetune_trainer.tokenizer import ServingTokenizer
from tests.trainer.conftest import QA
from tests.trainer.export.test_export import weight_bits

FP32 = auto.Score(accuracy=0.8, agreement=1.0, loss=0.5, task_score=0.8)


@pytest.mark.parametrize(("accuracy", "passes"), [(0.8, True), (0.79, True), (0.78, False),
                                                  (0.9, True)])
def test_with_answers_exact_match_decides_within_one_point(accuracy: float,
                                                           passes: bool) -> None:
    # agreement and loss do not count when there are answers
    verdict, reason = auto.decide(auto.Score(accuracy, 0.5, 9.0, accuracy), FP32)
    assert verdict is passes and "exactMatch" in reason


@pytest.mark.parametrize(("task", "fp32", "candidate", "passes"), [
    # chrF is 0-100: one point is 1.0; exact match (0 here) does not count.
    (Task.TRANSLATION, 95.0, 94.1, True), (Task.TRANSLATION, 95.0, 93.9, False),
    (Task.CLASSIFICATION, 0.9, 0.891, True), (Task.CLASSIFICATION, 0.9, 0.88, False),
    (Task.EXTRACTION, 0.94, 0.79, False),
])
def test_with_answers_the_tasks_own_metric_decides_within_one_point(
    task: Task, fp32: float, candidate: float, passes: bool
) -> None:
    verdict, reason = auto.decide(auto.Score(0.0, 1.0, 0.5, candidate),
                                  auto.Score(0.0, 1.0, 0.5, fp32), task)
    assert verdict is passes and str(auto.judged_metric(task)) in reason


def test_a_chat_task_is_judged_teacher_forced_not_by_exact_match() -> None:
    """Free answers: FP32 and a broken candidate both match no reference exactly. Before, exact
    match decided (0 >= 0 - 0.01) and the broken candidate passed."""
    fp32 = auto.Score(accuracy=0.0, agreement=1.0, loss=0.5)
    broken = auto.Score(accuracy=0.0, agreement=0.6, loss=2.5)
    verdict, reason = auto.decide(broken, fp32, Task.CHAT)
    assert verdict is False and "agreement" in reason
    assert "agreement" in auto.rule(fp32, Task.CHAT)


def test_answers_are_scored_on_the_tasks_metric_and_exact_match() -> None:
    records = [HeldOutRecord(input_ids=[1, 2], labels=[IGNORE, 2], prompt=[1], reference=ref)
               for ref in ("La regro trovas.", "Mia domo.")]
    held_out = HeldOut(records=records, task=Task.TRANSLATION)
    source = builtin_model_dir("smollm2-135m-instruct")
    tokenizer = ServingTokenizer.load(source)
    replies = iter(["La regro trovos.", "Mia domo."])

    def greedy(prompt: list[int], budget: int) -> list[int]:
        return tokenizer.encode(next(replies), add_special_tokens=False)

    accuracy, chrf = auto.answer_scores(held_out, greedy, source)
    assert accuracy == 0.5
    assert chrf is not None and 60 < chrf < 100


@pytest.mark.parametrize(("agreement", "loss", "passes"), [
    (0.99, 0.52, True), (0.96, 0.5, False), (0.99, 0.56, False),
])
def test_without_answers_agreement_and_loss_decide(agreement: float, loss: float,
                                                   passes: bool) -> None:
    no_answers = auto.Score(None, 1.0, 0.5)
    verdict, reason = auto.decide(auto.Score(None, agreement, loss), no_answers)
    assert verdict is passes and "agreement" in reason


@pytest.mark.parametrize(("calibrated", "first"), [(True, Quantization.GPTQ),
                                                  (False, Quantization.RTN)])
def test_candidates_start_with_int4_and_use_gptq_given_calibration(
    calibrated: bool, first: Quantization
) -> None:
    tried = auto.candidates(calibrated)
    assert tried[0] == auto.Candidate(Precision.INT4, first)
    assert all(c.precision not in (Precision.AUTO, Precision.FP32, Precision.FP16)
               for c in tried)
    assert Quantization.GPTQ not in {c.quantization for c in auto.candidates(False)}


def run_directory(tmp_path: Path, with_answers: bool) -> Path:
    """A run directory as the trainer leaves it: `merged/` (the built-in model) and, with
    answers, a `heldout.json` of chat records encoded as training encodes them and a
    `calibration.json` of the same records."""
    source = builtin_model_dir("smollm2-135m-instruct")
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    for item in source.iterdir():
        (run / "merged" / item.name).symlink_to(item)
    if with_answers:
        tokenizer = ServingTokenizer.load(source)
        eos = tokenizer.eos_token_id
        assert eos is not None
        records = []
        for question, answer in QA:
            prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
            target = [*tokenizer.encode(answer, add_special_tokens=False), eos]
            records.append(HeldOutRecord(input_ids=prompt + target,
                                         labels=[IGNORE] * len(prompt) + target,
                                         prompt=prompt, reference=answer))
        HeldOut(records=records).write(run)
        Calibration(sequences=[r.input_ids for r in records]).write(run)
    return run


def exported(run: Path, output: Path, *options: str) -> dict:
    """Export `run` in this process (so monkeypatches hold); export.json. The export must
    succeed."""
    assert export_module.main(["--input", str(run), "--output", str(output), *options]) == 0
    return json.loads((output / "export.json").read_text())


def test_auto_exports_the_first_candidate_that_passes(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two candidates, the rule as shipped: whatever the scores, the export is the first
    candidate the rule passes (FP32 when none), every one before it failed, and export.json
    says so with the scores."""
    monkeypatch.setattr(auto, "candidates", lambda calibrated: (
        auto.Candidate(Precision.INT4, Quantization.RTN), auto.Candidate(Precision.INT8)))
    run = run_directory(tmp_path, with_answers=True)
    output = tmp_path / "onnx"
    data = exported(run, output, "--precision", "Auto")
    assert data["ok"] and data["requested"] == "Auto"
    choice = data["auto"]
    assert choice["answers"] == len(QA) and choice["heldOutRecords"] == len(QA)
    assert choice["fp32"]["accuracy"] is not None and choice["fp32"]["agreement"] == 1.0
    tried = choice["candidates"]
    assert tried and all(not c["passed"] for c in tried[:-1])
    for candidate in tried:
        assert 0 <= candidate["agreement"] <= 1 and candidate["loss"] > 0
        score = auto.Score(candidate["accuracy"], candidate["agreement"], candidate["loss"],
                           candidate["taskScore"])
        fp32 = auto.Score(choice["fp32"]["accuracy"], 1.0, choice["fp32"]["loss"],
                          choice["fp32"]["taskScore"])
        assert auto.decide(score, fp32)[0] is candidate["passed"]
    chosen = tried[-1] if tried[-1]["passed"] else {"precision": "FP32", "quantization": None}
    assert (data["precision"], data["quantization"]) == (chosen["precision"],
                                                         chosen["quantization"])
    bits = set(weight_bits(output).values())
    assert bits == ({4} if chosen["precision"] == "INT4" else {8} if chosen["precision"] == "INT8"
                    else set())


def test_auto_exports_fp32_when_no_candidate_keeps_its_quality(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No held-out set (a plain model directory): candidates are judged teacher-forced on the
    parity prompts; a floor no quantized model reaches leaves FP32, verified token for token."""
    monkeypatch.setattr(auto, "candidates", lambda calibrated: (
        auto.Candidate(Precision.INT4, Quantization.RTN),))
    monkeypatch.setattr(auto, "AGREEMENT_FLOOR", 1.01)
    run = run_directory(tmp_path, with_answers=False)
    output = tmp_path / "onnx"
    data = exported(run, output, "--precision", "Auto")
    assert data["ok"] and data["precision"] == "FP32" and data["requested"] == "Auto"
    assert data["auto"]["answers"] == 0 and "agreement" in data["auto"]["rule"]
    [int4] = data["auto"]["candidates"]
    assert not int4["passed"] and 0.5 < int4["agreement"] < 1.0
    assert data["outputParity"]["exactMatches"] == data["outputParity"]["prompts"]
    assert weight_bits(output) == {}


def test_auto_takes_no_quantization_method(tmp_path: Path) -> None:
    code = export_module.main(["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                               "--precision", "Auto", "--quantization", "KQuant"])
    assert code == 2


def test_gptq_rerounds_rtns_graph_closer_to_fp32(tmp_path: Path) -> None:
    """GPTQ's export: RTN's symmetric 4-bit layout (no zero points, so RTN's kernel and
    speed), weights that move the layers' outputs less than RTN's on the calibration tokens,
    verified like any export."""
    run = run_directory(tmp_path, with_answers=True)
    output = tmp_path / "onnx"
    data = exported(run, output, "--precision", "INT4", "--quantization", "GPTQ")
    assert data["ok"] and (data["precision"], data["quantization"]) == ("INT4", "GPTQ")
    assert data["calibrationSequences"] == len(QA) and 0 < data["outputErrorVsRtn"] < 1
    assert set(weight_bits(output).values()) == {4}
    # RTN's size (the 4-bit weights plus their scales), not a copy appended to the old bytes
    assert data["sizes"]["modelBytes"] < 100e6
    import onnx

    graph = onnx.load(str(output / "model.onnx"), load_external_data=False).graph
    assert all(len(n.input) == 3 for n in graph.node if n.op_type == "MatMulNBits")


def test_gptq_without_calibration_is_a_configuration_error(tmp_path: Path) -> None:
    run = run_directory(tmp_path, with_answers=False)
    code = export_module.main(["--input", str(run), "--output", str(tmp_path / "o"),
                               "--precision", "INT4", "--quantization", "GPTQ"])
    assert code == 2


def test_a_candidate_that_cannot_be_built_is_recorded_and_the_next_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTQ without calibration tokens cannot be built: Auto says so in export.json and goes
    on to the next candidate (here one any score passes) instead of failing the export."""
    monkeypatch.setattr(auto, "candidates", lambda calibrated: (
        auto.Candidate(Precision.INT4, Quantization.GPTQ),
        auto.Candidate(Precision.INT4, Quantization.RTN)))
    monkeypatch.setattr(auto, "AGREEMENT_FLOOR", 0.0)
    monkeypatch.setattr(auto, "LOSS_TOLERANCE", 1e9)
    run = run_directory(tmp_path, with_answers=False)
    output = tmp_path / "onnx"
    data = exported(run, output, "--precision", "Auto")
    gptq, rtn = data["auto"]["candidates"]
    assert not gptq["passed"] and "calibration" in gptq["reason"] and gptq["agreement"] is None
    assert rtn["passed"] and (data["precision"], data["quantization"]) == ("INT4", "RTN")
