"""`python -m kubetune_trainer export`: a trained model to a verified ONNX Runtime GenAI model.

    export --input DIR --output DIR --precision INT4|INT8|FP16|FP32|Auto --device CPU|CUDA
           [--quantization RTN|RTNLast|KQuant|KQuantMixed|GPTQ] [--base DIR]
           [--calibration-from RUN_DIR]

`--input` is a run directory holding `merged/` or `adapter/`, an adapter directory, or a plain
transformers model directory. An adapter is merged into its base (from `--base`, the run's
`run.json`, or the adapter's `base_model_name_or_path`, in that order) in FP32 first: the builder
then quantizes the merged weights once, which is what PEFT recommends over merging into
quantized weights. `--output` receives the model the server loads: `genai_config.json`,
`model.onnx(.data)`, the training tokenizer files and `export.json`.

Nothing is reported as exported before it is verified: the serving tokenizer must produce the
training tokenizer's ids on every parity case, and greedy continuations must match PyTorch token
for token at FP32 (FP16: the same threshold as INT4's rounding allows) or agree above a measured
threshold at INT4. A failed check exits 1 with the reason in export.json and on stderr; a bad
invocation exits 2 (not retryable). A verified model from a run directory is then scored on the
run's task metrics on its held-out records (`evaluate.py`), recorded as export.json's `metrics`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubetune.api.dataplane import (
    CONFIG_ERROR_EXIT_CODE,
    AutoChoice,
    ExportReport,
    resolve_precision,
    resolve_quantization,
    write_termination_message,
)
from kubetune.api.spec import Precision, Quantization
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.export.builder_input import UnsupportedConfig
from kubetune_trainer.export.builder_input import extra_options as builder_extra_options
from kubetune_trainer.export.builder_input import prepare as prepare_builder_input
from kubetune_trainer.export.evaluate import exported_metrics
from kubetune_trainer.heldout import Calibration, HeldOut

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Teacher-forced top-1 agreement with PyTorch FP32 that a quantized export must reach. Measured
# on SmolLM2-135M (RTN block 32, accuracy_level 4, lm_head in INT4 too): 0.667 on PROMPTS' three
# prompts, 0.711 on a four-prompt set. The bar sits below that with room for a fine-tuned model's
# own rounding, and far above what an export that computes the wrong thing would reach (it would
# not follow PyTorch's argmax beyond common tokens; an expectation, not a measurement). FP16 rounds
# far less than INT4 and gets a higher bar (not measured here: no GPU on this machine).
AGREEMENT_THRESHOLDS = {"int4": 0.55, "int8": 0.55, "fp16": 0.9}
PARITY_TOKENS = 32


def builder_precision(precision: str, device: str) -> str:
    """The builder's precision name (`int4`, `int8`, `fp16`, `fp32`) for `--precision` on
    `--device`; what `Auto` means is `kubetune.api.dataplane.resolve_precision`'s to say."""
    try:
        return resolve_precision(precision, device).value.lower()
    except ValueError as error:
        raise ConfigError(f"--precision/--device: {error}") from None


def builder_quantization(quantization: str | None, precision: str) -> Quantization | None:
    try:
        return resolve_quantization(quantization, Precision(precision.upper()))
    except ValueError as error:
        raise ConfigError(f"--quantization: {error}") from None


# The builder's `algo_config` per INT4 method (its names for them). RTN is the builder's
# default (no algo_config), what every INT4 export before the choice existed was.
ALGORITHMS = {
    Quantization.RTN: None,
    Quantization.RTN_LAST: "rtn_last",
    Quantization.K_QUANT: "k_quant",
    Quantization.K_QUANT_MIXED: "k_quant_mixed",
    Quantization.GPTQ: None,  # RTN's graph, re-rounded afterwards (requantize.py)
}


def builder_options(precision: str, device: str, quantization: Quantization | None) -> list[str]:
    """`--extra_options` for the builder. Blocks of 32 with int8 activations (accuracy_level
    4) are Microsoft's CPU choice for 4-bit weights; INT8 weights take the same activations."""
    if precision not in ("int4", "int8"):
        return []
    options = ["block_size=32"] + (["accuracy_level=4"] if device.upper() == "CPU" else [])
    algorithm = None if quantization is None else ALGORITHMS[quantization]
    if algorithm is not None:
        options.append(f"algo_config={algorithm}")
    return options


def builder_command(
    model_dir: Path,
    output: Path,
    precision: str,
    device: str,
    cache: Path,
    quantization: Quantization | None = None,
    structural: tuple[str, ...] = (),
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(model_dir),
        "-o",
        str(output),
        "-p",
        precision,
        "-e",
        device.lower(),
        "-c",
        str(cache),
    ]
    options = [*builder_options(precision, device, quantization), *structural]
    if options:
        command += ["--extra_options", *options]
    return command


def _base_from_run_json(run_json: Path) -> Path | None:
    if not run_json.is_file():
        return None
    from kubetune.api.runconfig import RunConfig
    from kubetune_trainer.sources import resolve_model

    config = RunConfig.model_validate(json.loads(run_json.read_text()))
    location = resolve_model(str(config.spec.model.source))
    return Path(location.name_or_path) if not location.is_hub else None


def _base_from_adapter(adapter: Path) -> Path | None:
    named = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not named:
        return None
    if named.startswith("builtin://") or named in _builtin_names():
        from kubetune_trainer.builtin import builtin_model_dir

        return builtin_model_dir(named.removeprefix("builtin://"))
    path = Path(named) if Path(named).is_absolute() else adapter / named
    return path if (path / "config.json").is_file() else None


def _builtin_names() -> tuple[str, ...]:
    from kubetune_trainer.builtin import BUILTIN_MODELS

    return tuple(BUILTIN_MODELS)


def input_path(given: str) -> Path:
    """`--input`: a directory, or a model source URI resolved as the trainer resolves
    `spec.model.source` (so `kubetune run` hands over `builtin://` as a pod would)."""
    if "://" not in given:
        return Path(given)
    from kubetune_trainer.sources import resolve_model

    location = resolve_model(given)
    if location.is_hub:
        raise ConfigError(f"--input {given}: a Hub model is not exported directly; train first")
    return Path(location.name_or_path)


def resolve_input(source: Path, base: Path | None) -> tuple[Path, Path | None]:
    """(model or adapter dir, base dir when it is an adapter) for `--input`."""
    if (source / "merged" / "config.json").is_file():
        return source / "merged", None
    adapter = source / "adapter" if (source / "adapter").is_dir() else source
    if (adapter / "adapter_config.json").is_file():
        found = base or _base_from_run_json(source / "run.json") or _base_from_adapter(adapter)
        if found is None or not (found / "config.json").is_file():
            raise ConfigError(
                f"{adapter} is an adapter but its base model was not found: pass --base DIR"
            )
        return adapter, found
    if (source / "config.json").is_file():
        return source, None
    raise ConfigError(f"{source} holds no merged/, adapter/ or transformers model")


def merge_adapter(adapter: Path, base: Path, target: Path) -> None:
    """Merge a PEFT adapter into an FP32 copy of its base and save model + tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(target))
    tokenizer_source = adapter if (adapter / "tokenizer.json").is_file() else base
    copy_tokenizer(tokenizer_source, target)


def copy_tokenizer(source: Path, target: Path) -> None:
    """The training tokenizer files, byte for byte (the builder's re-saved copy is replaced),
    except a tokenizer.json whose pipeline is not the one transformers runs on it for this
    model (`tokenizer_parity.training_pipeline`): the one training ran replaces it."""
    from kubetune_trainer.export.tokenizer_parity import training_pipeline

    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    pipeline = training_pipeline(source)
    if pipeline is not None:
        (target / "tokenizer.json").write_text(pipeline, encoding="utf-8")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def verify(model_dir: Path, output: Path, precision: str, report: ExportReport) -> list[str]:
    """Run both parity checks, record them in `report`, and return the failures."""
    from kubetune_trainer.export import parity
    from kubetune_trainer.export.tokenizer_parity import check_genai_tokenizer, check_parity
    from kubetune_trainer.tokenizer import ServingTokenizer

    failures: list[str] = []
    serving = ServingTokenizer.load(output)
    started = time.monotonic()
    tokens = check_parity(model_dir, serving)
    tokens["seconds"] = round(time.monotonic() - started, 2)
    if _differs(model_dir / "tokenizer.json", output / "tokenizer.json"):
        tokens["tokenizerJson"] = ("the pipeline transformers runs for this model, which is "
                                   "not the training tokenizer.json's own")
    report.tokenizer_parity = tokens
    report.genai_tokenizer = check_genai_tokenizer(output, serving)
    if not tokens["ok"]:
        first = tokens["mismatches"][0]
        failures.append(
            f"tokenizer parity: {tokens['mismatchCount']} of {tokens['cases']} cases differ; "
            f"first: {first['kind']} of {first['input']!r}: training {first['training']!r} "
            f"!= serving {first['serving']!r}"
        )
        return failures  # output parity through a wrong tokenizer would say nothing new
    try:
        result = parity.measure(model_dir, output, serving, PARITY_TOKENS)
    except parity.OnnxRuntimeRefused as error:  # the graph, or the inputs it was given
        failures.append(f"output parity: ONNX Runtime could not run the model: {error}")
        return failures
    output_parity = result.to_json()
    if precision == "fp32":
        output_parity["required"] = "exact match of every continuation"
        output_parity["ok"] = result.exact_matches == len(result.first_divergence)
    else:
        threshold = AGREEMENT_THRESHOLDS[precision]
        output_parity["required"] = f"teacherForcedAgreement >= {threshold}"
        output_parity["ok"] = result.teacher_forced_agreement >= threshold
    report.output_parity = output_parity
    if not output_parity["ok"]:
        failures.append(
            f"output parity: {output_parity['required']} not met: {json.dumps(output_parity)}"
        )
    return failures


def _differs(first: Path, second: Path) -> bool:
    return first.is_file() and second.is_file() and first.read_bytes() != second.read_bytes()


def build(model_dir: Path, staging: Path, precision: str, device: str, scratch: Path,
          method: Quantization | None, calibration: Calibration | None,
          report: ExportReport) -> str | None:
    """Run the builder into `staging`, re-round GPTQ's weights, and copy the training
    tokenizer beside the model; the failure (the builder's log tail), or None."""
    if method is Quantization.GPTQ and (calibration is None or not calibration.sequences):
        return "GPTQ needs calibration tokens: the run directory has no calibration.json"
    try:
        builder_input, changes = prepare_builder_input(model_dir, scratch)
    except UnsupportedConfig as unsupported:
        return f"config.json: {unsupported}"
    report.builder_config_changes = changes or None
    log = scratch / f"builder-{staging.name}.log"
    with log.open("w") as sink:
        built = subprocess.run(
            builder_command(builder_input, staging, precision, device, scratch / "cache", method,
                            tuple(builder_extra_options(builder_input))),
            stdout=sink,
            stderr=subprocess.STDOUT,
            check=False,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    if built.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        return f"model builder exited {built.returncode}: {tail}"
    if method is Quantization.GPTQ and calibration is not None:
        error = gptq_in_place(model_dir, staging, calibration)
        if isinstance(error, str):
            return error
        report.calibration_sequences = len(calibration.sequences)
        report.output_error_vs_rtn = round(error, 4)
    copy_tokenizer(model_dir, staging)
    return None


def gptq_in_place(model_dir: Path, staging: Path, calibration: Calibration) -> float | str:
    """Re-round the RTN build in `staging` by GPTQ: its output error relative to RTN's, or why
    it could not."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.export.requantize import requantize

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    try:
        return requantize(staging, model, calibration.sequences)
    except (ValueError, AttributeError) as error:  # a layout or architecture it does not know
        return f"GPTQ: {error}"


def choose_automatically(
    source: Path, model_dir: Path, scratch: Path, calibration: Calibration | None,
    report: ExportReport,
) -> tuple[Path, str, Quantization | None] | str:
    """`precision: Auto` on CPU (`auto.py`): build and score candidates fastest first; the
    staging directory, precision and method of the first that keeps FP32's quality (FP32,
    built last, when none does), or FP32's build failure. A candidate whose build fails is
    recorded as failed and the next one tried."""
    from kubetune_trainer.export import auto
    from kubetune_trainer.tokenizer import ServingTokenizer

    started = time.monotonic()
    serving = ServingTokenizer.load(model_dir)
    held_out = HeldOut.read(source) or auto.fallback_held_out(
        model_dir, serving, PARITY_TOKENS)
    reference = auto.torch_reference(model_dir, held_out)
    fp32 = auto.Candidate(Precision.FP32)
    report.auto = AutoChoice(
        rule=auto.rule(reference.score, held_out.task), held_out_records=len(held_out.records),
        answers=len(held_out.answers), seconds=round(time.monotonic() - started, 1),
        fp32=auto.score_report(fp32, reference.score, True, "the reference", 0.0, held_out.task),
    )
    for index, candidate in enumerate(auto.candidates(calibration is not None)):
        started = time.monotonic()
        precision = candidate.precision.value.lower()
        staging = scratch / f"candidate-{index}"
        failure = build(model_dir, staging, precision, "CPU", scratch, candidate.quantization,
                        calibration, report)
        if failure is None:
            try:
                tried = auto.try_candidate(candidate, staging, reference,
                                           time.monotonic() - started)
            except auto.onnxruntime_errors() as error:  # it refused the graph or its inputs
                tried = auto.failed_build(candidate, f"ONNX Runtime could not run it: {error}",
                                          time.monotonic() - started, stage="scoring failed")
        else:
            tried = auto.failed_build(candidate, failure, time.monotonic() - started)
        report.auto.candidates.append(tried)
        print(f"auto: {tried.to_json(indent=None)}", file=sys.stderr, flush=True)
        if tried.passed:
            return staging, precision, candidate.quantization
        shutil.rmtree(staging, ignore_errors=True)
    staging = scratch / "fp32"
    failure = build(model_dir, staging, "fp32", "CPU", scratch, None, None, report)
    return failure if failure is not None else (staging, "fp32", None)


def export(
    source: Path,
    output: Path,
    precision: str,
    device: str,
    base: Path | None,
    quantization: str | None = None,
    calibration_from: Path | None = None,
) -> int:
    started = time.monotonic()
    automatic = str(precision).upper() == "AUTO" and str(device).upper() == "CPU"
    precision = builder_precision(precision, device)
    method = builder_quantization(quantization, precision)
    if automatic and quantization is not None:
        raise ConfigError("--quantization: Auto chooses the method itself; give --precision INT4")
    if method is Quantization.GPTQ and str(device).upper() != "CPU":
        raise ConfigError("--quantization GPTQ: built for CPU's MatMulNBits layout only")
    calibration = Calibration.read(calibration_from or source)
    if method is Quantization.GPTQ and calibration is None:
        raise ConfigError(f"--quantization GPTQ: {calibration_from or source} has no "
                          "calibration.json (the trainer writes it): export a training run "
                          "directory, or pass --calibration-from RUN_DIR")
    model_dir, adapter_base = resolve_input(source, base)
    report = ExportReport(input=str(source), device=device.upper(),
                          requested="Auto" if automatic else None)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=output.parent) as scratch:
        if adapter_base is not None:
            merged = Path(scratch) / "merged"
            step = time.monotonic()
            merge_adapter(model_dir, adapter_base, merged)
            report.timings["mergeSeconds"] = round(time.monotonic() - step, 2)
            report.adapter, report.base = str(model_dir), str(adapter_base)
            model_dir = merged
        step = time.monotonic()
        if automatic:
            chosen = choose_automatically(source, model_dir, Path(scratch), calibration, report)
            if isinstance(chosen, str):
                return fail(output, report, [chosen])
            staging, precision, method = chosen
        else:
            staging = Path(scratch) / "onnx"
            failure = build(model_dir, staging, precision, device, Path(scratch), method,
                            calibration, report)
            if failure is not None:
                return fail(output, report, [failure])
        report.precision = precision.upper()
        report.quantization = None if method is None else method.value
        if method is not Quantization.GPTQ:  # an Auto candidate's, not this export's
            report.calibration_sequences = report.output_error_vs_rtn = None
        report.timings["buildSeconds"] = round(time.monotonic() - step, 2)
        report.sizes = {
            "modelBytes": sum(f.stat().st_size for f in staging.glob("model.onnx*")),
            "totalBytes": directory_bytes(staging),
        }
        step = time.monotonic()
        failures = verify(model_dir, staging, precision, report)
        report.timings["verifySeconds"] = round(time.monotonic() - step, 2)
        if failures:
            return fail(output, report, failures)
        held_out = HeldOut.read(source)
        if held_out is not None:
            step = time.monotonic()
            report.metrics = exported_metrics(staging, held_out)
            report.timings["evaluateSeconds"] = round(time.monotonic() - step, 2)
        # Replace the old export only now, so a failed run never leaves a half-verified model.
        for item in staging.iterdir():
            target = output / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    report.ok = True
    report.timings["totalSeconds"] = round(time.monotonic() - started, 2)
    write_report(output, report)
    print(json.dumps({"exported": str(output), "weights": report.weights, **report.sizes}))
    return 0


def write_report(output: Path, report: ExportReport) -> None:
    """`export.json`, and its short form as the pod's termination message."""
    staged = output / ".export.json.tmp"
    staged.write_text(report.to_json())
    os.replace(staged, output / "export.json")
    write_termination_message(report.short_form())


def fail(output: Path, report: ExportReport, failures: list[str]) -> int:
    report.ok = False
    report.failures = failures
    write_report(output, report)
    for failure in failures:
        print(f"export failed: {failure}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer export")
    parser.add_argument("--input", required=True,
                        help="a directory, or a model source such as builtin://NAME")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--precision", default="Auto", help="INT4, INT8, FP16, FP32 or Auto")
    parser.add_argument(
        "--quantization",
        help="INT4's rounding: RTN (default), RTNLast, KQuant, KQuantMixed or GPTQ",
    )
    parser.add_argument("--device", default="CPU", help="CPU or CUDA")
    parser.add_argument("--base", type=Path, help="base model of an adapter input")
    parser.add_argument("--calibration-from", type=Path,
                        help="the run directory whose calibration.json GPTQ uses (default: "
                        "--input)")
    args = parser.parse_args(argv)
    try:
        return export(
            input_path(args.input),
            args.output,
            args.precision,
            args.device,
            args.base,
            args.quantization,
            args.calibration_from,
        )
    except ConfigError as error:
        print(f"export: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
