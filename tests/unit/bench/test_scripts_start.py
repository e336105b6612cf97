"""Every benchmark script starts the way its docstring says it is run: `python bench/X.py`.

Python puts the script's folder first on `sys.path`, so a bench file named like a standard
module (`operator.py` was one) shadows it for every script there and none of them starts.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_no_bench_file_shadows_a_standard_module() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    standard = set(sys.stdlib_module_names) | {p.stem for p in stdlib.glob("*.py")}
    assert [p.name for p in SCRIPTS if p.stem in standard] == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_script_starts(script: Path) -> None:
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
