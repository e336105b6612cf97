"""The `kubetune` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune.api import ManifestError, load_manifest


def _crd(_: argparse.Namespace) -> int:
    from kubetune.api.codegen.crd import render_crd

    sys.stdout.write(render_crd())
    return 0


def _validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            job = load_manifest(Path(path))
        except (ManifestError, OSError) as error:
            print(error, file=sys.stderr)
            failed = True
            continue
        print(f"{path}: valid FineTuneJob {job.metadata.name!r} ({job.spec.method.value})")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune language models on Kubernetes or locally."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    crd = commands.add_parser("crd", help="print the FineTuneJob CRD generated from the API")
    crd.set_defaults(func=_crd)

    validate = commands.add_parser("validate", help="check FineTuneJob manifests offline")
    validate.add_argument("files", nargs="+", help="YAML manifests")
    validate.set_defaults(func=_validate)

    from kubetune.local.run import add_run_command

    add_run_command(commands)

    from kubetune.operator.main import add_operator_command

    add_operator_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
