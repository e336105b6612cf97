"""Export: built-in model at INT4 and FP32, a LoRA adapter, and verification that fails loudly.

Each export runs once per test process (`exported_model` caches it) and the serve tests reuse it.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from kubetune.local.processes import export_command
from kubetune_trainer.builtin import GGUF_PRE_TOKENIZERS, builtin_model_dir
from kubetune_trainer.export import run as export_module
from kubetune_trainer.export.tokenizer_parity import check_parity
from kubetune_trainer.tokenizer import ServingTokenizer

SCRATCH = Path(tempfile.mkdtemp(prefix="kubetune-export-tests-"))
atexit.register(shutil.rmtree, SCRATCH, True)


GPT2_PRE_TOKENIZER = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}
"""What transformers falls back to for the GGUF's unknown `smollm` pre-tokenizer: no digit
split, so it tokenizes differently from training."""


def run_export(
    source: Path, output: Path, precision: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    command = [*export_command(source, output, precision, "CPU"), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)


@functools.cache
def exported_model(precision: str, quantization: str | None = None) -> Path:
    """The built-in model exported at `precision` (once per process)."""
    output = SCRATCH / f"builtin-{precision.lower()}-{quantization or 'default'}"
    extra = () if quantization is None else ("--quantization", quantization)
    result = run_export(builtin_model_dir("smollm2-135m-instruct"), output, precision, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def weight_bits(output: Path) -> dict[str, int]:
    """Each quantized MatMul's weight bits, by node name, read from the exported graph."""
    import onnx

    graph = onnx.load(str(output / "model.onnx"), load_external_data=False).graph
    return {
        node.name: next(a.i for a in node.attribute if a.name == "bits")
        for node in graph.node
        if node.op_type == "MatMulNBits"
    }


def report(output: Path) -> dict:
    return json.loads((output / "export.json").read_text())


def test_int4_export_is_verified_and_small() -> None:
    output = exported_model("INT4")
    data = report(output)
    assert data["ok"] and data["precision"] == "INT4" and data["device"] == "CPU"
    assert data["tokenizerParity"]["ok"] and data["tokenizerParity"]["cases"] > 50
    parity = data["outputParity"]
    assert (
        parity["ok"]
        and parity["teacherForcedAgreement"] >= export_module.AGREEMENT_THRESHOLDS["int4"]
    )
    # INT4 weights plus the FP32 embedding table stay well under the FP32 model's 538 MB.
    assert 0 < data["sizes"]["modelBytes"] < 200e6
    assert {"buildSeconds", "verifySeconds", "totalSeconds"} <= set(data["timings"])
    for name in ("genai_config.json", "model.onnx", "tokenizer.json", "chat_template.jinja"):
        assert (output / name).is_file(), name


@pytest.mark.parametrize(("precision", "quantization", "head_bits", "body_bits"), [
    ("INT4", None, 4, {4}),
    ("INT8", None, 8, {8}),
    ("INT4", "RTNLast", 8, {4}),
    ("INT4", "KQuantMixed", 8, {4, 8}),
])
def test_each_precision_and_int4_method_builds_the_weights_it_names(
    precision: str, quantization: str | None, head_bits: int, body_bits: set[int]
) -> None:
    """The choice reaches the builder (the graph's MatMulNBits say so) and the export is
    verified like any other; export.json records what was chosen."""
    output = exported_model(precision, quantization)
    data = report(output)
    assert data["ok"] and data["precision"] == precision
    assert data["quantization"] == (quantization or ("RTN" if precision == "INT4" else None))
    bits = weight_bits(output)
    head = [name for name in bits if "lm_head" in name]
    assert len(head) == 1 and bits[head[0]] == head_bits
    assert {b for name, b in bits.items() if name not in head} == body_bits


def test_builder_options_name_the_method_and_keep_rtn_as_it_was() -> None:
    from kubetune.api.spec import Quantization

    rtn = export_module.builder_options("int4", "CPU", Quantization.RTN)
    assert rtn == ["block_size=32", "accuracy_level=4"]  # the options INT4 always had
    assert export_module.builder_options("int4", "CPU", Quantization.K_QUANT)[-1] == (
        "algo_config=k_quant"
    )
    assert export_module.builder_options("fp32", "CPU", None) == []


def test_fp32_export_matches_pytorch_token_for_token() -> None:
    data = report(exported_model("FP32"))
    parity = data["outputParity"]
    assert data["ok"] and parity["tokens"] >= 32
    assert (
        parity["exactMatches"] == parity["prompts"]
        and parity["firstDivergence"] == [None] * parity["prompts"]
    )


def test_tokenizer_files_are_the_training_ones() -> None:
    source = builtin_model_dir("smollm2-135m-instruct")
    output = exported_model("INT4")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (output / name).read_bytes() == (source / name).read_bytes(), name


def test_builtin_tokenizer_keeps_smollm_digit_split() -> None:
    """The GGUF conversion's lost pre-tokenizer is restored at the source (builtin.py)."""
    tokenizer = json.loads(
        (builtin_model_dir("smollm2-135m-instruct") / "tokenizer.json").read_text()
    )
    assert tokenizer["pre_tokenizer"] == GGUF_PRE_TOKENIZERS["smollm"]


def test_parity_fails_loudly_on_a_mismatched_tokenizer(tmp_path: Path) -> None:
    """The tokenizer as the GGUF conversion wrote it (GPT-2 split, no digit split) is caught."""
    source = builtin_model_dir("smollm2-135m-instruct")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(source / name, tmp_path / name)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["pre_tokenizer"] = GPT2_PRE_TOKENIZER
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    result = check_parity(source, ServingTokenizer.load(tmp_path))
    assert not result["ok"] and result["mismatchCount"] > 0
    first = result["mismatches"][0]
    assert first["input"] == "a  1" and first["training"] != first["serving"]


def test_parity_catches_a_swapped_vocabulary(tmp_path: Path) -> None:
    source = builtin_model_dir("smollm2-135m-instruct")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(source / name, tmp_path / name)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Hello"], vocab["Ġworld"] = vocab["Ġworld"], vocab["Hello"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    result = check_parity(source, ServingTokenizer.load(tmp_path))
    assert not result["ok"]
    assert any(m["input"] == "Hello, world!" for m in result["mismatches"])


def test_failed_verification_fails_the_export(tmp_path: Path) -> None:
    """A model whose tokenizer does not match the training one: exit 1, reason in export.json
    and on stderr, and no model left in the output directory."""
    source = builtin_model_dir("smollm2-135m-instruct")
    model = tmp_path / "model"
    model.mkdir()
    for item in source.iterdir():
        (model / item.name).symlink_to(item)
    (model / "tokenizer.json").unlink()
    data = json.loads((source / "tokenizer.json").read_text())
    data["pre_tokenizer"] = GPT2_PRE_TOKENIZER
    (model / "tokenizer.json").write_text(json.dumps(data))
    # The training tokenizer is the source's; the served one is the tampered copy.
    original_verify = export_module.verify

    def verify_against_source(
        model_dir: Path, output: Path, precision: str, rep: dict
    ) -> list[str]:
        return original_verify(source, output, precision, rep)

    output = tmp_path / "onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "verify", verify_against_source)
        code = export_module.main(
            ["--input", str(model), "--output", str(output), "--precision", "INT4"]
        )
    assert code == 1
    data = report(output)
    assert data["ok"] is False and "tokenizer parity" in data["failures"][0]
    assert not (output / "model.onnx").exists()


def test_bad_invocations_are_configuration_errors(tmp_path: Path) -> None:
    source = builtin_model_dir("smollm2-135m-instruct")
    fp16_on_cpu = export_module.main(
        [
            "--input",
            str(source),
            "--output",
            str(tmp_path / "o"),
            "--precision",
            "FP16",
            "--device",
            "CPU",
        ]
    )
    nothing_there = export_module.main(["--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert fp16_on_cpu == 2 and nothing_there == 2


def test_builder_precision_follows_the_shared_auto_rule() -> None:
    assert export_module.builder_precision("Auto", "CPU") == "int4"
    assert export_module.builder_precision("auto", "CUDA") == "fp16"
    assert export_module.builder_precision("FP32", "cpu") == "fp32"


def make_lora_run(
    run: Path,
    *,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    rank: int = 8,
    scale: float = 2e-3,
    seed: int = 0,
    use_rslora: bool = False,
) -> Path:
    """A run directory with a non-zero LoRA adapter on the built-in model, as training leaves
    it: lora_B drawn at `scale` (small but non-zero: the merged model must differ from the base).
    Returns the base model's directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = builtin_model_dir("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        init_lora_weights=False,
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(run / "adapter"))
    return base


def test_lora_adapter_is_merged_and_exported(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = make_lora_run(run)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == base
    output = run / "onnx"
    result = run_export(run, output, "FP32")
    assert result.returncode == 0, result.stderr[-3000:]
    data = report(output)
    assert data["ok"] and data["adapter"] == str(run / "adapter") and data["base"] == str(base)
    assert data["outputParity"]["exactMatches"] == data["outputParity"]["prompts"]
    assert "mergeSeconds" in data["timings"]


def test_served_tokenizer_is_the_one_training_ran_whatever_the_architecture(
    tmp_path: Path,
) -> None:
    """transformers 5 picks the tokenizer class by config.json's model_type when
    tokenizer_config.json names only TokenizersBackend, and Qwen2Tokenizer builds Qwen's
    pre-tokenizer in code: SmolLM2's tokenizer files beside a Qwen2 config train on a,Ġ,Ġ,1
    for "a  1" where the file's own pipeline gives a,ĠĠ,1. The export serves what training ran."""
    from tests.trainer.families.catalog import FAMILIES

    source = builtin_model_dir("smollm2-135m-instruct")
    model = tmp_path / "qwen2-with-smollm-tokenizer"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(source / name, model / name)
    (model / "config.json").write_text(FAMILIES["qwen2"].config(49152).to_json_string())
    served = tmp_path / "served"
    served.mkdir()
    export_module.copy_tokenizer(model, served)
    serving = ServingTokenizer.load(served)
    assert serving.encode("a  1", add_special_tokens=False) == [81, 216, 216, 33]
    result = check_parity(model, serving)
    assert result["ok"], result["mismatches"]
    # the file's pipeline is the training one for the built-in model itself: copied as it is
    export_module.copy_tokenizer(source, served)
    assert (served / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_a_model_onnx_runtime_refuses_fails_verification_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ONNX Runtime refusing the graph (as it refused 12-wide rotary heads: "cos_cache
    dimension 1 must be <= head_size / 2 and a multiple of 8") is a failed check with the
    reason, not a traceback without export.json."""
    from kubetune.api.dataplane import ExportReport
    from kubetune_trainer.export import parity

    def refuse(*_: object) -> None:
        raise RuntimeError("cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8")

    monkeypatch.setattr(parity, "_ort_continuations", refuse)
    source = builtin_model_dir("smollm2-135m-instruct")
    report = ExportReport()
    failures = export_module.verify(source, exported_model("FP32"), "fp32", report)
    assert report.tokenizer_parity is not None and report.tokenizer_parity["ok"]
    assert failures == ["output parity: ONNX Runtime could not run the model: cos_cache "
                        "dimension 1 must be <= head_size / 2 and a multiple of 8"]
