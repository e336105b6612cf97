"""`python -m kubetune_trainer copy-model --source DIR --dest DIR`: the inference pods' init
container (KServe's storage initializer, for a model on the artifact claim).

The operator mounts only the served generation's export (`<job>/gen-N/onnx`, read-only) at
`--source` and the pod's own emptyDir at `--dest`; the server then loads the copy, so the
server container never reads the artifact claim. The copy is refused unless the exporter
finished it (`export.json` with `ok: true`), and checked after copying: every file the size
of its source, so a full emptyDir (its `sizeLimit`) does not start a server on a truncated
model. A missing or unfinished export exits 2 (a new export, not a retry, helps) with the
reason as the container's termination message, which the pod's status shows.
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


def copy_model(source: Path, dest: Path) -> tuple[int, int]:
    """(files, bytes) copied from the export at `source` into `dest`, verified."""
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
    args = parser.parse_args(argv)
    try:
        files, size = copy_model(args.source, args.dest)
    except CopyError as error:
        message = f"copy-model: {error}"
        print(message, file=sys.stderr)
        write_termination_message(message)
        return CONFIG_ERROR_EXIT_CODE
    print(f"copied {files} files ({size} bytes) from {args.source} to {args.dest}")
    return 0
