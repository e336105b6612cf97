"""The `FineTuneJob` object and how manifests are parsed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetune.api.rules import RuleViolation
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubetune"]


class ObjectMeta(BaseModel):
    """The parts of metadata KubeTune reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    generation: int | None = None
    uid: str | None = None


class FineTuneJob(BaseModel):
    """A fine-tuning run, its evaluation and the inference endpoint it rolls out."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["kubetune.io/v1alpha1"] = Field("kubetune.io/v1alpha1", alias="apiVersion")
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


class ManifestError(ValueError):
    """A manifest that cannot be used, with every problem named by its field path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        listing = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source} is not a valid FineTuneJob:\n{listing}")


def _field_path(loc: tuple[int | str, ...]) -> str:
    """Pydantic's location as the manifest spells it: `spec.resources.nodes`, `items[2]`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("int", "str", "literal['Auto']", "constrained-int", "[key]"):
            # pydantic names the union member it tried, or `[key]` for a map's bad key; the
            # user only cares about the field.
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def describe_validation_error(error: ValidationError) -> list[str]:
    """One line per problem, naming the field the way it is written in the manifest."""
    seen: set[str] = set()
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        path = _field_path(item["loc"])
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, RuleViolation) and cause.rule.field_path:
            path += cause.rule.field_path
        line = f"{path or '(top level)'}: {message}"
        if line not in seen:
            seen.add(line)
            problems.append(line)
    return problems


def parse_finetunejob(document: dict[str, Any], source: str = "manifest") -> FineTuneJob:
    """Validate one manifest document with the same rules the API server applies."""
    if not isinstance(document, dict):
        raise ManifestError(source, ["the document is not a mapping"])
    try:
        return FineTuneJob.model_validate(document)
    except ValidationError as error:
        raise ManifestError(source, describe_validation_error(error)) from None


def load_manifest(path: Path) -> FineTuneJob:
    """Read a YAML file holding one FineTuneJob."""
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as error:
        raise ManifestError(str(path), [f"not valid YAML: {error}"]) from None
    jobs = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == KIND]
    if len(jobs) != 1:
        raise ManifestError(str(path), [f"expected one {KIND} document, found {len(jobs)}"])
    return parse_finetunejob(jobs[0], str(path))
