"""`kubetune run`'s metrics table: every row's numbers in the same columns, whatever the
labels' lengths (the support-tickets run printed `F1 account-access` one column off)."""

from __future__ import annotations

from kubetune.api.metrics import Metric, MetricScores
from kubetune.local.evaluate import metrics_table


def test_long_label_names_keep_the_numbers_in_their_columns() -> None:
    labels = ["billing", "account-access", "technical-issue", "a-much-longer-queue-name"]
    base = MetricScores(values={Metric.MACRO_F1: 0.0, Metric.ACCURACY: 0.0},
                        per_label_f1=dict.fromkeys(labels, 0.0))
    tuned = MetricScores(values={Metric.MACRO_F1: 1.0, Metric.ACCURACY: 1.0},
                         per_label_f1=dict.fromkeys(labels, 1.0))

    rows = metrics_table(base, tuned)

    assert len(rows) == 1 + 2 + len(labels)
    # Right-aligned cells of fixed width: rows of one length have their numbers aligned.
    assert len({len(row) for row in rows}) == 1, "\n".join(rows)
