"""Progress and final reports.

- `metrics.jsonl`: one JSON object per logged step: `step`, `totalSteps`, `epoch`, `loss`,
  `lr`, `gradNorm`, `tokensPerSecond` (real tokens, all ranks, over the last interval),
  `etaSeconds`, `time` (unix seconds); eval lines add `evalLoss`.
- Progress POSTs (rank 0 only) when `KUBETUNE_REPORT_URL` is set: a JSON body
  `{"step", "totalSteps", "epoch", "trainLoss", "evalLoss", "tokensPerSecond", "etaSeconds"}`
  with `Authorization: Bearer <contents of $KUBETUNE_REPORT_TOKEN_FILE>`, at most one every
  `$KUBETUNE_REPORT_INTERVAL_SECONDS` (default 10; the final step is always sent), from a
  background thread with a 5 s timeout. A dead endpoint is logged once and never fails training.
- `report.json` at the end (`kubetune.api.dataplane.TrainingReport`: the schema both planes
  share), and a short form of it (<= 4096 bytes, JSON) written to the termination-message path
  `$KUBETUNE_TERMINATION_LOG` (default `/dev/termination-log`; skipped silently when not
  writable).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from kubetune.api.dataplane import ProgressReport, TrainingReport, write_termination_message

log = logging.getLogger("kubetune_trainer")

TERMINATION_LIMIT = 4096
SHORT_FIELDS = {
    "status", "error", "steps", "total_steps", "train_loss", "eval_loss", "base_eval_loss",
    "accuracy", "base_accuracy", "tokens_per_second", "truncated_records", "adapter", "merged",
    "plan_mismatch",
}


def short_form(report: TrainingReport) -> str:
    """The termination message: the keys the operator reads, cut to fit 4096 bytes."""
    short = report.model_dump(by_alias=True, mode="json", include=SHORT_FIELDS)
    text = json.dumps(short, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LIMIT:
        error = str(short.get("error") or "")
        overflow = len(text.encode()) - TERMINATION_LIMIT + 16
        short["error"] = error[: max(0, len(error) - overflow)] + "..."
        text = json.dumps(short, separators=(",", ":"))
    return text


def write_final(output: Path, report: TrainingReport) -> None:
    """`report.json` and the termination message."""
    output.mkdir(parents=True, exist_ok=True)
    staging = output / ".report.json.tmp"
    staging.write_text(report.to_json() + "\n")
    staging.replace(output / "report.json")
    write_termination_message(short_form(report))


class MetricsLog:
    """Appends to `metrics.jsonl` (rank 0). A failed append (a full disk, an I/O error) is
    logged and training goes on: the log is for people, the checkpoints are what count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failing = False

    def write(self, entry: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        except OSError as error:
            if not self.failing:  # once per outage, not once per step
                log.warning("cannot append to %s (%s); training goes on", self.path, error)
            self.failing = True
            return
        if self.failing:
            log.warning("appending to %s works again", self.path)
            self.failing = False


def progress_body(entry: dict[str, Any], eval_loss: float | None) -> dict[str, Any]:
    """The progress POST's body (`kubetune.api.dataplane.ProgressReport`) from a metrics line."""
    report = ProgressReport(
        step=entry["step"], total_steps=entry["totalSteps"], epoch=entry["epoch"],
        train_loss=entry.get("loss"), eval_loss=eval_loss,
        tokens_per_second=entry.get("tokensPerSecond"), eta_seconds=entry.get("etaSeconds"),
    )
    return report.model_dump(by_alias=True, mode="json")


class Reporter:
    """Throttled progress POSTs from a background thread; failures are logged, never raised."""

    def __init__(self, url: str | None, token_file: str | None, interval: float) -> None:
        self.url = url
        self.token_file = token_file
        self.interval = interval
        self.last_sent = float("-inf")
        self.warned = False
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=4)
        self.thread: threading.Thread | None = None
        if url:
            self.thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self.thread.start()

    @classmethod
    def from_env(cls) -> Reporter:
        return cls(
            os.environ.get("KUBETUNE_REPORT_URL") or None,
            os.environ.get("KUBETUNE_REPORT_TOKEN_FILE") or None,
            float(os.environ.get("KUBETUNE_REPORT_INTERVAL_SECONDS", "10")),
        )

    def offer(self, body: dict[str, Any], force: bool = False) -> None:
        """Queue a report unless one went out less than `interval` seconds ago."""
        now = time.monotonic()
        if self.thread is None or (not force and now - self.last_sent < self.interval):
            return
        self.last_sent = now
        with contextlib.suppress(queue.Full):  # a slow endpoint: newer progress follows
            self.queue.put_nowait(body)

    def close(self, timeout: float = 10.0) -> None:
        if self.thread is not None:
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self.thread.join(timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token_file:
            try:
                headers["Authorization"] = f"Bearer {Path(self.token_file).read_text().strip()}"
            except OSError as error:
                log.warning("cannot read the report token file: %s", error)
        return headers

    def _run(self) -> None:
        while (body := self.queue.get()) is not None:
            request = urllib.request.Request(
                str(self.url), data=json.dumps(body).encode(), headers=self._headers(),
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
            except Exception as error:  # any network failure: training goes on
                if not self.warned:
                    log.warning("progress report to %s failed: %s", self.url, error)
                    self.warned = True
