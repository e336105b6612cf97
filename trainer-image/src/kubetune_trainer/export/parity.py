"""Output parity: greedy continuations from ONNX Runtime against PyTorch on a fixed prompt set.

Both sides run a plain argmax loop over the full vocabulary (no EOS stop, no search options), so
the only difference left is the arithmetic. At FP32 the continuations must match token for
token. At INT4 the weights are rounded, so a near-tie between two tokens can flip and the two
continuations then drift apart; we measure two rates:

- teacher-forced top-1 agreement: ONNX Runtime is fed PyTorch's continuation and we count the
  positions where its argmax equals PyTorch's token. One flip costs one position, not the rest
  of the sequence, so this is the stable measure the threshold applies to;
- prefix agreement: the mean fraction of each continuation generated before the first
  divergence (reported, and useful to eyeball).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPTS: tuple[tuple[str, str], ...] = (
    ("chat", "What is the capital of France?"),
    ("chat", "Give me three tips for writing clean Python code."),
    ("text", "The history of the printing press begins"),
)


@dataclass(frozen=True)
class ParityResult:
    tokens: int
    exact_matches: int
    prefix_agreement: float
    teacher_forced_agreement: float
    first_divergence: list[int | None]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "prompts": len(self.first_divergence),
            "tokens": self.tokens,
            "exactMatches": self.exact_matches,
            "prefixAgreement": round(self.prefix_agreement, 4),
            "teacherForcedAgreement": round(self.teacher_forced_agreement, 4),
            "firstDivergence": self.first_divergence,
            "seconds": round(self.seconds, 2),
        }


def prompt_ids(serving: Any) -> list[list[int]]:
    """Token ids of the prompt set, through the serving tokenizer (checked equal to training's)."""
    ids = []
    for kind, text in PROMPTS:
        if kind == "chat" and serving.chat_template:
            ids.append(serving.encode_chat([{"role": "user", "content": text}]))
        else:
            ids.append(serving.encode(text))
    return ids


def torch_greedy(model_dir: Path, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy continuations from PyTorch (FP32, CPU), with the KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            result = model(input_ids=ids, use_cache=True)
            generated: list[int] = []
            for _ in range(tokens):
                token = int(result.logits[0, -1].argmax())
                generated.append(token)
                result = model(
                    input_ids=torch.tensor([[token]]),
                    past_key_values=result.past_key_values,
                    use_cache=True,
                )
            outputs.append(generated)
    return outputs


class OnnxRuntimeRefused(Exception):
    """ONNX Runtime GenAI would not load or run the exported model (its message says why)."""


def ort_continuations(
    onnx_dir: Path, prompts: list[list[int]], references: list[list[int]]
) -> tuple[list[list[int]], list[int]]:
    """Free-running greedy continuations and teacher-forced hits, from ONNX Runtime GenAI."""
    try:
        return _ort_continuations(onnx_dir, prompts, references)
    except RuntimeError as error:  # onnxruntime-genai raises its errors as RuntimeError
        raise OnnxRuntimeRefused(str(error)) from error


def _ort_continuations(
    onnx_dir: Path, prompts: list[list[int]], references: list[list[int]]
) -> tuple[list[list[int]], list[int]]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    free: list[list[int]] = []
    forced_hits: list[int] = []
    for prompt, reference in zip(prompts, references, strict=True):
        for forced in (False, True):
            if forced and free[-1] == reference:
                forced_hits.append(len(reference))  # an exact free run is all hits: skip the pass
                continue
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + len(reference) + 1)
            generator = og.Generator(model, params)
            generator.append_tokens(np.array(prompt, dtype=np.int32))
            generated: list[int] = []
            hits = 0
            for expected in reference:
                token = int(generator.get_logits()[0, -1].argmax())
                generated.append(token)
                hits += token == expected
                generator.append_tokens(np.array([expected if forced else token], np.int32))
            if forced:
                forced_hits.append(hits)
            else:
                free.append(generated)
    return free, forced_hits


def measure(model_dir: Path, onnx_dir: Path, serving: Any, tokens: int) -> ParityResult:
    start = time.monotonic()
    prompts = prompt_ids(serving)
    references = torch_greedy(model_dir, prompts, tokens)
    free, forced_hits = ort_continuations(onnx_dir, prompts, references)
    divergences: list[int | None] = []
    for reference, generated in zip(references, free, strict=True):
        divergence = next(
            (i for i, (a, b) in enumerate(zip(reference, generated, strict=True)) if a != b),
            None,
        )
        divergences.append(divergence)
    prefix = sum(tokens if d is None else d for d in divergences) / (tokens * len(prompts))
    return ParityResult(
        tokens=tokens,
        exact_matches=sum(d is None for d in divergences),
        prefix_agreement=prefix,
        teacher_forced_agreement=sum(forced_hits) / (tokens * len(prompts)),
        first_divergence=divergences,
        seconds=time.monotonic() - start,
    )
