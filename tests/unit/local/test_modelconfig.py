"""`kubetune run` plans a model from its config.json: file://, pvc:// and builtin:// sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import RunConfig, parse_finetunejob
from kubetune.local.modelconfig import config_path, read_model_config
from kubetune.local.run import prepare_run

# Phi-3-mini-4k-instruct's config.json (its size keys): 3,821,079,552 parameters, no size in
# a directory name such as "phi3-dir".
PHI3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
        "num_hidden_layers": 32, "intermediate_size": 8192, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32064, "tie_word_embeddings": False,
        "max_position_embeddings": 4096, "rope_scaling": None}


def model_dir(root: Path, config: dict[str, Any] | str = PHI3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (root / "config.json").write_text(text)
    return root


def job(source: str, **model: Any) -> Any:
    return parse_finetunejob({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "mine"},
        "spec": {"model": {"source": source, **model},
                 "dataset": {"source": "builtin://kubectl-commands"},
                 "resources": {"gpusPerNode": 0}},
    })


def test_a_file_directory_plans_without_parameter_count(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "phi3-dir")  # config.json only: no weights needed
    config = prepare_run(job(f"file://{directory}"), tmp_path / "run")
    assert config.plan.parameters == 3_821_079_552
    assert (config.plan.hidden_size, config.plan.layers) == (3072, 32)
    # run.json carries that plan to the trainer, which checks it against the same file.
    written = RunConfig.model_validate_json((tmp_path / "run" / "run.json").read_text())
    assert written.plan == config.plan


def test_without_a_config_the_name_still_has_to_tell(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="parameterCount"):
        prepare_run(job(f"file://{tmp_path / 'empty-dir'}"), tmp_path / "run")


def test_a_broken_config_json_is_named(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "broken", "{not json")
    with pytest.raises(ValueError, match=r"broken/config.json"):
        prepare_run(job(f"file://{directory}"), tmp_path / "run")
    model_dir(tmp_path / "list", "[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_model_config(f"file://{tmp_path / 'list'}")


def test_pvc_sources_map_like_the_trainers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    model_dir(tmp_path / "models" / "phi3")
    assert read_model_config("pvc://models/phi3") == PHI3
    config = prepare_run(job("pvc://models/phi3"), tmp_path / "run")
    assert config.plan.parameters == 3_821_079_552
    # A path that leaves its claim is not read (the trainer refuses it).
    assert config_path("pvc://models/../../etc") is None
    monkeypatch.delenv("KUBETUNE_PVC_ROOT")
    assert config_path("pvc://models/phi3") == Path("/mnt/pvc/models/phi3/config.json")


def test_builtin_reads_the_cached_conversion(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    assert read_model_config("builtin://smollm2-135m-instruct") is None  # not converted yet
    smollm2 = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
               "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
               "vocab_size": 49152, "tie_word_embeddings": True}
    model_dir(tmp_path / "models" / "smollm2-135m-instruct", smollm2)
    assert read_model_config("builtin://smollm2-135m-instruct") == smollm2
    # The converted copy and the table plan the same model.
    run = prepare_run(job("builtin://smollm2-135m-instruct"), tmp_path / "run")
    assert run.plan.parameters == 134_515_008


def test_hub_sources_are_planned_by_name(tmp_path: Path) -> None:
    assert config_path("hf://microsoft/Phi-3-mini-4k-instruct") is None
    config = prepare_run(job("hf://microsoft/Phi-3-mini-4k-instruct"), tmp_path / "run")
    assert config.plan.parameters == 3_821_079_552
