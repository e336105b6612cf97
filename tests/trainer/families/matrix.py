"""Which export precisions every `make test` runs for each family, and which only the full
matrix (`make test-families`) does.

Each family is exported at FP32 and INT4 GPTQ in every run (test_export.py checks those most
closely), and at two of the other six CPU precisions in turn, so that each of the six is
exported for three or four families every run. On the 2-core machine the twenty a run takes
add about 4.5 minutes, all sixty about 17 (twelve took 3.4): the other forty are marked
`exhaustive`, which `make test` deselects and `make test-families` runs.
"""

from __future__ import annotations

from tests.trainer.families.catalog import FAMILIES

NAMES = sorted(FAMILIES)
QUANTIZED = (("INT8", None), ("INT4", "RTN"), ("INT4", "RTNLast"), ("INT4", "KQuant"),
             ("INT4", "KQuantMixed"), ("Auto", None))
"""Every serving precision on CPU besides FP32 and INT4 GPTQ."""
PER_RUN = 2


def variant(precision: str, quantization: str | None) -> str:
    """The test parameter's id after the family's: `INT4-RTN`, `Auto`."""
    return f"{precision}-{quantization}" if quantization else precision


def in_every_run(name: str, precision: str, quantization: str | None) -> bool:
    """Family i takes the precisions at 2i and 2i+1 (mod 6) of `QUANTIZED`."""
    start = NAMES.index(name) * PER_RUN
    chosen = {QUANTIZED[(start + k) % len(QUANTIZED)] for k in range(PER_RUN)}
    return (precision, quantization) in chosen
