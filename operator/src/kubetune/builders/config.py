"""Settings of one operator deployment (flags of `kubetune operator`), passed to the builders."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TRAINER_IMAGE = "kubetune-trainer:0.1.0"
DEFAULT_SERVING_IMAGE = "kubetune-trainer:0.1.0"
PROGRESS_AUDIENCE = "kubetune.io/progress"


@dataclass(frozen=True)
class OperatorConfig:
    """What the builders need to know beyond the FineTuneJob itself."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """Image of the training and export pods (`python -m kubetune_trainer train|export`)."""
    serving_image: str = DEFAULT_SERVING_IMAGE
    """Image of the inference pods (`python -m kubetune_trainer serve`)."""
    image_pull_policy: str = "IfNotPresent"
    progress_url: str = "http://kubetune-operator.kubetune-system.svc:8080"
    """Base URL at which trainer pods reach the operator's progress endpoint."""
    progress_audience: str = PROGRESS_AUDIENCE
    """Audience of the projected ServiceAccount token trainer pods present."""
    training_backoff_limit: int = 3
    """Retries of a training pod after retryable failures (each resumes from a checkpoint)."""
    export_backoff_limit: int = 2
    default_storage_size: str = "50Gi"
    allow_pod_metadata: bool = False
    """Honour the `kubetune.io/pod-metadata` annotation (extra pod labels/annotations; tests)."""
    run_as_user: int = 1000
    """UID of the data-plane containers (the images' non-root user)."""
    trainer_service_account: str = ""
    """ServiceAccount of the training and export pods ("" = the namespace's `default`)."""
    serving_service_account: str = ""
    """ServiceAccount of the inference pods ("" = the namespace's `default`)."""
