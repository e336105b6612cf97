"""Fixtures the chart's monitoring tests share: promtool and the tier's helm."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.unit.deploy.test_chart import helm_binary

PROMTOOL_ENV = "KUBETUNE_PROMTOOL"


def find_promtool() -> str:
    """promtool from $KUBETUNE_PROMTOOL or PATH; fails the test, saying how to get it."""
    binary = os.environ.get(PROMTOOL_ENV) or shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "promtool not found, so the chart's alert rules and dashboards cannot be checked: "
            "run `make setup` (it installs Debian's prometheus package with apt-get, as root: "
            "hack/install-promtool.sh), or put promtool on PATH or in $" + PROMTOOL_ENV
        )
    return binary


@pytest.fixture(scope="module")
def promtool() -> str:
    return find_promtool()


@pytest.fixture(scope="module")
def chart_helm() -> str:
    """The tier's helm (skipped without it, as in test_chart.py)."""
    binary, reason = helm_binary()
    if binary is None:
        pytest.skip(reason)
    return binary
