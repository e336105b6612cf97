"""Model and dataset URIs: a `pvc://` path stays inside its claim's mount."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer.errors import ConfigError
from kubetune_trainer.sources import pvc_path, resolve_dataset


def test_a_pvc_path_maps_into_the_claims_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", "/mnt/pvc")
    assert pvc_path("data/sets/train.jsonl") == Path("/mnt/pvc/data/sets/train.jsonl")
    assert pvc_path("data/a/../train.jsonl") == Path("/mnt/pvc/data/train.jsonl")


@pytest.mark.parametrize("rest", ["data/../../etc/passwd", "data/../other/secret", "../etc",
                                  "./x", "data/../../../root"])
def test_a_pvc_path_that_leaves_its_claim_is_refused(rest: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", "/mnt/pvc")
    with pytest.raises(ConfigError, match="leaves the claim"):
        pvc_path(rest)


def _hub_token_used(monkeypatch: pytest.MonkeyPatch, uri: str, tmp_path: Path) -> str | None:
    """The token `resolve_dataset` hands the hub for `uri` (the hub call is recorded, not made)."""
    import huggingface_hub

    seen: dict[str, str | None] = {}

    def download(repo: str, filename: str, repo_type: str, token: str | None) -> str:
        seen["token"] = token
        path = tmp_path / filename
        path.write_text('{"messages": []}\n')
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    resolve_dataset(uri)
    return seen["token"]


def test_a_dataset_with_its_own_secret_is_read_with_that_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The env the operator's builder sets for a spec with two Secrets, as a pod would get it:
    the dataset is read with the dataset's Secret, not the model's."""
    from kubetune.api import FineTuneJobSpec
    from kubetune.builders.pod import secret_env

    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "hf://org/model", "secretRef": {"name": "model-token"}},
        "dataset": {"source": "hf://org/private-set", "secretRef": {"name": "data-token"}},
    })  # fmt: skip
    values = {"model-token": "hf_model", "data-token": "hf_data"}
    for env in secret_env(spec):
        monkeypatch.setenv(env["name"], values[env["valueFrom"]["secretKeyRef"]["name"]])
    assert _hub_token_used(monkeypatch, "hf://org/private-set", tmp_path) == "hf_data"


def test_a_dataset_without_a_secret_of_its_own_uses_the_model_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KUBETUNE_DATASET_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_model")
    assert _hub_token_used(monkeypatch, "hf://org/set", tmp_path) == "hf_model"
