"""The built-in weights repacked into Phi-3's, Qwen2's and Mistral's layouts compute what the
built-in model computes: same logits, same greedy answers (bench/families.py runs the
quickstart on each and compares held-out accuracy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.trainer.families.conftest import SCRATCH
from tests.trainer.families.repack import LAYOUTS, repack

PROMPT = [{"role": "user", "content": "List pods in namespace shop"}]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_repacked_builtin_model_answers_as_the_builtin_model(
        builtin_model: Path, layout: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repacked_dir = repack(builtin_model, layout, SCRATCH / "repack" / layout)
    original = AutoModelForCausalLM.from_pretrained(str(builtin_model)).eval()
    repacked = AutoModelForCausalLM.from_pretrained(str(repacked_dir)).eval()
    assert type(repacked).__name__ != type(original).__name__
    tokenizer = AutoTokenizer.from_pretrained(str(repacked_dir))
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(repacked(ids).logits, original(ids).logits,
                                   atol=1e-4, rtol=1e-4)
        answer = repacked.generate(ids, max_new_tokens=12, do_sample=False)
        expected = original.generate(ids, max_new_tokens=12, do_sample=False)
    assert answer.tolist() == expected.tolist()
