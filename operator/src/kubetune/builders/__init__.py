"""Pure manifest builders: FineTuneJob (+ plan, settings) in, Kubernetes objects as dicts out.

No I/O, no clock, no kopf: every child carries its owner reference, the standard labels and
a hash of itself, so the caller can tell an unchanged child from one to apply.
"""

from kubetune.builders.export import export_job
from kubetune.builders.meta import Owner, manifest_hash, training_hash
from kubetune.builders.serving import serving_deployment, serving_service
from kubetune.builders.training import (
    artifacts_claim,
    rendezvous_service,
    run_config_map,
    training_job,
)

__all__ = [
    "Owner",
    "artifacts_claim",
    "export_job",
    "manifest_hash",
    "rendezvous_service",
    "run_config_map",
    "serving_deployment",
    "serving_service",
    "training_hash",
    "training_job",
]
