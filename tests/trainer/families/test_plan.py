"""Planning each family from its config.json, as `kubetune run` does for a `file://` model:
the size is the model's own, exactly, and its linear layers are the ones LoRA will adapt."""

from __future__ import annotations

import pytest

from kubetune.api import FineTuneJobSpec
from kubetune.local.modelconfig import read_model_config
from kubetune.planner.plan import plan
from kubetune.planner.shapes import model_shape
from tests.trainer.families.catalog import FAMILIES
from tests.trainer.families.conftest import tiny_model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_plan_reads_the_familys_config_json(name: str) -> None:
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.train.model import linear_module_names

    source = f"file://{tiny_model(name)}"
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": source}, "dataset": {"source": "file:///data.jsonl"},
        "resources": {"gpusPerNode": 0}})
    config = read_model_config(source)
    assert config is not None and spec.model.parameter_count is None
    shape = model_shape(spec, config)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model(name)))
    assert shape.parameters == model.num_parameters()
    decoder = {linear.name for linear in shape.linears if linear.decoder}
    assert decoder == set(linear_module_names(model))
    assert plan(spec, config).world_size == 1
