"""Where models and datasets come from: `builtin://`, `file://`, `pvc://` and `hf://` URIs.

`pvc://claim/path` maps to `$KUBETUNE_PVC_ROOT/claim/path` (default root `/mnt/pvc`): the
operator mounts each claim a run reads from at `<root>/<claim>`, and local mode points the root
at a directory holding one folder per claim name. `hf://org/name` is handed to transformers as a
Hub id; with `HF_HUB_OFFLINE=1` it resolves from the local Hugging Face cache only. The
model's token comes from `HF_TOKEN`; a dataset's from `KUBETUNE_DATASET_TOKEN` when it has a
Secret of its own, else `HF_TOKEN` (the operator sets both from the spec's `secretRef`s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.dataplane import DATASET_TOKEN_ENV, MODEL_TOKEN_ENV
from kubetune_trainer import hub
from kubetune_trainer.errors import ConfigError

DATASETS_DIR = Path(__file__).parent / "datasets"
DEFAULT_PVC_ROOT = "/mnt/pvc"


@dataclass(frozen=True)
class ModelLocation:
    """What to pass to `from_pretrained`: a local directory or a Hub id (with revision)."""

    name_or_path: str
    revision: str | None = None
    is_hub: bool = False


def _split(uri: str) -> tuple[str, str]:
    scheme, sep, rest = uri.partition("://")
    if not sep or not rest:
        raise ConfigError(f"{uri!r} is not a <scheme>://... URI")
    return scheme, rest


def pvc_path(rest: str) -> Path:
    """`claim/path` -> `$KUBETUNE_PVC_ROOT/claim/path`, never outside the claim's mount:
    `..` that climbs out of the claim (`pvc://data/../../etc`) is refused."""
    root = Path(os.environ.get("KUBETUNE_PVC_ROOT", DEFAULT_PVC_ROOT))
    claim, _, inside = rest.lstrip("/").partition("/")
    mount = root / claim
    path = Path(os.path.normpath(mount / inside))
    if not claim or claim in (".", "..") or not path.is_relative_to(mount):
        raise ConfigError(f"pvc://{rest}: the path leaves the claim {claim!r}")
    return path


def resolve_model(uri: str, revision: str | None = None) -> ModelLocation:
    """Map a model URI to a directory or Hub id; builtin models are converted on first use."""
    scheme, rest = _split(uri)
    if scheme == "builtin":
        from kubetune_trainer.builtin import BUILTIN_MODELS, builtin_model_dir

        if rest not in BUILTIN_MODELS:
            raise ConfigError(f"spec.model.source: unknown built-in model {rest!r}")
        return ModelLocation(str(builtin_model_dir(rest)))
    if scheme in ("file", "pvc"):
        path = Path(rest) if scheme == "file" else pvc_path(rest)
        if not (path / "config.json").is_file():
            raise ConfigError(f"spec.model.source: {uri} -> {path} has no config.json")
        return ModelLocation(str(path))
    if scheme == "hf":
        return ModelLocation(rest, revision=revision, is_hub=True)
    raise ConfigError(f"spec.model.source: unsupported scheme {scheme!r} in {uri!r}")


def resolve_dataset(uri: str, field: str = "spec.dataset.source") -> Path:
    """Map a dataset URI to a local JSONL file (builtin: `datasets/<name>/train.jsonl`);
    errors name `field`, the spec field the URI came from."""
    scheme, rest = _split(uri)
    if scheme == "builtin":
        path = DATASETS_DIR / rest / "train.jsonl"
    elif scheme == "file":
        path = Path(rest)
    elif scheme == "pvc":
        path = pvc_path(rest)
    elif scheme == "hf":
        path = _hub_dataset_file(rest, field)
    else:
        raise ConfigError(f"dataset source: unsupported scheme {scheme!r} in {uri!r}")
    if not path.is_file():
        raise ConfigError(f"dataset source {uri}: {path} does not exist")
    return path


def builtin_split(uri: str, split: str) -> Path | None:
    """The `validation` or `test` file shipped beside a builtin dataset, if any."""
    scheme, rest = _split(uri)
    if scheme != "builtin":
        return None
    path = DATASETS_DIR / rest / f"{split}.jsonl"
    return path if path.is_file() else None


def dataset_token() -> str | None:
    """The token an `hf://` dataset is read with: its own Secret's, else the model's."""
    return os.environ.get(DATASET_TOKEN_ENV) or os.environ.get(MODEL_TOKEN_ENV) or None


def _hub_dataset_file(repo_and_file: str, field: str) -> Path:
    """`hf://org/name[/file.jsonl]` -> a JSONL file of that dataset repo, from the local cache
    when offline (the default file is `train.jsonl`)."""
    parts = repo_and_file.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "train.jsonl"
    from huggingface_hub import hf_hub_download

    # A repository that does not exist or refuses the token is a configuration error; the
    # network failing is not, and propagates to be retried (`hub.classify`).
    with hub.configuration_errors(f"{field} hf://{repo_and_file}"):
        return Path(hf_hub_download(repo, filename, repo_type="dataset", token=dataset_token()))
