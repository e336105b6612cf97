"""What the trainer leaves in the run directory for the exporter: the held-out records
(`heldout.json`), on which `precision: Auto` scores each quantized candidate against the FP32
model, and calibration tokens from the training records (`calibration.json`), on which
`quantization: GPTQ` rounds the weights. The two never share a record.

Token ids, not text: the exporter's tokenizer parity check already holds serving's tokenizer to
training's, and ids spare the exporter the dataset formats and chat templates. Each record is a
validation record the model never trained on: the whole sequence with its loss labels (for
teacher-forced agreement and loss) and, when it carries a reference answer, the prompt and the
answer (for greedy exact match, judged by `kubetune.api.metrics.exact_match`, and the
exported model's task metrics: `task`, `labels` and `metrics` are `spec.evaluation`'s).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.metrics import Metric, Task

HELD_OUT_FILE = "heldout.json"
CALIBRATION_FILE = "calibration.json"
Document = TypeVar("Document", bound=BaseModel)
IGNORE = -100
"""A label with no loss (the prompt's tokens); the trainer's labels use it too."""


class HeldOutRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_ids: list[int]
    labels: list[int]
    """Per position, the token that position holds when it is a target, else -100."""
    prompt: list[int] | None = None
    """The prompt to answer greedily; None for a record with no reference answer."""
    reference: str | None = None

    def target_positions(self) -> list[int]:
        """Positions whose next token is a target: the logits there predict it."""
        return [p for p in range(len(self.labels) - 1) if self.labels[p + 1] != IGNORE]


def _write(document: BaseModel, path: Path) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(document.model_dump_json())
    os.replace(staged, path)


def _read(kind: type[Document], path: Path) -> Document | None:
    if not path.is_file():
        return None
    try:
        return kind.model_validate_json(path.read_text())
    except ValueError:
        return None


class HeldOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: list[HeldOutRecord] = Field(default_factory=list)
    task: Task = Task.GENERATION
    """What the run was judged by (`spec.evaluation.task`): the exporter scores the exported
    weights on the same task metrics."""
    labels: list[str] = Field(default_factory=list)
    metrics: list[Metric] | None = None

    @property
    def answers(self) -> list[HeldOutRecord]:
        return [r for r in self.records if r.prompt is not None and r.reference is not None]

    def write(self, run_dir: Path) -> None:
        _write(self, run_dir / HELD_OUT_FILE)

    @classmethod
    def read(cls, run_dir: Path) -> HeldOut | None:
        """The run directory's held-out set; None when there is none (or it is unreadable:
        the exporter then scores on its own prompts)."""
        return _read(cls, run_dir / HELD_OUT_FILE)


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sequences: list[list[int]] = Field(default_factory=list)
    """Token ids of whole training records (prompt and answer)."""

    def write(self, run_dir: Path) -> None:
        _write(self, run_dir / CALIBRATION_FILE)

    @classmethod
    def read(cls, run_dir: Path) -> Calibration | None:
        """The run directory's calibration tokens; None when there are none."""
        return _read(cls, run_dir / CALIBRATION_FILE)
