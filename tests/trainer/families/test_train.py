"""Training each family: every method trains, chat labels cover every assistant turn and its
end-of-turn text, templates that rewrite or drop turns are handled or refused, LoRA targets are
checked against the model's own linear layers, and packed rows attend exactly as records alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer.errors import ConfigError, DatasetError
from kubetune_trainer.heldout import IGNORE
from kubetune_trainer.train.data import Example
from kubetune_trainer.train.encoding import Encoded, encode, end_of_turn
from kubetune_trainer.train.microbatches import collate
from kubetune_trainer.train.prepare import encode_all
from tests.trainer.conftest import REPO, run_config, trainer_env, write_tiny_dataset
from tests.trainer.families.catalog import FAMILIES
from tests.trainer.families.conftest import SCRATCH, tiny_model

METHODS = ("LoRA", "DoRA", "QLoRA", "Full")
CONVERSATION = Example(7, messages=(
    ("system", "Answer with one kubectl command."),
    ("user", "Show nodes"), ("assistant", "kubectl get nodes"),
    ("user", "List pods in shop"), ("assistant", "kubectl get pods -n shop"),
))


def tokenizer_of(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model(name)))


def labelled_segments(tokenizer: Any, encoded: Encoded) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    segments: list[list[int]] = [[]]
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE:
            segments[-1].append(token)
        elif segments[-1]:
            segments.append([])
    return [tokenizer.decode(ids) for ids in segments if ids]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_assistant_turn_is_labelled_with_its_end_of_turn(name: str) -> None:
    tokenizer = tokenizer_of(name)
    encoded = encode(tokenizer, CONVERSATION, 512)
    segments = labelled_segments(tokenizer, encoded)
    ending = end_of_turn(tokenizer).strip()
    # The end-of-turn token is a special token of each family's template (not plain text).
    assert ending and tokenizer.convert_tokens_to_ids(ending) != tokenizer.unk_token_id
    answers = [content for role, content in CONVERSATION.messages if role == "assistant"]
    assert len(segments) == len(answers), segments
    for segment, answer in zip(segments, answers, strict=True):
        assert answer in segment, segment
        assert segment.split(answer, 1)[1].strip().startswith(ending), (segment, ending)
        assert "Show nodes" not in segment and "system" not in segment
    assert encoded.system_dropped is FAMILIES[name].drops_system


def test_a_template_that_rewrites_an_earlier_turn_is_refused_with_the_line() -> None:
    # Qwen 3's template keeps only the last turn's reasoning: an earlier <think> block vanishes.
    tokenizer = tokenizer_of("qwen3")
    record = Example(12, messages=(
        ("user", "Show nodes"),
        ("assistant", "<think>nodes are cluster-wide</think>kubectl get nodes"),
        ("user", "List pods"), ("assistant", "kubectl get pods"),
    ))
    with pytest.raises(DatasetError, match=r"train\.jsonl:12: .*rewrites assistant turn 1"):
        encode_all(tokenizer, [record], 512, "file:///data/train.jsonl")
    # The reasoning of the last turn stays and is labelled.
    last = Example(3, messages=(("user", "Show nodes"),
                                ("assistant", "<think>cluster-wide</think>kubectl get nodes")))
    (segment,) = labelled_segments(tokenizer, encode(tokenizer, last, 512))
    assert "cluster-wide" in segment and "kubectl get nodes" in segment


@pytest.mark.parametrize("name", ["phi3", "qwen3", "gemma2"])
def test_a_target_module_the_model_lacks_is_refused_naming_the_ones_it_has(name: str) -> None:
    from transformers import AutoModelForCausalLM

    from kubetune.api import FineTuneJobSpec
    from kubetune_trainer.train.model import check_target_modules, linear_module_names

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model(name)))
    names = linear_module_names(model)
    assert "lm_head" not in names and "o_proj" in names and "down_proj" in names
    packed = {"qkv_proj", "gate_up_proj"} <= set(names)
    assert packed is (name == "phi3")

    def spec(targets: list[str]) -> FineTuneJobSpec:
        return FineTuneJobSpec.model_validate({
            "model": {"source": "file:///m"}, "dataset": {"source": "file:///d"},
            "lora": {"targetModules": targets}})

    check_target_modules(model, spec(names))  # the family's own names are accepted
    with pytest.raises(ConfigError, match=r"spec\.lora\.targetModules: q_proj_x .*"
                       + ", ".join(names)):
        check_target_modules(model, spec(["o_proj", "q_proj_x"]))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_packed_rows_attend_as_records_alone(name: str) -> None:
    """Soft-capped (Gemma 2) and sliding-window layers included: the window is cut to 5 so
    records longer than it take the windowed path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune_trainer.train.attention import register

    directory = tiny_model(name)
    config = AutoConfig.from_pretrained(str(directory))
    if getattr(config, "sliding_window", None):
        config.sliding_window = 5
    packed_model = AutoModelForCausalLM.from_pretrained(
        str(directory), config=config, attn_implementation=register()).eval()
    eager = AutoModelForCausalLM.from_pretrained(
        str(directory), config=config, attn_implementation="eager").eval()
    torch.manual_seed(0)
    records = [Encoded(torch.randint(3, config.vocab_size, (n,)).tolist(), [1] * n, False)
               for n in (9, 3, 14)]
    batch = collate(records, True, 0)
    batch.pop("targets")
    with torch.no_grad():
        packed = packed_model(**batch, use_cache=False).logits[0]
        alone = torch.cat([eager(input_ids=torch.tensor([r.input_ids])).logits[0]
                           for r in records])
    torch.testing.assert_close(packed, alone, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def trained() -> dict[tuple[str, str], Path]:
    """Every family x method, 3 steps each, trained in one process (train_matrix.py)."""
    root = SCRATCH / "train"
    train, _ = write_tiny_dataset(root / "data")
    runs: dict[tuple[str, str], Path] = {}
    configs = []
    for name in sorted(FAMILIES):
        for method in METHODS:
            config = run_config(train, None, method=method, steps=3)
            config["spec"]["model"]["source"] = f"file://{tiny_model(name)}"
            path = root / f"{name}-{method}.run.json"
            path.write_text(json.dumps(config))
            configs.append(str(path))
            runs[(name, method)] = root / f"{name}-{method}"
    # Tiny models leave a core idle per process (their steps are mostly Python), so the cells
    # are split over one single-threaded process per core.
    env = trainer_env(root, OMP_NUM_THREADS="1")
    workers = max(1, os.cpu_count() or 1)
    logs = [root / f"matrix-{i}.log" for i in range(workers)]
    matrices = [subprocess.Popen(
        [sys.executable, "-m", "tests.trainer.families.train_matrix", *configs[i::workers]],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        for i, log in enumerate(logs)]
    for matrix, log in zip(matrices, logs, strict=True):
        assert matrix.wait(timeout=1200) == 0, log.read_text()[-3000:]
    return runs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_method_trains_each_family(trained: dict[tuple[str, str], Path], name: str,
                                        method: str) -> None:
    output = trained[(name, method)]
    report = json.loads((output / "report.json").read_text())
    assert output.with_suffix(".exit").read_text() == "0", report["error"]
    lines = (output / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert report["status"] == "Succeeded" and report["steps"] == 3
    assert losses[-1] < losses[0], losses
    assert report["systemDroppedRecords"] == (4 if FAMILIES[name].drops_system else 0)
    assert (output / "merged" / "config.json").is_file()
    assert (output / "adapter" / "adapter_config.json").is_file() is (method != "Full")
    if method != "Full":
        adapter = json.loads((output / "adapter" / "adapter_config.json").read_text())
        # all-linear: every linear layer of the family (peft writes their full paths)
        targets = {target.rsplit(".", 1)[-1] for target in adapter["target_modules"]}
        assert targets == set(_linear_names(name))
        assert adapter["use_dora"] is (method == "DoRA")


def _linear_names(name: str) -> list[str]:
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.train.model import linear_module_names

    return linear_module_names(AutoModelForCausalLM.from_pretrained(str(tiny_model(name))))

