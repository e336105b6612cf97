"""Log-probabilities for `logprobs` / `top_logprobs`: from one row of logits, the chosen token's
log-probability and the most likely alternatives, spelled as text and bytes.

Pure functions of the logits, shared by both engines. The distribution is the model's own
(the raw logits, before temperature, nucleus or a grammar's mask), as vLLM reports by default:
what the model thought of the token, whatever chose it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kubetune_trainer.serve.protocol import Alternative, TokenLogprob


def log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float32, copy=True)
    values -= values.max()
    values -= np.log(np.exp(values).sum())
    return values


def describe(
    logprobs: np.ndarray, token: int, top: int, spell: Callable[[int], bytes]
) -> TokenLogprob:
    """The chosen `token` and the `top` most likely tokens (most likely first), from a row of
    `log_softmax`; `spell` gives a token's bytes."""

    def alternative(index: int) -> Alternative:
        raw = spell(index)
        return Alternative(raw.decode("utf-8", errors="replace"), list(raw), float(logprobs[index]))

    if top > 0:
        best = np.argpartition(-logprobs, top - 1)[:top]  # the top `top`, unordered: O(vocab)
        ranked = best[np.argsort(-logprobs[best], kind="stable")].tolist()
    else:
        ranked = []
    return TokenLogprob(alternative(token), [alternative(int(i)) for i in ranked])
