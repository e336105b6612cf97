"""The check at start that the plan was made for the model being trained.

The operator plans a model it recognises by name (it cannot read a PVC or the Hub); the
trainer can read the model's config.json. `check` compares the plan's `parameters`,
`hiddenSize` and `layers` with it (`kubetune.api.modelconfig.plan_mismatch`) and logs what
differs; the caller puts that into the report, whose short form carries it to the operator's
Trained condition. The check never fails a run: a config it cannot read is logged and skipped
(loading the model reports a missing or broken one).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kubetune.api import RunConfig
from kubetune.api.modelconfig import ModelConfigError, plan_mismatch, read_architecture
from kubetune_trainer.sources import ModelLocation
from kubetune_trainer.train.model import hub_kwargs

log = logging.getLogger("kubetune_trainer")


def model_config(location: ModelLocation, run: RunConfig) -> dict[str, Any]:
    """The model's config.json: the file of a local directory, else the Hub's (transformers
    resolves it, from the local cache when offline)."""
    if not location.is_hub:
        document = json.loads((Path(location.name_or_path) / "config.json").read_text())
        if not isinstance(document, dict):
            raise ModelConfigError("config.json is not a JSON object")
        return document
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location.name_or_path, **hub_kwargs(location, run.spec))
    return dict(config.to_dict())


def check(run: RunConfig, location: ModelLocation) -> str | None:
    """What differs between the plan's model and config.json, or None (they agree, or the
    config could not be read)."""
    try:
        model = read_architecture(model_config(location, run))
    except ModelConfigError as error:
        log.info("the plan was not checked against config.json: %s", error)
        return None
    except Exception as error:  # reading it is the loader's job; it reports the problem
        log.warning("the plan was not checked: cannot read the model's config: %s", error)
        return None
    mismatch = plan_mismatch(run.plan, model)
    if mismatch:
        log.warning("%s", mismatch)
    return mismatch
