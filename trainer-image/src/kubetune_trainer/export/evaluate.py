"""The exported model judged as the trainer judged the fine-tuned one: greedy answers and
target-token loss from the exported weights in ONNX Runtime (what will serve), on the
run's held-out validation records, scored on the task metrics the trainer recorded in
`heldout.json` (`kubetune.api.metrics`)."""

from __future__ import annotations

from pathlib import Path

from kubetune.api.metrics import MetricScores, score_answers, selected_metrics, with_loss
from kubetune_trainer.export.auto import OnnxDecoder, greedy_answers, target_loss, target_tokens
from kubetune_trainer.heldout import HeldOut


def exported_metrics(onnx_dir: Path, held_out: HeldOut) -> MetricScores | None:
    """The task metrics of the model in `onnx_dir` on `held_out`; None without records."""
    if not held_out.records:
        return None
    decoder = OnnxDecoder(onnx_dir)
    loss, counted = 0.0, 0
    for record in held_out.records:
        positions, targets = target_tokens(record)
        if targets:
            logits, _ = decoder.run(record.input_ids, None, len(record.input_ids))
            loss += target_loss(logits, positions, targets)
            counted += len(targets)
    scores = MetricScores()
    answers = greedy_answers(held_out, decoder.greedy, onnx_dir)
    if answers:
        references = [str(record.reference) for record in held_out.answers]
        scores = score_answers(held_out.task, answers, references, held_out.labels,
                               held_out.metrics)
    return with_loss(scores, loss / counted if counted else None,
                     selected_metrics(held_out.task, held_out.metrics))
