"""`kubetune run FILE.yaml`: the whole FineTuneJob on this machine, no cluster.

The same steps as the operator, with the same commands its pods run: validate the manifest
with the API models, plan, write `run.json`, train (`python -m kubetune_trainer train`, under
torchrun when the plan has several ranks), export to ONNX, apply the evaluation gate, serve on
localhost. Each step whose outputs are complete is skipped on a re-run, and the trainer resumes
from its newest checkpoint, so running the same command again continues an interrupted run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJob, ManifestError, RunConfig, load_manifest
from kubetune.api.dataplane import CONFIG_ERROR_EXIT_CODE, GateVerdict, TrainingReport
from kubetune.api.metrics import Metric
from kubetune.local.evaluate import load_chat_examples, metrics_table
from kubetune.local.modelconfig import read_model_config
from kubetune.local.processes import (
    Child,
    Interrupted,
    export_command,
    run_child,
    terminate_like_ctrl_c,
    train_command,
)
from kubetune.local.progress import ProgressView, plot_loss_curve
from kubetune.local.rundir import (
    export_done,
    export_precision,
    read_report,
    training_done,
    write_json,
    write_report,
)
from kubetune.local.serve import finish_with_server

EXIT_INTERRUPTED = 130


def add_run_command(subparsers: Any) -> None:
    """Register `kubetune run` on the CLI's subparsers."""
    run = subparsers.add_parser(
        "run",
        help="run a FineTuneJob on this machine: train, export, evaluate, serve",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    run.add_argument("file", type=Path, help="FineTuneJob manifest (YAML)")
    run.add_argument("--output", type=Path, help="run directory (default: runs/<name>)")
    run.add_argument("--serve", dest="serve", action="store_true", default=True,
                     help="keep serving on localhost until Ctrl-C (default)")
    run.add_argument("--no-serve", dest="serve", action="store_false",
                     help="stop after printing the endpoint and a sample answer")
    run.add_argument("--port", type=int, default=0, help="serving port (default: a free one)")
    run.add_argument("--test", type=Path,
                     help="held-out Chat JSONL to measure base vs fine-tuned exact-match "
                     "accuracy on (default: the built-in dataset's test split, if any)")
    run.set_defaults(func=run_main)


def fail(message: str, code: int) -> int:
    print(f"kubetune run: {message}", file=sys.stderr)
    return code


def run_main(args: argparse.Namespace) -> int:
    try:
        job = load_manifest(args.file)
    except ManifestError as error:
        return fail(str(error), CONFIG_ERROR_EXIT_CODE)
    except OSError as error:
        return fail(f"cannot read {args.file}: {error}", CONFIG_ERROR_EXIT_CODE)
    if args.test is not None:
        # Read now, not after training and export: a bad line must not cost the run.
        problem = test_split_problem(args.test)
        if problem is not None:
            return fail(problem, CONFIG_ERROR_EXIT_CODE)
    run_dir: Path = args.output or Path("runs") / job.metadata.name
    terminate_like_ctrl_c()
    try:
        config = prepare_run(job, run_dir)
    except ValueError as error:
        return fail(str(error), CONFIG_ERROR_EXIT_CODE)
    try:
        return execute(config, run_dir, args)
    except (Interrupted, KeyboardInterrupt):
        print("\nStopped. Run the same command again to resume from the newest checkpoint.",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def test_split_problem(path: Path) -> str | None:
    """What is wrong with a `--test` file (`file:line: problem`), or None."""
    try:
        examples = load_chat_examples(path)
    except ValueError as error:  # JsonlError
        return f"--test {error}"
    if not examples:
        return f"--test {path}: no Chat record ends in an assistant turn to compare with"
    return None


def build_run_config(job: FineTuneJob) -> RunConfig:
    """Spec + plan + DeepSpeed config, exactly what the operator puts into the ConfigMap;
    the plan is made for the model's config.json where this machine can read it."""
    from kubetune.planner.deepspeed import deepspeed_config
    from kubetune.planner.plan import plan

    resolved = plan(job.spec, read_model_config(job.spec.model.source))
    return RunConfig(
        name=job.metadata.name,
        namespace=None,
        generation=1,
        spec=job.spec,
        plan=resolved,
        deepspeed=deepspeed_config(job.spec, resolved),
    )


def prepare_run(job: FineTuneJob, run_dir: Path) -> RunConfig:
    """Plan and write `run.json`; a run directory holding another spec is refused."""
    config = build_run_config(job)
    path = run_dir / "run.json"
    if path.is_file():
        previous = RunConfig.model_validate_json(path.read_text())
        if training_spec(previous) != training_spec(config):
            raise ValueError(
                f"{run_dir} holds a run of a different spec; resuming it would mix two "
                "trainings. Use another --output directory or remove this one."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, config.to_wire())
    return config


def training_spec(config: RunConfig) -> dict[str, Any]:
    """The spec without `serving`: serving settings change the export, not the training."""
    wire = config.spec.to_wire()
    wire.pop("serving", None)
    return wire


def execute(config: RunConfig, run_dir: Path, args: argparse.Namespace) -> int:
    spec = config.spec
    print(f"Run directory: {run_dir}", file=sys.stderr)
    plan = config.plan
    print(f"Plan: {plan.world_size} process(es), ZeRO {plan.zero_stage}, micro-batch "
          f"{plan.micro_batch_size} x {plan.gradient_accumulation_steps} accumulation = "
          f"{plan.global_batch_size} sequences/step\n  ({plan.reason})", file=sys.stderr)

    if training_done(run_dir):
        print("Training: already complete, skipped.", file=sys.stderr)
    else:
        code = train(config, run_dir)
        if code != 0:
            return code
    plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    report = read_report(run_dir)
    print_training_report(report, run_dir)
    if not spec.serving.enabled:
        print("Serving is disabled (spec.serving.enabled: false); done.", file=sys.stderr)
        return 0

    if export_done(run_dir / "onnx", export_precision(config)):
        print("Export: already complete, skipped.", file=sys.stderr)
    else:
        code = export(config, run_dir)
        if code != 0:
            return code

    from kubetune.reconcile.gate import evaluate_gate

    # Nothing serves before `kubetune run` does: mustBeatServing has no model to beat.
    passed, message = evaluate_gate(spec.serving.gate, spec.evaluation.task, report, None)
    report.gate = GateVerdict(passed=passed, message=message)
    write_report(run_dir, report)
    print(f"Evaluation gate: {message}", file=sys.stderr)
    if not passed:
        return fail("the model did not pass the evaluation gate; not serving it", 1)
    return finish_with_server(config, run_dir, args, report)


def train(config: RunConfig, run_dir: Path) -> int:
    resuming = any((run_dir / "checkpoints").glob("*/COMPLETE"))
    print("Training: resuming from the newest checkpoint." if resuming else "Training:",
          file=sys.stderr)
    command = train_command(run_dir / "run.json", run_dir, config.plan)
    view = ProgressView(run_dir / "metrics.jsonl")
    child = Child(command, run_dir / "logs" / "train.log")
    try:
        code = run_child(child, on_tick=view.update)
    finally:
        view.close()
    if code == CONFIG_ERROR_EXIT_CODE:
        # The trainer names the field or the dataset file:line in its report's error.
        error = read_report(run_dir).error or child.log_tail(8)
        return fail(f"the trainer refused the configuration or dataset:\n  {error}",
                    CONFIG_ERROR_EXIT_CODE)
    if code != 0:
        mismatch = read_report(run_dir).plan_mismatch
        return fail(f"training failed (exit code {code}); last log lines:\n{child.log_tail()}"
                    f"\nFull log: {child.log_path}. Re-run to resume."
                    + (f"\nNote: {mismatch}" if mismatch else ""), code)
    return 0


def export(config: RunConfig, run_dir: Path) -> int:
    serving = config.spec.serving
    print(f"Export: ONNX ({serving.precision.value}, {serving.device.value})...", file=sys.stderr)
    quantization = serving.quantization.value if serving.quantization else None
    command = export_command(run_dir, run_dir / "onnx", serving.precision.value,
                             serving.device.value, quantization)
    child = Child(command, run_dir / "logs" / "export.log")
    code = run_child(child)
    if code != 0:
        return fail(f"export failed (exit code {code}):\n{child.log_tail()}",
                    CONFIG_ERROR_EXIT_CODE if code == CONFIG_ERROR_EXIT_CODE else code)
    return 0


def print_training_report(report: TrainingReport, run_dir: Path) -> None:
    lines = ["Training report:"]
    for value, label in ((report.eval_loss, "validation loss"),
                         (report.base_eval_loss, "base validation loss"),
                         (report.accuracy, "validation accuracy"),
                         (report.base_accuracy, "base validation accuracy")):
        if value is not None:
            lines.append(f"  {label:26} {value:.4f}")
    if report.metrics is not None:
        # The rows above already say the loss and the exact match (accuracy).
        rows = metrics_table(report.base_metrics, report.metrics,
                             shown={Metric.EVAL_LOSS, Metric.EXACT_MATCH})
        if rows:
            task = report.task.value if report.task is not None else "task"
            lines += [f"  {task} metrics on {report.metrics.records} validation records:",
                      *(f"  {row}" for row in rows)]
    if report.judge is not None:
        judge = report.judge
        lines.append(f"  judge {judge.model} ({judge.endpoint}): fine-tuned vs base "
                     f"{judge.wins} wins, {judge.losses} losses, {judge.ties} ties "
                     f"({judge.unparsed} unparsed) in {judge.comparisons} comparisons of "
                     f"{judge.records} records; verdicts in {run_dir / 'evaluation.jsonl'}")
    if (run_dir / "loss.png").is_file():
        lines.append(f"  loss curve                 {run_dir / 'loss.png'}")
    if report.plan_mismatch:
        lines.append(f"  note: {report.plan_mismatch}")
    if report.system_dropped_records:
        lines.append(f"  note: the model's chat template left out the system message of "
                     f"{report.system_dropped_records} of {report.train_records} training "
                     "records; it trained, and serves, without them")
    print("\n".join(lines), file=sys.stderr)
