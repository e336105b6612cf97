"""Training progress for `kubetune run`: read `metrics.jsonl` as it grows, show it, plot it.

On a terminal one line is redrawn in place (a bar with step, loss and ETA); otherwise (CI logs,
pipes) a plain line is printed whenever the trainer reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO


def _first(record: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if record.get(key) is not None:
            return record[key]
    return None


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_progress(record: dict[str, Any], width: int = 24, bar: bool = True) -> str:
    """One line for one metrics record: `[#####.....] step 12/40 loss 1.234 ETA 1m05s`."""
    step = int(_first(record, "step") or 0)
    total = _first(record, "totalSteps", "total_steps")
    loss = _float(_first(record, "trainLoss", "loss", "train_loss"))
    eval_loss = _float(_first(record, "evalLoss", "eval_loss"))
    eta = _float(_first(record, "etaSeconds", "eta_seconds", "eta"))
    speed = _float(_first(record, "tokensPerSecond", "tokens_per_second"))
    parts = []
    if bar and total:
        filled = round(width * min(step, int(total)) / int(total))
        parts.append("[" + "#" * filled + "." * (width - filled) + "]")
    parts.append(f"step {step}/{total}" if total else f"step {step}")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if eval_loss is not None:
        parts.append(f"eval loss {eval_loss:.4f}")
    if speed is not None:
        parts.append(f"{speed:.0f} tok/s")
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " ".join(parts)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of `metrics.jsonl` (a line still being written is skipped)."""
    records = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class ProgressView:
    """Shows new lines of `metrics.jsonl` since the last call of `update`."""

    def __init__(self, metrics_path: Path, stream: TextIO | None = None) -> None:
        self.metrics_path = metrics_path
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown = len(read_metrics(metrics_path))  # a resumed run shows only new lines
        self._drawn = False

    def update(self) -> None:
        records = read_metrics(self.metrics_path)
        new = [r for r in records[self.shown:] if _first(r, "step") is not None]
        self.shown = len(records)
        if not new:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + format_progress(new[-1]))
            self._drawn = True
        else:
            for record in new:
                self.stream.write(format_progress(record, bar=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.update()
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def loss_curve_points(records: list[dict[str, Any]]) -> tuple[list[tuple[int, float]],
                                                              list[tuple[int, float]]]:
    """(train, eval) loss points by step; a resumed run's repeated steps keep the newest."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for record in records:
        step = _first(record, "step")
        if step is None:
            continue
        loss = _float(_first(record, "trainLoss", "loss", "train_loss"))
        eval_loss = _float(_first(record, "evalLoss", "eval_loss"))
        if loss is not None:
            train[int(step)] = loss
        if eval_loss is not None:
            evals[int(step)] = eval_loss
    return sorted(train.items()), sorted(evals.items())


def plot_loss_curve(metrics_path: Path, png_path: Path) -> bool:
    """Write the loss curve as a PNG; False when there is nothing to plot."""
    train, evals = loss_curve_points(read_metrics(metrics_path))
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(png_path)
    return True
