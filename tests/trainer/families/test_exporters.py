"""The family tests' exporter processes end with the test process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.trainer.conftest import REPO

STARTS_A_POOL = """
import os, shutil, sys, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from tests.trainer.families import exports
from tests.trainer.families.exports import die_with_parent

shutil.rmtree(exports.SCRATCH)  # this process ends by SIGKILL: its atexit never runs

pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                           initializer=die_with_parent)
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 600)
time.sleep(600)
"""


def test_a_killed_test_process_takes_its_exporters_with_it() -> None:
    parent = subprocess.Popen([sys.executable, "-c", STARTS_A_POOL], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError(f"exporter {worker} outlived its killed test process")
