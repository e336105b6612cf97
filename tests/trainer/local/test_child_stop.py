"""Ctrl-C while `kubetune run` stops a child never leaves the child running (issue 28, item 15).

The children run in sessions of their own, so the terminal's Ctrl-C reaches only `kubetune
run`; if it gives up on a child, nothing else will stop it. Real processes and real signals:
a driver process stands in for `kubetune run` (the same `Child`, `run_child` and SIGTERM
handling it uses), and its child stands in for a trainer that is slow to stop (it notes the
stop signals it ignores in its log, as a trainer finishing its checkpoint does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.trainer.conftest import REPO

STUBBORN_CHILD = textwrap.dedent("""
    import signal, sys, time
    def note(signum, frame):
        print(signal.Signals(signum).name, flush=True)
    for name in sys.argv[1].split(","):
        signal.signal(getattr(signal, name), note)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
""")

DRIVER = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from kubetune.local.processes import Child, run_child, terminate_like_ctrl_c

    log, ignores, path = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    # Ctrl-C as a terminal's foreground process gets it: a shell starts a background command
    # with SIGINT ignored, and Python then installs no handler (a test run started with `&`
    # failed here, the driver deaf to the test's SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    terminate_like_ctrl_c()  # as `kubetune run` does
    child = Child([sys.executable, "-c", sys.argv[4], ignores], log)
    print(child.process.pid, flush=True)

    def waiting():  # the test signals only once the driver waits where it means to
        print("waiting", flush=True)

    if path == "run_child":  # training and export
        run_child(child, on_tick=lambda: waiting() if child.process.poll() is None else None)
    else:  # serving: `finally: server.child.stop()` after Ctrl-C in wait_ready
        try:
            waiting()
            time.sleep(600)
        finally:
            child.stop()
""")

SETTLE_SECONDS = 10.0
"""Far less than `Child.stop`'s 30 s per signal: a child still there after this was left."""


def process_alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def child_pids() -> Iterator[list[int]]:
    """Kill any child the driver left behind, so a failing run leaks nothing."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if process_alive(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize("ignores", ["SIGINT", "SIGINT,SIGTERM"])
@pytest.mark.parametrize(("path", "first"), [
    # Ctrl-C outside run_child (the server's wait_ready): KeyboardInterrupt, then stop().
    pytest.param("finally_stop", signal.SIGINT, id="ctrl-c-then-stop"),
    # SIGTERM (`kill`, `timeout`) while run_child waits: KeyboardInterrupt, then stop().
    pytest.param("run_child", signal.SIGTERM, id="sigterm-in-run_child"),
])
def test_further_ctrl_c_during_stop_hurries_the_child_and_never_orphans_it(
        tmp_path: Path, child_pids: list[int], ignores: str, path: str, first: int) -> None:
    log = tmp_path / "child.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "operator/src"), str(REPO / "trainer-image/src"), str(REPO)])}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(log), ignores, path, STUBBORN_CHILD],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert driver.stdout is not None
        child = int(driver.stdout.readline())
        child_pids.append(child)
        assert driver.stdout.readline() == "waiting\n"

        def logged(word: str) -> Callable[[], bool]:
            return lambda: log.is_file() and word in log.read_text().split()

        assert wait_until(logged("ready"), 60), "the child never started"
        os.kill(driver.pid, first)
        # The driver is now in Child.stop: SIGINT sent, the child ignores it and waits.
        assert wait_until(logged("SIGINT"), 30), "the driver never sent SIGINT"
        for ignored_next in [*ignores.split(",")[1:], None]:
            os.kill(driver.pid, signal.SIGINT)  # another Ctrl-C: the next signal at once
            if ignored_next is not None:
                assert wait_until(logged(ignored_next), SETTLE_SECONDS), log.read_text()
        assert wait_until(lambda: not process_alive(child), SETTLE_SECONDS), (
            f"the child outlived the Ctrl-C; driver stderr:\n{driver.stderr.read()[-2000:]}"
            if driver.poll() is not None else "the child is still running")
        driver.wait(SETTLE_SECONDS)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
