"""The run config: the one JSON document the data plane reads (`--config run.json`).

The operator writes it into the training ConfigMap; `kubetune run` writes it into the run
directory. It carries the spec as the user wrote it plus what the planner resolved, so the
trainer never re-plans and both sides validate it with the same models.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kubetune.api.rules import ApiModel
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import PlanStatus


class RunConfig(ApiModel):
    """Everything one training run needs, with no secret in it."""

    name: str
    """The FineTuneJob's name."""
    namespace: str | None = None
    """The FineTuneJob's namespace (none in local mode)."""
    generation: int = 1
    """The spec generation this run trains."""
    spec: FineTuneJobSpec
    """The spec, with defaults applied."""
    plan: PlanStatus
    """The resolved plan (world size, ZeRO stage, batch split)."""
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """The DeepSpeed config generated from the plan; empty for single-process runs without
    DeepSpeed."""
