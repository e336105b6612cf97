"""`python -m kubetune_trainer copy-model`: the inference pods' init container, which copies the
served export off the artifact claim into the pod's own emptyDir (the operator's
`kubetune.builders.serving`). Run on temporary directories as the pod runs it: a subprocess of
the image's own entry point, so the command the Deployment names is the one tested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _export(root: Path, *, ok: bool = True) -> Path:
    """A directory shaped like the exporter's output: model files and `export.json`."""
    export = root / "onnx"
    export.mkdir(parents=True)
    (export / "genai_config.json").write_text('{"model": {"context_length": 2048}}')
    (export / "model.onnx").write_bytes(b"\x08\x07" * 1000)
    (export / "model.onnx.data").write_bytes(os.urandom(300_000))
    (export / "tokenizer.json").write_text('{"version": "1.0"}')
    (export / "export.json").write_text(json.dumps({"ok": ok, "precision": "INT4"}))
    return export


def _copy(
    source: Path, dest: Path, tmp_path: Path, *flags: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    message = tmp_path / "termination-log"
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'operator/src'}:{REPO / 'trainer-image/src'}",
        "KUBETUNE_TERMINATION_LOG": str(message),
    }
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "copy-model",
         *flags, "--source", str(source), "--dest", str(dest)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return done, message.read_text() if message.exists() else ""


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_copies_the_export_byte_for_byte(tmp_path: Path) -> None:
    source = _export(tmp_path / "claim" / "demo" / "gen-2")
    (source / "extra").mkdir()
    (source / "extra" / "nested.txt").write_text("kept")
    dest = tmp_path / "model"
    dest.mkdir()  # the emptyDir exists before the init container starts

    done, _ = _copy(source, dest, tmp_path)

    assert done.returncode == 0, done.stderr
    assert _tree(dest) == _tree(source)
    assert "copied 6 files" in done.stdout


def test_a_rerun_replaces_what_an_interrupted_copy_left(tmp_path: Path) -> None:
    """An init container that failed half-way runs again in the same emptyDir."""
    source = _export(tmp_path / "claim")
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "model.onnx.data").write_bytes(b"half")
    (dest / "stale.bin").write_bytes(b"from an earlier try")

    done, _ = _copy(source, dest, tmp_path)

    assert done.returncode == 0, done.stderr
    assert _tree(dest) == _tree(source)


def _empty(root: Path) -> Path:
    (root / "onnx").mkdir(parents=True)
    return root / "onnx"


@pytest.mark.parametrize(
    ("prepare", "said"),
    [
        (lambda root: root / "absent", "no exported model at"),
        (_empty, "no exported model at"),
        (lambda root: _export(root, ok=False), "export.json says the export failed"),
    ],
    ids=["missing", "empty", "failed-export"],
)
def test_a_missing_or_unusable_export_fails_with_a_clear_message(
    tmp_path: Path, prepare: Callable[[Path], Path], said: str
) -> None:
    source = prepare(tmp_path / "claim")
    dest = tmp_path / "model"
    dest.mkdir()

    done, message = _copy(source, dest, tmp_path)

    assert done.returncode == 2, done.stderr  # not retryable: only a new export helps
    assert said in message and str(source) in message
    assert said in done.stderr


def test_a_copy_that_comes_out_short_is_refused(tmp_path: Path) -> None:
    """The check after the copy compares every file's size with the source's: a full disk
    (an emptyDir over its sizeLimit) must not start a server on a truncated model."""
    from kubetune_trainer.copy_model import CopyError, verify_copy

    source = _export(tmp_path / "claim")
    dest = tmp_path / "model"
    dest.mkdir()
    for item in source.iterdir():
        (dest / item.name).write_bytes(item.read_bytes())
    (dest / "model.onnx.data").write_bytes(b"truncated")

    with pytest.raises(CopyError, match=r"model.onnx.data: copied 9 of 300000 bytes"):
        verify_copy(source, dest)


def test_the_copy_never_changes_the_destination_root(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The emptyDir's root belongs to the kubelet: copying the whole tree onto it ended with
    copystat on it, and the non-root init container failed with `[Errno 1] Operation not
    permitted` on the real node. Here copystat on the root fails as it does there."""
    from kubetune_trainer import copy_model as module

    source, dest = tmp_path / "export", tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "export.json").write_text('{"ok": true}')
    (source / "model.onnx").write_bytes(b"x" * 10)
    (source / "sub" / "part").write_bytes(b"y")
    dest.mkdir()
    copystat = shutil.copystat

    def refusing(src: object, dst: object, **kwargs: object) -> None:
        if Path(str(dst)) == dest:
            raise PermissionError(1, "Operation not permitted")
        copystat(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "copystat", refusing)
    files, size = module.copy_model(source, dest)
    assert files == 3 and size == 10 + 1 + len('{"ok": true}')
    assert (dest / "sub" / "part").read_bytes() == b"y"


def test_adapter_copies_a_peft_adapter_onto_the_pool_claim(tmp_path: Path) -> None:
    """A pool member's publish Job: `adapter/` of its generation to `adapters/<job>/gen-N`
    (a directory that does not exist yet on the pool claim)."""
    source = tmp_path / "claim" / "demo" / "gen-2" / "adapter"
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (source / "adapter_model.safetensors").write_bytes(os.urandom(50_000))
    dest = tmp_path / "pool" / "adapters" / "demo" / "gen-2"

    done, _ = _copy(source, dest, tmp_path, "--adapter")

    assert done.returncode == 0, done.stderr
    assert _tree(dest) == _tree(source)


def test_adapter_without_its_config_is_refused_with_the_reason(tmp_path: Path) -> None:
    """An export (or an empty directory) is no adapter: exit 2 and the reason, nothing copied."""
    source = _export(tmp_path / "claim" / "demo" / "gen-1")
    dest = tmp_path / "pool" / "adapters" / "demo" / "gen-1"

    done, message = _copy(source, dest, tmp_path, "--adapter")

    assert done.returncode == 2
    assert "adapter_config.json is missing" in message
    assert not dest.exists()
