"""What crosses between the control plane and the data plane, besides the run config.

The trainer, the exporter and the server (`kubetune_trainer`) write these; the operator and
`kubetune run` read them. One definition each, so both planes agree on every key, every exit
code and every rule they both apply:

- `ProgressReport`: the body a trainer POSTs to the operator while it trains.
- `TrainingReport`: `report.json` and, in short form, the trainer pod's termination message.
- `ExportReport`: `export.json`, written by the exporter once the model is verified, with
  `AutoChoice` and its `CandidateScore`s when `precision: Auto` chose by measurement.
- `CONFIG_ERROR_EXIT_CODE`: the exit code of a run that retrying cannot fix.
- `STOPPED_EXIT_CODE`: the exit code of a trainer stopped by a signal after its checkpoint.
- `MODEL_TOKEN_ENV`, `DATASET_TOKEN_ENV`, `API_KEY_ENV`, `JUDGE_API_KEY_ENV`: the env vars
  the spec's Secrets reach pods as.
- `resolve_precision`: what `precision: Auto` means on a device; `resolve_quantization`:
  INT4's rounding method.
- `cache_root`: where converted models are cached on a machine.
- `write_termination_message`: how a data-plane pod hands its short report to the operator.
- `read_jsonl`: how a JSONL dataset splits into numbered records (the trainer's datasets and
  `kubetune run`'s test split), with `JsonlError` naming the file and line of a bad one.
"""

from __future__ import annotations

import codecs
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from kubetune.api.metrics import MetricScores, Task
from kubetune.api.spec import Device, Precision, Quantization

CONFIG_ERROR_EXIT_CODE = 2
"""A bad run config, dataset or export invocation: the Jobs' podFailurePolicy does not retry
it, and `kubetune run` reports it as a configuration error."""
HEAD_CHUNK_ROWS = 512
"""Target positions the trainer's chunked loss puts through the output head at once
(`kubetune_trainer/train/chunked_loss.py`); the planner's memory model counts that many."""

MODEL_TOKEN_ENV = "HF_TOKEN"
"""The model's Secret (`spec.model.secretRef`); also the dataset's when only it has one. The
name the Hugging Face libraries read on their own."""

DATASET_TOKEN_ENV = "KUBETUNE_DATASET_TOKEN"
"""The dataset's own Secret (`spec.dataset.secretRef`) when the model has another one: the
trainer reads a dataset with it, falling back to `MODEL_TOKEN_ENV`."""

API_KEY_ENV = "KUBETUNE_API_KEY"
"""The inference server's API key (`spec.serving.apiKeySecretRef`; `serve --api-key` locally):
from a Secret through the environment, so it is in neither the pod's args nor the process
list."""

JUDGE_API_KEY_ENV = "KUBETUNE_JUDGE_API_KEY"
"""The LLM judge's API key (`spec.evaluation.judge.apiKeySecretRef`), on the trainer pod only
(the trainer asks the judge); `kubetune run`'s trainer inherits it from the shell. Never in
the run config or the args."""

STOPPED_EXIT_CODE = 143
"""The trainer got SIGTERM or SIGINT (eviction, preemption, `kubetune run`'s Ctrl-C), wrote a
checkpoint at the next step boundary and stopped: retryable, a restart resumes from it.
128 + SIGTERM, what a shell or the kubelet reports for a process ended by SIGTERM, so a stop
reads the same whether the trainer or the signal ended it; the log says which."""


TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
"""Where a data-plane pod writes its termination message (default /dev/termination-log)."""


def write_termination_message(text: str) -> None:
    """Hand the operator a pod's short report through the kubelet's termination message;
    silently nothing outside a pod (the report file is enough there)."""
    path = os.environ.get(TERMINATION_LOG_ENV, "/dev/termination-log")
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError:
        pass


class Report(BaseModel):
    """camelCase JSON; keys a newer writer adds are ignored by an older reader."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=indent,
                          ensure_ascii=False)

    @classmethod
    def parse(cls, text: str | None) -> Self | None:
        """A report from JSON text (a file or a termination message), or None when the text
        is no report (a crash's message, say)."""
        if not text:
            return None
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return None

    @classmethod
    def read(cls, path: Path) -> Self | None:
        """The report in `path`, or None when there is none (yet) or it is no report."""
        try:
            return cls.parse(path.read_text())
        except OSError:
            return None


class ProgressReport(Report):
    """What a trainer posts to the operator's progress endpoint (rank 0, throttled).
    A diverged run's NaN or infinite loss reads as unknown: status holds decimals only."""

    step: int = Field(ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None

    @field_validator("epoch", "train_loss", "eval_loss", "tokens_per_second", "eta_seconds")
    @classmethod
    def _finite_or_unknown(cls, value: float | None) -> float | None:
        return value if value is None or math.isfinite(value) else None


class Score(Report):
    """Exact-match accuracy of greedy answers on some held-out records, and their task
    metrics."""

    accuracy: float = 0.0
    correct: int = 0
    total: int = 0
    samples: list[dict[str, Any]] = Field(default_factory=list)
    """A few (request, answer, reference) records, for a reader to see what was asked."""
    metrics: MetricScores | None = None
    """The answers scored on `spec.evaluation`'s task metrics (no loss: an endpoint's
    answers have none)."""


class GateVerdict(Report):
    passed: bool
    message: str


class TestSplitScores(Report):
    """Base and fine-tuned accuracy and task metrics on a test split, measured through the
    served model (`kubetune run`); re-measured when the split, the precision, the engine or
    the task changes."""

    path: str
    engine: str
    precision: str
    task: Task | None = None
    base: Score | None = None
    fine_tuned: Score


class ServedAdapter(Report):
    """One LoRA adapter a server serves beside its base: requests name it as their `model`."""

    name: str
    path: str
    """The PEFT adapter directory (adapter_config.json and its weights)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """The adapter's validation metrics when it passed its gate (metric name -> value): what
    its job's next generation must beat under `mustBeatServing`, as a Deployment of its own
    keeps them in an annotation. The server does not read them."""


class AdapterSet(Report):
    """The adapters a shared server loads at start (`serve --lora-modules-file`, from the
    pool's ConfigMap), so a replica that restarts serves the current set; changes while it runs
    arrive through `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's names)."""

    adapters: list[ServedAdapter] = Field(default_factory=list)


class JudgeCounts(Report):
    """The LLM judge's record of the fine-tuned model against the base model
    (`spec.evaluation.judge`): each record judged twice, once in each order. Its win rate is
    `metrics.values.judgeWinRate`; the verdicts, record by record, are in `evaluation.jsonl`."""

    endpoint: str
    model: str
    records: int = 0
    """Records judged (each twice)."""
    comparisons: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    """Ties, the unparsed replies included."""
    unparsed: int = 0
    """Replies that named neither answer (counted as ties): many of them mean the judge does
    not follow the verdict format, and its win rate says little."""


class TrainingReport(Report):
    """`report.json`: what a training run did. Every field has a default, so a short form
    (the termination message) and a report rebuilt from status read as the same model."""

    status: Literal["Succeeded", "Failed"] = "Failed"
    error: str | None = None
    """Why it failed: names the field, or the dataset file and line."""
    steps: int = 0
    """Optimizer steps done."""
    total_steps: int = 0
    epochs: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    """Mean token cross-entropy on the validation records."""
    base_eval_loss: float | None = None
    accuracy: float | None = None
    """Exact match (`metrics.exact_match`) of greedy answers on validation records, 0-1."""
    base_accuracy: float | None = None
    eval_records: int = 0
    """Records the accuracy used."""
    task: Task | None = None
    """The evaluation task (`spec.evaluation.task`) the metrics below belong to."""
    metrics: MetricScores | None = None
    """The fine-tuned model's task metrics on the validation records (`kubetune.api.metrics`)."""
    base_metrics: MetricScores | None = None
    """The base model's, on the same records (no `judgeWinRate`: the win rate is already the
    fine-tuned model measured against the base)."""
    judge: JudgeCounts | None = None
    """The LLM judge's wins, losses, ties and unparsed replies, when a judge was asked."""
    tokens_per_second: float | None = None
    train_tokens: int = 0
    peak_memory_mib: float | None = Field(None, alias="peakMemoryMiB")
    """Rank 0's peak resident memory (RSS high-water mark) from start to the last step: what
    a CPU run needs; compare `status.plan.estimatedHostMemoryGiB`."""
    peak_gpu_memory_mib: float | None = Field(None, alias="peakGpuMemoryMiB")
    """Rank 0's peak GPU memory allocated by PyTorch during the steps (GPU runs)."""
    allocator: str | None = None
    """The malloc the trainer ran under: `tcmalloc`, `jemalloc` or `system`."""
    train_records: int = 0
    truncated_records: int = 0
    dropped_records: int = 0
    system_dropped_records: int = 0
    """Records whose system message the model's chat template leaves out (Phi-3's template
    has no system turn): the model trains, and is served, without it."""
    adapter: str | None = None
    """`adapter` when an adapter was saved (relative to the output directory)."""
    merged: str | None = None
    """`merged` once the merged model is saved (relative to the output directory)."""
    method: str | None = None
    format: str | None = None
    world_size: int = 1
    deepspeed: bool = False
    resumed_from_step: int | None = None
    runtime_seconds: float = 0.0
    plan_mismatch: str | None = None
    """What differs between the model the plan was made for (`status.plan`: parameters,
    hiddenSize, layers) and the model's config.json, field by field, as the trainer found at
    start (`kubetune.api.modelconfig.plan_mismatch`); None when they agree."""
    test_split: str | None = None
    """The held-out test file shipped beside a built-in dataset, if any."""
    gate: GateVerdict | None = None
    """Written by `kubetune run` after the evaluation gate (the operator keeps it in status)."""
    test: TestSplitScores | None = None
    """Written by `kubetune run` after measuring the served model on a test split."""

    @property
    def succeeded(self) -> bool:
        return self.status == "Succeeded"


class CandidateScore(Report):
    """One quantized candidate `precision: Auto` built and scored against FP32."""

    precision: str
    quantization: str | None = None
    accuracy: float | None = None
    """Greedy exact match on the held-out answers; None without any."""
    agreement: float | None = None
    """Teacher-forced top-1 agreement with FP32's argmax over the held-out target tokens."""
    loss: float | None = None
    """Mean held-out target-token loss."""
    task_metric: str | None = None
    """The task's metric its answers were judged by (chrF for Translation, ...); None when
    it was judged teacher-forced (no answers, or a task judged by its loss)."""
    task_score: float | None = None
    passed: bool = False
    reason: str = ""
    seconds: float = 0.0
    """Building and scoring it."""

    @property
    def weights(self) -> str:
        return weights_label(self.precision, self.quantization)

    def describe(self) -> str:
        """Its score as the rule reads it: the task's metric (and exact match), else
        agreement and loss."""
        exact = None if self.accuracy is None else f"exact match {100 * self.accuracy:.1f}%"
        if self.task_metric is not None and self.task_score is not None:
            if self.task_metric == "exactMatch":
                return str(exact)
            judged = f"{self.task_metric} {self.task_score:.3f}"
            return judged if exact is None else f"{judged}, {exact}"
        if exact is not None:
            return exact
        return f"agreement {100 * (self.agreement or 0):.1f}%, loss {self.loss or 0:.3f}"


class AutoChoice(Report):
    """What `precision: Auto` tried, fastest first, and by what rule it chose."""

    rule: str
    held_out_records: int
    answers: int
    """Held-out records with a reference answer (exact match decides when there are any)."""
    fp32: CandidateScore
    candidates: list[CandidateScore] = Field(default_factory=list)
    seconds: float = 0.0
    """Scoring FP32."""


class ExportReport(Report):
    """`export.json`: what was exported and how it was verified. `ok` is true only once the
    tokenizer and output parity checks passed."""

    ok: bool = False
    failures: list[str] = Field(default_factory=list)
    """Why the export was refused (a failed check, the builder's exit)."""
    input: str | None = None
    adapter: str | None = None
    """The adapter merged into `base` before the build, when the input was an adapter."""
    base: str | None = None
    requested: str | None = None
    """`Auto` when the precision was chosen by measurement (`auto`), else None."""
    precision: str | None = None
    """The exported precision: INT4, INT8, FP16 or FP32 (never Auto)."""
    quantization: str | None = None
    """INT4's rounding method (`spec.serving.quantization`); None for other precisions."""
    auto: AutoChoice | None = None
    calibration_sequences: int | None = None
    """GPTQ: the training records it calibrated on."""
    output_error_vs_rtn: float | None = None
    """GPTQ: the layers' summed output error on the calibration tokens, relative to RTN's."""
    builder_config_changes: list[str] | None = None
    """What the exporter rewrote in a staging copy of config.json so the ONNX builder reads the
    model right (per-layer-type RoPE, a sliding window on every layer); None: nothing."""
    device: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    sizes: dict[str, int] = Field(default_factory=dict)
    tokenizer_parity: dict[str, Any] | None = None
    genai_tokenizer: dict[str, Any] | None = None
    output_parity: dict[str, Any] | None = None
    metrics: MetricScores | None = None
    """The exported weights' task metrics (`kubetune.api.metrics`, the task the trainer
    recorded in `heldout.json`) on the held-out validation records: what will serve, judged
    as the trainer judged the fine-tuned model. None without held-out records."""

    @property
    def weights(self) -> str:
        """`weights_label` of this export."""
        return weights_label(self.precision, self.quantization)

    def short_form(self) -> str:
        """The export pod's termination message (at most 4096 bytes): what the operator puts
        in `status.evaluation`; the candidates' reasons and the metrics' per-label F1 and
        signatures are dropped, export.json keeps them."""
        short = self.model_copy(update={"tokenizer_parity": None, "genai_tokenizer": None,
                                        "output_parity": None, "timings": {}, "sizes": {},
                                        "builder_config_changes": None})
        if short.metrics is not None:
            short.metrics = short.metrics.model_copy(update={"per_label_f1": {},
                                                             "signatures": {}})
        if short.auto is not None:
            short.auto = short.auto.model_copy(update={"candidates": [
                c.model_copy(update={"reason": ""}) for c in short.auto.candidates]})
        short.failures = [f[:400] for f in short.failures[:3]]
        return short.to_json(indent=None)

    def choice_message(self) -> str | None:
        """`precision: Auto`'s choice in a sentence: what it served, beside FP32."""
        if self.auto is None:
            return None
        chosen = next((c for c in self.auto.candidates if c.passed), None)
        tried = ", ".join(f"{c.weights} {c.describe()}" for c in self.auto.candidates)
        verdict = "none kept FP32's quality" if chosen is None else f"{chosen.weights} kept it"
        return (f"Auto exported {self.weights}: FP32 {self.auto.fp32.describe()}; tried {tried}; "
                f"{verdict} ({self.auto.rule})")


def resolve_precision(precision: Precision | str, device: Device | str) -> Precision:
    """The precision an export uses: `Auto` is INT4 on CPU and FP16 on CUDA. FP16 needs CUDA:
    ONNX Runtime's CPU provider upcasts FP16 through Cast nodes and runs slower than FP32.
    INT8 is built and measured for CPU only. Raises ValueError naming the bad value."""
    wanted = {p.value.upper(): p for p in Precision}.get(str(precision).upper())
    if wanted is None:
        raise ValueError(f"precision must be INT4, INT8, FP16, FP32 or Auto, not {precision!r}")
    try:
        where = Device(str(device).upper())
    except ValueError:
        raise ValueError(f"device must be CPU or CUDA, not {device!r}") from None
    if wanted is Precision.AUTO:
        return Precision.INT4 if where is Device.CPU else Precision.FP16
    if wanted is Precision.FP16 and where is Device.CPU:
        raise ValueError("FP16 runs on CUDA only; use INT4, INT8 or FP32 on CPU")
    if wanted is Precision.INT8 and where is Device.CUDA:
        raise ValueError("INT8 is built for CPU only; use INT4, FP16 or FP32 on CUDA")
    return wanted


def resolve_quantization(
    quantization: Quantization | str | None, precision: Precision
) -> Quantization | None:
    """INT4's rounding method (`RTN` when not given); None for other precisions, which have
    no choice. Raises ValueError for an unknown method, or one given for another precision."""
    if quantization is None:
        return Quantization.RTN if precision is Precision.INT4 else None
    method = {q.value.upper(): q for q in Quantization}.get(str(quantization).upper())
    if method is None:
        names = ", ".join(q.value for q in Quantization)
        raise ValueError(f"quantization must be one of {names}, not {quantization!r}")
    if precision is not Precision.INT4:
        raise ValueError(f"quantization applies to INT4 only, not {precision.value}")
    return method


def weights_label(precision: str | None, quantization: str | None) -> str:
    """One name for what an export's weights are: "INT4", "INT4-KQuant", "FP32". RTN, INT4's
    default, adds nothing, so an export from before the choice existed keeps its name."""
    if quantization is None or quantization == Quantization.RTN.value:
        return str(precision)
    return f"{precision}-{quantization}"


def cache_root() -> Path:
    """Where converted models live on this machine, for both planes: `$KUBETUNE_CACHE`, or
    `kubetune` under `$XDG_CACHE_HOME` (default `~/.cache`)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune"
    return Path(os.environ.get("KUBETUNE_CACHE", default))


class JsonlError(ValueError):
    """A JSONL file cannot be read, or one of its lines is not a JSON value. The message is
    `file:line: problem` (`file: problem` when no line is to blame)."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


_JSON_WHITESPACE = b" \t\r"
"""What may surround a JSON value on a line (RFC 8259; "\n" ends the line). A line of only
this is blank and skipped; a "\r\n" line end leaves a "\r" that JSON ignores."""


def _decode_json_line(raw: bytes) -> object:
    """One line's JSON value; raises ValueError with what is wrong, in a reader's words."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8: byte 0x{raw[error.start]:02x} at byte "
                         f"{error.start + 1} of the line") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply to read") from None
    except ValueError as error:
        # Python refuses integers of more than sys.get_int_max_str_digits() (4300) digits:
        # a plain ValueError, not a JSONDecodeError. The hint to raise the limit is for
        # programmers, not for whoever wrote the dataset.
        raise ValueError(f"invalid JSON: {str(error).split(';')[0]}") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """The JSON value of each non-blank line of a JSONL file, with its 1-based line number.

    Lines end at "\n" only: `str.splitlines()` also ends them at U+2028, U+2029, U+0085 and
    other characters that are legal raw inside JSON strings (`json.dumps(...,
    ensure_ascii=False)` writes them so), which would cut a valid record in two and shift
    every later line number. A UTF-8 byte order mark before the first line is ignored.
    Raises `JsonlError` naming the file and the line of the first line that cannot be read.
    """
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise JsonlError(name, None, f"cannot read: {error.strerror or error}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip(_JSON_WHITESPACE):
            continue
        try:
            value = _decode_json_line(raw)
        except ValueError as error:
            raise JsonlError(name, number, str(error)) from None
        yield number, value
