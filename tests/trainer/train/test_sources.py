"""Model and dataset URIs: a `pvc://` path stays inside its claim's mount."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer.errors import ConfigError
from kubetune_trainer.sources import pvc_path


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
