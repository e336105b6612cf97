"""`python -m kubetune_trainer copy-model --source DIR --dest DIR`: the inference pods' init
container (KServe's storage initializer, for a model on the artifact claim).

The operator mounts only the served generation's export (`<job>/gen-N/onnx`, read-only) at
`--source` and the pod's own emptyDir at `--dest`; the server then loads the copy, so the
server container never reads the artifact claim. The copy is refused unless the exporter
finished it (`export.json` with `ok: true`), and checked after copying: every file the size
of its source, so a full emptyDir (its `sizeLimit`) does not start a server on a truncated
model. A missing or unfinished export exits 2 (a new export, not a retry, helps) with the
reason as the container's termination message, which the pod's status shows.

`--adapter` copies a PEFT adapter directory instead (a pool member's publish Job: its
generation's `adapter/` onto the pool claim at `adapters/<job>/gen-N`, where the pool's server
reads it when the operator asks it to load it): the source must hold `adapter_config.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from kubetune.api.dataplane import CONFIG_ERROR_EXIT_CODE, write_termination_message

EXPORT_REPORT = "export.json"


class CopyError(Exception):
    """The export cannot be served from here; the message says why and where."""


def check_source(source: Path) -> None:
    """An export the exporter finished: a non-empty directory whose `export.json` says ok."""
    if not source.is_dir() or not any(source.iterdir()):
        raise CopyError(
            f"no exported model at {source} (the export of this generation is missing from "
            "the artifact volume: was the volume replaced, or the run directory deleted?)"
        )
    report = source / EXPORT_REPORT
    try:
        ok = json.loads(report.read_text()).get("ok") is True
    except (OSError, ValueError, AttributeError) as error:
        raise CopyError(f"{report}: cannot read the export's report: {error}") from None
    if not ok:
        raise CopyError(f"{report}: export.json says the export failed; nothing to serve")


ADAPTER_CONFIG = "adapter_config.json"


def check_adapter_source(source: Path) -> None:
    """A PEFT adapter directory: `adapter_config.json` that is a JSON object."""
    config = source / ADAPTER_CONFIG
    if not config.is_file():
        raise CopyError(
            f"no adapter at {source} ({ADAPTER_CONFIG} is missing: this generation saved no "
            "adapter, or the run directory was deleted)"
        )
    try:
        ok = isinstance(json.loads(config.read_text()), dict)
    except (OSError, ValueError) as error:
        raise CopyError(f"{config}: cannot read the adapter's config: {error}") from None
    if not ok:
        raise CopyError(f"{config}: not a JSON object")


def files_of(root: Path) -> list[Path]:
    """Every regular file under `root`, relative to it, in a stable order."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def clear(dest: Path) -> None:
    """Empty `dest` (kept itself: it is the emptyDir's mount point). An init container that
    failed half-way runs again in the same emptyDir."""
    for item in dest.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def verify_copy(source: Path, dest: Path) -> int:
    """Bytes copied; raises CopyError unless `dest` holds every file of `source` at its size."""
    total = 0
    for relative in files_of(source):
        want = (source / relative).stat().st_size
        copied = dest / relative
        have = copied.stat().st_size if copied.is_file() else None
        if have != want:
            got = "nothing" if have is None else f"{have} of {want} bytes"
            raise CopyError(f"{relative}: copied {got} (is the model copy's volume full?)")
        total += want
    return total


def copy_model(source: Path, dest: Path, adapter: bool = False) -> tuple[int, int]:
    """(files, bytes) copied from the export (or the `adapter`) at `source` into `dest`,
    verified."""
    if adapter:
        check_adapter_source(source)
    else:
        check_source(source)
    dest.mkdir(parents=True, exist_ok=True)
    clear(dest)
    try:
        # Item by item, not copytree(source, dest): that ends with copystat on `dest` itself,
        # the emptyDir's root, which the kubelet owns; a non-root container may not chmod it
        # (EPERM on the real node). What it copies inside is its own.
        for item in source.iterdir():
            if item.is_dir():
                shutil.copytree(item, dest / item.name)
            else:
                shutil.copy2(item, dest / item.name)
    except OSError as error:
        raise CopyError(f"copying {source} to {dest}: {error}") from None
    return len(files_of(source)), verify_copy(source, dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer copy-model")
    parser.add_argument("--source", required=True, type=Path,
                        help="the export directory, as mounted from the artifact claim")
    parser.add_argument("--dest", required=True, type=Path,
                        help="where the server loads the model from (the pod's emptyDir)")
    parser.add_argument("--adapter", action="store_true",
                        help="copy a PEFT adapter directory (adapter_config.json), not an export")
    args = parser.parse_args(argv)
    try:
        files, size = copy_model(args.source, args.dest, adapter=args.adapter)
    except CopyError as error:
        message = f"copy-model: {error}"
        print(message, file=sys.stderr)
        write_termination_message(message)
        return CONFIG_ERROR_EXIT_CODE
    print(f"copied {files} files ({size} bytes) from {args.source} to {args.dest}")
    return 0
