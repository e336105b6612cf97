"""`kubetune operator` flags and kopf settings: ServiceAccounts, scanning."""

from __future__ import annotations

import argparse

import pytest

from kubetune.operator import handlers
from kubetune.operator.main import add_operator_command, config_from_args


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_operator_command(parser.add_subparsers())
    return parser.parse_args(["operator", *argv])


def test_service_accounts_default_to_the_charts_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_TRAINER_SERVICE_ACCOUNT", "kubetune-trainer")
    monkeypatch.setenv("KUBETUNE_SERVING_SERVICE_ACCOUNT", "kubetune-serving")
    config = config_from_args(_parse())
    assert config.trainer_service_account == "kubetune-trainer"
    assert config.serving_service_account == "kubetune-serving"
    argv = ("--trainer-service-account", "t", "--serving-service-account", "s")
    flags = config_from_args(_parse(*argv))
    assert (flags.trainer_service_account, flags.serving_service_account) == ("t", "s")


def test_no_env_means_no_service_account(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_TRAINER_SERVICE_ACCOUNT", raising=False)
    monkeypatch.delenv("KUBETUNE_SERVING_SERVICE_ACCOUNT", raising=False)
    config = config_from_args(_parse())
    assert config.trainer_service_account == "" and config.serving_service_account == ""


@pytest.mark.parametrize(
    ("namespaces", "scanning"),
    [
        ([], False),  # all namespaces: nothing to match
        (["team-a", "team-b"], False),
        (["team-*"], True),
        (["team-?"], True),
        (["!kube-system"], True),
        (["team-a,team-b"], True),
    ],
)
def test_kopf_scans_only_for_namespace_globs(namespaces: list[str], scanning: bool) -> None:
    assert handlers.needs_scanning(namespaces) is scanning
    assert handlers.settings(namespaces=namespaces).scanning.disabled is not scanning
