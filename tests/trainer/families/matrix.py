"""Which export precisions every `make test` runs for each family, and which only the full
matrix (`make test-families`) does.

Each family is exported at FP32 and INT4 GPTQ in every run (test_export.py checks those most
closely), and at one of the other six CPU precisions in turn, so that each of the six is
exported for one or two families every run. On the 2-core machine all sixty take about 17
minutes and twenty took 4.5: one a family shortens `make test` (its warm run was 53 minutes
with two, over its 45-minute budget). The other fifty are marked `exhaustive`, which `make test`
deselects and `make test-families` runs.
"""

from __future__ import annotations

from tests.trainer.families.catalog import FAMILIES

NAMES = sorted(FAMILIES)
QUANTIZED = (("INT8", None), ("INT4", "RTN"), ("INT4", "RTNLast"), ("INT4", "KQuant"),
             ("INT4", "KQuantMixed"), ("Auto", None))
"""Every serving precision on CPU besides FP32 and INT4 GPTQ."""
PER_RUN = 1


def variant(precision: str, quantization: str | None) -> str:
    """The test parameter's id after the family's: `INT4-RTN`, `Auto`."""
    return f"{precision}-{quantization}" if quantization else precision


def in_every_run(name: str, precision: str, quantization: str | None) -> bool:
    """Family i takes the precision at i (mod 6) of `QUANTIZED`: each is exported every run."""
    start = NAMES.index(name) * PER_RUN
    chosen = {QUANTIZED[(start + k) % len(QUANTIZED)] for k in range(PER_RUN)}
    return (precision, quantization) in chosen
