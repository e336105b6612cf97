"""`python -m kubetune_trainer train --config run.json --output DIR`.

Order of work: read and validate the run config, check every dataset line and tokenise (no
model yet, so a bad dataset fails in seconds with exit code 2), load the model, evaluate the
base, train (resuming from the newest usable checkpoint in `DIR/checkpoints`; the last step is
always checkpointed), write `adapter/`, evaluate the result on `spec.evaluation`'s task
metrics (and, with `spec.evaluation.judge`, ask the LLM judge to compare base and
fine-tuned answers: `ask_judge`), write `evaluation.json`, `evaluation.jsonl` (base vs
fine-tuned record by record, the records that regressed most first), `merged/`,
`heldout.json` and `calibration.json` (for the exporter) and `report.json`.
The adapter is saved before the greedy evaluation and the final checkpoint before both, so
a crash in either costs no training.

Exit codes: 0 success, 2 configuration error (bad run config, dataset or model source, a Hub
repository that does not exist or refuses the token (`hub.py`), a judge that refuses the
request: not retryable), 143 stopped by SIGTERM or SIGINT after checkpointing at a step
boundary (`STOPPED_EXIT_CODE`, `stop.py`; retryable), 1 any other failure (retryable: a
restart resumes from the newest usable checkpoint; the network, the Hub or the judge failing
is one).
Under `torchrun` every rank runs this; rank 0 writes the outputs and reports. See
`distributed.py` for how the node rank reaches torchrun, `report.py` for the report schema.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kubetune.api import RunConfig
from kubetune.api.dataplane import (
    CONFIG_ERROR_EXIT_CODE,
    JUDGE_API_KEY_ENV,
    STOPPED_EXIT_CODE,
    JudgeCounts,
    TrainingReport,
)
from kubetune.api.metrics import Metric
from kubetune.api.spec import EvaluationSpec, Method
from kubetune_trainer import allocator, hub, runconfig, sources
from kubetune_trainer.errors import ConfigError, Stopped
from kubetune_trainer.heldout import Calibration, HeldOut, HeldOutRecord
from kubetune_trainer.judge import JudgeError, JudgeResult, judge_pairwise
from kubetune_trainer.train import checkpoint, distributed, outputs, plancheck
from kubetune_trainer.train import deepspeed as dsconfig
from kubetune_trainer.train import model as models
from kubetune_trainer.train.data import Example
from kubetune_trainer.train.encoding import encode_prompt
from kubetune_trainer.train.evaluate import (
    BASE_EVALUATION,
    Evaluation,
    base_fingerprint,
    evaluate,
    judge_items,
    judge_max_tokens,
    judged,
    max_records,
    record_lines,
    save_base,
    saved_base,
    task_scores,
)
from kubetune_trainer.train.loop import run_steps, token_budget
from kubetune_trainer.train.prepare import PreparedData, load_datasets, prepare
from kubetune_trainer.train.report import write_final
from kubetune_trainer.train.stepper import DeepSpeedStepper, Stepper, TorchStepper
from kubetune_trainer.train.stop import StopSignal

log = logging.getLogger("kubetune_trainer")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer train")
    parser.add_argument("--config", required=True, type=Path, help="run.json (a RunConfig)")
    parser.add_argument("--output", required=True, type=Path, help="run directory")
    return parser.parse_args(argv)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def train(run: RunConfig, output: Path, ranks: distributed.Ranks, report: TrainingReport) -> None:
    spec = run.spec
    report.method = spec.method.value
    test_split = sources.builtin_split(spec.dataset.source, "test")
    report.test_split = str(test_split) if test_split is not None else None
    fmt, train_examples, validation_examples = load_datasets(run)
    location = sources.resolve_model(spec.model.source, spec.model.revision)
    model_source = f"spec.model.source {spec.model.source}" + (
        f" (revision {spec.model.revision})" if spec.model.revision else "")
    report.plan_mismatch = plancheck.check(run, location)
    with hub.configuration_errors(model_source):  # a missing repository is not retried
        tokenizer = models.load_tokenizer(location, spec)
    data = prepare(run, tokenizer, fmt, train_examples, validation_examples, ranks.world)
    report.format, report.total_steps = fmt, data.schedule.total_steps
    report.train_records, report.world_size = len(data.train), ranks.world
    report.truncated_records, report.dropped_records = data.truncated, data.dropped
    report.system_dropped_records = data.system_dropped
    if data.system_dropped and ranks.is_main:
        log.warning("the model's chat template leaves out the system message of %d of %d "
                    "records: the model trains and is served without it",
                    data.system_dropped, len(train_examples))

    device = distributed.device_for(ranks)
    use_ds = dsconfig.uses_deepspeed(run, ranks.world)
    distributed.init(ranks, use_ds)
    _seed(spec.training.seed)
    with hub.configuration_errors(model_source):
        base = models.load_base(location, spec, quantized=spec.method is Method.QLORA,
                                device=device)
    model = models.prepare(base, spec)
    if spec.method is not Method.QLORA:
        model = model.to(device)
    budget = token_budget(run)

    before = Evaluation()
    if ranks.is_main and data.validation:
        base_loaded = f"{model_source}, {'4-bit' if spec.method is Method.QLORA else 'full'}"
        before = _base_evaluation(model, tokenizer, data, budget, device, output, base_loaded)
    distributed.barrier()

    if use_ds:
        config = dsconfig.resolve(run, ranks.world, base.config.hidden_size, device.type == "cuda")
        if ranks.is_main:
            _write_json(output / "deepspeed.json", config)
        stepper: Stepper = DeepSpeedStepper(model, spec.training, data.schedule.total_steps,
                                           device, config)
    else:
        stepper = TorchStepper(model, spec.training, data.schedule.total_steps, device)
    report.deepspeed = use_ds

    resumed = checkpoint.resume(output / "checkpoints", stepper, ranks, device)
    start = resumed.step if resumed else 0
    if resumed:
        report.resumed_from_step = start
        log.info("resuming from step %d", start)

    # Signals are recorded (not fatal) only while steps run: see stop.py.
    with StopSignal().installed() as stop:
        result = run_steps(run, data, stepper, ranks, device, output, start,
                           tokenizer.pad_token_id, resumed.train_loss if resumed else None, stop)
    report.steps, report.train_loss = result.steps, result.train_loss
    report.epochs = round(result.steps / data.schedule.steps_per_epoch, 4)
    report.tokens_per_second = round(result.tokens / max(result.seconds, 1e-9), 2)
    report.train_tokens = result.tokens
    report.peak_memory_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        report.peak_gpu_memory_mib = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    report.allocator = allocator.active_allocator()

    trained = outputs.gather_trainable(stepper, ranks.is_main)
    if ranks.is_main:
        assert trained is not None
        final = stepper.model if not use_ds else outputs.rebuild(location, spec, trained, device)
        _finish(run, data, final, tokenizer, location, output, before, device, report)
    distributed.barrier()


def _base_evaluation(model: Any, tokenizer: Any, data: PreparedData, budget: int,
                     device: torch.device, output: Path, base_loaded: str) -> Evaluation:
    """The base model's score, measured once per run: a resumed attempt reads the first one's.

    Fresh adapters are zero (LoRA B = 0; DoRA's magnitude equals the weight norm), so the
    prepared model scores as the base does."""
    path = output / BASE_EVALUATION
    fingerprint = base_fingerprint(base_loaded, data.validation, data.validation_examples)
    saved = saved_base(path, fingerprint)
    if saved is not None:
        log.info("the base model's evaluation is the one an earlier attempt saved in %s", path)
        return saved
    before = evaluate(model, tokenizer, data.validation, data.validation_examples, budget, device)
    save_base(path, fingerprint, before)
    return before


def _finish(run: RunConfig, data: PreparedData, final: Any, tokenizer: Any,
            location: sources.ModelLocation, output: Path, before: Evaluation,
            device: torch.device, report: TrainingReport) -> None:
    """Rank 0: save the adapter, evaluate the result, save merged/, write evaluation.json.

    The adapter goes first: the greedy evaluation is the slowest and most memory-hungry part
    left. `merged/` comes after it, since LoRA and DoRA merge into the evaluated model in place
    (and the final checkpoint already holds a full fine-tune's weights)."""
    adapter = None
    if run.spec.method.uses_adapter:
        adapter = output / "adapter"
        outputs.save_adapter(final, tokenizer, adapter)
        report.adapter = "adapter"
    after = Evaluation()
    if data.validation:
        after = evaluate(final, tokenizer, data.validation, data.validation_examples,
                         token_budget(run), device)
    report.eval_loss, report.base_eval_loss = after.loss, before.loss
    report.accuracy, report.base_accuracy = after.accuracy, before.accuracy
    report.eval_records = after.records
    evaluation = run.spec.evaluation
    report.task = evaluation.task
    verdicts = None
    if data.validation:
        report.metrics = task_scores(evaluation, after, data.validation_examples)
        report.base_metrics = task_scores(evaluation, before, data.validation_examples)
        if judged(evaluation):
            verdicts = ask_judge(evaluation, data.validation_examples, before, after)
            report.judge = judge_counts(evaluation, verdicts)
            if verdicts.win_rate is not None:
                report.metrics.values[Metric.JUDGE_WIN_RATE] = verdicts.win_rate
    _write_json(output / "evaluation.json", {
        "baseEvalLoss": before.loss, "evalLoss": after.loss, "baseAccuracy": before.accuracy,
        "accuracy": after.accuracy, "records": after.records, "validationRecords":
        len(data.validation), "baseSamples": before.samples, "samples": after.samples,
    })
    lines = record_lines(evaluation, data.validation_examples, before, after, verdicts)
    (output / "evaluation.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    outputs.save_merged(location, run.spec, tokenizer, final, adapter, output / "merged")
    report.merged = "merged"
    held_out(data, tokenizer, run.spec.evaluation).write(output)
    Calibration(sequences=[r.input_ids for r in data.train[:CALIBRATION_RECORDS]]).write(output)


def ask_judge(evaluation: EvaluationSpec, examples: Sequence[Example], before: Evaluation,
              after: Evaluation) -> JudgeResult:
    """The LLM judge's verdicts on the answered validation records, base vs fine-tuned, with
    the key from `$KUBETUNE_JUDGE_API_KEY` (the judge's Secret on a pod, the shell's locally).

    A judge that cannot answer fails the run, never scores 0 or a tie: unreachable, timing
    out, busy (408, 429) or failing (5xx) is retryable (exit 1: the restart resumes from the
    final checkpoint, so only the evaluation is redone); any other refusal (401 a wrong key,
    404 a wrong URL or model, a reply that is no chat completion) is a configuration error
    (exit 2), since asking again gets the same answer."""
    assert evaluation.judge is not None
    items = judge_items(examples, before, after)
    log.info("asking the judge %s (model %s) about %d records, each in both orders",
             evaluation.judge.endpoint, evaluation.judge.model, len(items))
    try:
        return judge_pairwise(evaluation.judge, os.environ.get(JUDGE_API_KEY_ENV) or None,
                              items, max_tokens=judge_max_tokens())
    except JudgeError as error:
        message = f"spec.evaluation.judge: {error}"
        if error.retryable:
            raise JudgeError(message, error.status) from None
        raise ConfigError(message) from None


def judge_counts(evaluation: EvaluationSpec, verdicts: JudgeResult) -> JudgeCounts:
    assert evaluation.judge is not None
    return JudgeCounts(
        endpoint=evaluation.judge.endpoint, model=evaluation.judge.model,
        records=len(verdicts.items), comparisons=verdicts.comparisons, wins=verdicts.wins,
        losses=verdicts.losses, ties=verdicts.ties, unparsed=verdicts.unparsed,
    )


CALIBRATION_RECORDS = 128
"""Training records `quantization: GPTQ` calibrates on (~8k tokens on the quickstart, whose
GPTQ export then matched 85 of 100 test requests, FP32 84; more costs export time)."""


def held_out(data: PreparedData, tokenizer: Any, evaluation: EvaluationSpec) -> HeldOut:
    """The validation records the exporter scores quantized candidates and the exported
    model's task metrics on (`heldout.py`): the first `max_records()`, the ones the accuracy
    above was measured on."""
    records = []
    for encoded, example in list(zip(data.validation, data.validation_examples,
                                     strict=True))[: max_records()]:
        answered = example.reference is not None
        records.append(HeldOutRecord(
            input_ids=encoded.input_ids, labels=encoded.labels,
            prompt=encode_prompt(tokenizer, example) if answered else None,
            reference=example.reference,
        ))
    return HeldOut(records=records, task=evaluation.task, labels=evaluation.labels or [],
                   metrics=evaluation.metrics)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ranks = distributed.ranks_from_env()
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    report = TrainingReport()
    began = time.monotonic()
    code = 0
    try:
        train(runconfig.load(args.config), output, ranks, report)
        report.status = "Succeeded"
    except ConfigError as error:
        report.error = str(error)
        code = CONFIG_ERROR_EXIT_CODE
    except Stopped as error:
        report.error = str(error)
        report.steps = error.step
        code = STOPPED_EXIT_CODE
    except Exception as error:
        log.exception("training failed")
        report.error = f"{type(error).__name__}: {error}"
        code = 1
    report.runtime_seconds = round(time.monotonic() - began, 2)
    if code:
        log.error("%s", report.error)
    if ranks.is_main:
        write_final(output, report)
    distributed.shutdown()
    return code
