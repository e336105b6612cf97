"""`python -m kubetune_trainer <train|export|serve|copy-model> ...`: one module per subcommand."""

from __future__ import annotations

import importlib
import sys

from kubetune_trainer import allocator

COMMANDS = {
    "train": "kubetune_trainer.train.run",
    "export": "kubetune_trainer.export.run",
    "serve": "kubetune_trainer.serve.server",
    # The inference pods' init container: the served export off the artifact claim.
    "copy-model": "kubetune_trainer.copy_model",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        print(f"usage: python -m kubetune_trainer {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    if args[0] == "train":
        allocator.reexec_under_allocator(args)  # returns only when nothing is to be preloaded
    module = importlib.import_module(COMMANDS[args[0]])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
