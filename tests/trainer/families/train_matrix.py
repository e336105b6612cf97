"""Train many (family, method) cells in one process: `python -m tests.trainer.families.train_matrix
RUN.json...`. Each RUN.json is a RunConfig; its run directory is RUN.json without `.run.json`.

The same code path as `python -m kubetune_trainer train` (`kubetune_trainer.train.run.main`),
without starting a new interpreter (and re-executing it under tcmalloc) for each of the matrix's
forty cells, which would cost more than the training. Each cell's exit code goes to
`RUN.exit`; the trainer's report.json says the rest.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kubetune_trainer.train import run


def main(configs: list[str]) -> None:
    for config in map(Path, configs):
        output = config.with_name(config.name.removesuffix(".run.json"))
        code = run.main(["--config", str(config), "--output", str(output)])
        output.with_suffix(".exit").write_text(str(code))


if __name__ == "__main__":
    main(sys.argv[1:])
