"""The model's config.json on this machine, read for the planner (`kubetune run`).

The planner is pure, so the reading happens here and the parsed document is handed to
`kubetune.planner.plan.plan`. The paths are the trainer's (`kubetune_trainer.sources`):
`file:///dir` is `dir`, `pvc://claim/path` is `$KUBETUNE_PVC_ROOT/claim/path` (default
`/mnt/pvc`, never outside the claim), `builtin://name` is the converted copy in the cache
(`kubetune.api.dataplane.cache_root`), present once the built-in model has been used. `hf://`
sources are not read: the planner recognises published models by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kubetune.api.dataplane import cache_root

PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"


def config_path(source: str) -> Path | None:
    """Where the source's config.json would be on this machine, or None (`hf://`, or a
    `pvc://` path that leaves its claim, which the trainer refuses)."""
    scheme, _, rest = source.partition("://")
    if scheme == "file":
        return Path(rest) / "config.json"
    if scheme == "builtin":
        return cache_root() / "models" / rest / "config.json"
    if scheme == "pvc":
        claim, _, inside = rest.lstrip("/").partition("/")
        mount = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / claim
        path = Path(os.path.normpath(mount / inside))
        if not claim or claim in (".", "..") or not path.is_relative_to(mount):
            return None
        return path / "config.json"
    return None


def read_model_config(source: str) -> dict[str, Any] | None:
    """The parsed config.json of a model source, or None where there is none to read. A file
    that is there but is not a JSON object raises ValueError naming it."""
    path = config_path(source)
    if path is None or not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"spec.model.source: cannot read {path}: {error}") from error
    if not isinstance(document, dict):
        raise ValueError(f"spec.model.source: {path} is not a JSON object")
    return document
