"""What crosses between the control plane and the data plane, besides the run config.

The trainer, the exporter and the server (`kubetune_trainer`) write these; the operator and
`kubetune run` read them. One definition each, so both planes agree on every key.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where converted models live on this machine, for both planes: `$KUBETUNE_CACHE`, or
    `kubetune` under `$XDG_CACHE_HOME` (default `~/.cache`)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune"
    return Path(os.environ.get("KUBETUNE_CACHE", default))
