"""Tokens, labels, batching and padding-free attention (tokenizer and model, no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer.train.data import Example
from kubetune_trainer.train.encoding import IGNORE, Encoded, encode
from kubetune_trainer.train.microbatches import collate, schedule, split_micro_batches, step_records


@pytest.fixture(scope="module")
def tokenizer(builtin_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_model)


def labelled_text(tokenizer: Any, encoded: Encoded) -> str:
    return str(tokenizer.decode([t for t in encoded.labels if t != IGNORE]))


def test_chat_loss_covers_only_assistant_turns(tokenizer: Any) -> None:
    example = Example(1, messages=(("system", "Be short."), ("user", "Q1"), ("assistant", "A one"),
                                   ("user", "Q2"), ("assistant", "A two")))
    encoded = encode(tokenizer, example, 512)
    assert labelled_text(tokenizer, encoded) == "A one<|im_end|>\nA two<|im_end|>\n"
    assert not encoded.truncated
    rendered = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in example.messages], tokenize=False)
    assert tokenizer.decode(encoded.input_ids) == rendered


def test_completion_and_truncation(tokenizer: Any) -> None:
    encoded = encode(tokenizer, Example(1, prompt="2+2=", completion=" 4"), 512)
    assert labelled_text(tokenizer, encoded) == " 4" + tokenizer.eos_token
    long = encode(tokenizer, Example(1, completion="word " * 100), 16)
    assert long.truncated and len(long.input_ids) == 16


def test_micro_batches_keep_ranks_in_lockstep() -> None:
    lengths = [100, 7, 50, 60, 3, 90, 20]
    for world in (1, 2, 3):
        for packing in (True, False):
            groups = split_micro_batches(lengths, world, packing, token_budget=128,
                                         micro_batch_size=2)
            assert len(groups) % world == 0 and all(groups)
            assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    packed = split_micro_batches(lengths, 1, True, token_budget=128, micro_batch_size=1)
    assert len(packed) == 3  # 330 tokens in rows of about 128


def test_collate_resets_positions_and_never_predicts_across_records() -> None:
    records = [Encoded([1, 2, 3], [IGNORE, 2, 3], False), Encoded([4, 5], [4, 5], False)]
    batch = collate(records, True, 0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["targets"].tolist() == [[2, 3, IGNORE, 5, IGNORE]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    padded = collate(records, False, 0)
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["targets"].tolist() == [[2, 3, IGNORE], [5, IGNORE, IGNORE]]


def test_schedule_and_order_are_pure() -> None:
    plan = schedule(records=10, global_batch=4, world=2, epochs=3, max_steps=None)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 9)  # 4 + 4 + 2
    assert schedule(10, 4, 2, 3, max_steps=5).total_steps == 5
    assert step_records(10, 4, 1, 4, 3) == step_records(10, 4, 1, 4, 3)
    epoch = [i for s in range(3) for i in step_records(10, 4, 1, s, 3)]
    assert sorted(epoch) == list(range(10))


def test_packed_rows_match_separate_records(builtin_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.train.attention import register

    model = AutoModelForCausalLM.from_pretrained(builtin_model, attn_implementation=register())
    model.eval()
    torch.manual_seed(0)
    records = [Encoded(torch.randint(0, 49152, (n,)).tolist(), [1] * n, False) for n in (9, 3, 14)]
    batch = collate(records, True, 0)
    batch.pop("targets")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r.input_ids])).logits[0]
                           for r in records])
    torch.testing.assert_close(packed, alone, atol=2e-4, rtol=1e-4)
