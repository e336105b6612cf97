"""The `kubetune.io/v1alpha1` API: the single source of the CRD, the docs and validation.

Also the pure seams both planes share: the typed reports that cross them (`dataplane`), a
model's config (`modelconfig`), the evaluation metrics (`metrics`) and the token buckets that
ration requests (`ratelimit`). No I/O: pydantic only.
"""

from kubetune.api.resource import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    FineTuneJob,
    ManifestError,
    load_manifest,
    parse_finetunejob,
)
from kubetune.api.runconfig import RunConfig
from kubetune.api.spec import FineTuneJobSpec, Method
from kubetune.api.status import Condition, ConditionType, FineTuneJobStatus, Phase, PlanStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Condition",
    "ConditionType",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ManifestError",
    "Method",
    "Phase",
    "PlanStatus",
    "RunConfig",
    "load_manifest",
    "parse_finetunejob",
]
