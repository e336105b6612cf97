"""The trainer re-executes itself under tcmalloc (`kubetune_trainer/allocator.py`)."""

from __future__ import annotations

import ctypes.util
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune_trainer import allocator
from tests.trainer.conftest import report

INSTALLED = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}


def finder(*present: str) -> Callable[[str], str | None]:
    return lambda name: INSTALLED[name] if name in present else None


def test_auto_prefers_tcmalloc_then_jemalloc_then_the_system() -> None:
    both = allocator.preload_env({"PATH": "/bin"}, finder("tcmalloc_minimal", "jemalloc"))
    assert both is not None and both["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert both["PATH"] == "/bin" and both[allocator.ACTIVE_ENV] == "libtcmalloc_minimal.so.4"
    only_je = allocator.preload_env({}, finder("jemalloc"))
    assert only_je is not None and only_je["LD_PRELOAD"] == "libjemalloc.so.2"
    assert allocator.preload_env({}, finder()) is None


def test_a_users_preloads_are_kept_and_the_choice_is_honoured() -> None:
    env = allocator.preload_env({"LD_PRELOAD": "/opt/libfoo.so", "KUBETUNE_MALLOC": "jemalloc"},
                                finder("tcmalloc_minimal", "jemalloc"))
    assert env is not None and env["LD_PRELOAD"] == "libjemalloc.so.2:/opt/libfoo.so"
    assert allocator.preload_env({"KUBETUNE_MALLOC": "system"}, finder("jemalloc")) is None


def test_the_re_executed_process_does_not_re_execute_again() -> None:
    assert allocator.preload_env({allocator.ACTIVE_ENV: "libjemalloc.so.2"},
                                 finder("jemalloc")) is None


def test_an_unknown_choice_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="KUBETUNE_MALLOC must be auto, tcmalloc"):
        allocator.preload_env({"KUBETUNE_MALLOC": "mimalloc"}, finder())


def test_a_training_run_reports_the_allocator_it_ran_under(lora_reference: Path) -> None:
    expected = "tcmalloc" if ctypes.util.find_library("tcmalloc_minimal") else (
        "jemalloc" if ctypes.util.find_library("jemalloc") else "system")
    done = report(lora_reference)
    assert done["allocator"] == expected
    assert done["peakMemoryMiB"] > 500  # the fp32 model alone is 540 MB
