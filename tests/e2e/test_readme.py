"""The README's cluster quickstart, run as written against the e2e control plane.

The commands are read from README.md (the first ```bash block under `## On a cluster`), not
copied here, so a README that names the wrong object or file fails this test. Every line runs
unchanged through bash, with `helm` and `kubectl` from the control plane's build, in a fresh
namespace set as the kubeconfig's current one (the README's commands use the current
namespace) and from the repository root (the README's paths are relative to it).

What the tier supplies that a real cluster would, before the first `kubectl wait` line:
- kwok pods run nothing, so the chart's operator Deployment is a stand-in: the operator runs
  here as a process with that Deployment's own arguments and its ServiceAccount's token
  (tests/e2e/test_chart.py's `operator_process`). It starts after the `kubectl apply` lines
  because the FineTuneJob must first carry the `kubetune.io/pod-metadata` annotation that
  tells kwok how the trainer and export pods end (the trainer's report as a termination
  message; see operator_harness.py): a real trainer would write that report.
- the control plane has no volume provisioner, so the artifact claim the operator creates is
  pre-bound to a PersistentVolume.
No line is skipped: a README line that is neither `helm` nor `kubectl` fails the test until it
is run or skipped here with its reason.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cluster import Cluster

from tests.e2e.operator_harness import REPORT, make_claim, pod_metadata, succeed
from tests.e2e.test_chart import Release, operator_process, service_account_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
HEADING = "## On a cluster"
# How long the README's `kubectl wait` may take here (its own --timeout is for real training):
# the fake trainer and exporter finish in seconds, the rest is the operator's reconciling on
# two shared cores.
WAIT_SECONDS = 240
# kwok's instructions for the trainer and export pods: both succeed, the trainer with a report
# that passes the quickstart's gate (accuracy 0.8 >= minAccuracy, and it beats the base).
FAKE_PODS = pod_metadata(train=succeed("2s", REPORT), export=succeed("1s"))


@dataclass(frozen=True)
class Command:
    """One command line of the README's block, as written."""

    line: str

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.line, comments=True)

    def option(self, *names: str) -> str | None:
        """The value of `--name value`, `--name=value` or `-n value` in the command."""
        argv = self.argv
        for index, arg in enumerate(argv):
            for name in names:
                if arg == name and index + 1 < len(argv):
                    return argv[index + 1]
                if arg.startswith(f"{name}="):
                    return arg.split("=", 1)[1]
        return None

    def is_(self, tool: str, verb: str) -> bool:
        return self.argv[:2] == [tool, verb]


def cluster_quickstart(readme: str) -> list[Command]:
    """The command lines of the first ```bash block under HEADING (comment lines dropped,
    backslash continuations joined). Pure."""
    _, found, after = readme.partition(f"\n{HEADING}\n")
    assert found, f"README.md has no `{HEADING}` heading"
    section = after.split("\n## ", 1)[0]
    _, fence, block = section.partition("```bash\n")
    assert fence, f"no ```bash block under `{HEADING}` in README.md"
    body = block.split("\n```", 1)[0]
    commands: list[Command] = []
    pending = ""
    for raw in body.splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            commands.append(Command(line))
    return commands


def applied_jobs(commands: list[Command]) -> list[str]:
    """Names of the FineTuneJobs the block's `kubectl apply -f FILE` lines create."""
    names = []
    for command in commands:
        manifest = command.option("-f", "--filename")
        if command.is_("kubectl", "apply") and manifest:
            for document in yaml.safe_load_all((ROOT / manifest).read_text()):
                if document and document.get("kind") == "FineTuneJob":
                    names.append(document["metadata"]["name"])
    return names


def user_kubeconfig(cluster: Cluster, namespace: str, path: Path) -> Path:
    """The admin kubeconfig with `namespace` as its current context's namespace."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    for context in config["contexts"]:
        if context["name"] == config["current-context"]:
            context["context"]["namespace"] = namespace
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def uninstalled_after(cluster: Cluster) -> Iterator[list[Release]]:
    """A list for the releases the block's `helm install` lines make; each is uninstalled,
    and its namespace deleted, afterwards."""
    releases: list[Release] = []
    try:
        yield releases
    finally:
        for release in releases:
            cluster.helm("uninstall", release.name, "-n", release.namespace, "--wait",
                         check=False)
            cluster.kubectl("delete", "namespace", release.namespace, "--wait=false",
                            "--ignore-not-found", check=False)


def test_the_readme_cluster_quickstart_runs_as_written(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    commands = cluster_quickstart(README.read_text())
    unrunnable = [c.line for c in commands if c.argv[0] not in ("helm", "kubectl")]
    assert unrunnable == [], f"README lines this tier cannot run (skip each, say why): {unrunnable}"
    assert any(c.is_("kubectl", "wait") for c in commands), "the block waits for nothing"
    jobs = applied_jobs(commands)
    assert jobs, "the block applies no FineTuneJob"
    for job in jobs:
        make_claim(cluster, namespace, claim=f"{job}-artifacts")
    env = {
        **cluster.env,
        "KUBECONFIG": str(user_kubeconfig(cluster, namespace, tmp_path / "kubeconfig")),
        "PATH": f"{cluster.bin_dir}:{cluster.env.get('PATH', '')}",
    }
    log = tmp_path / "operator.log"
    operator_started = False

    def run(command: Command) -> str:
        timeout = WAIT_SECONDS if command.is_("kubectl", "wait") else 180
        try:
            result = subprocess.run(["bash", "-c", command.line], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=timeout,
                                    check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            statuses = {job: (cluster.get("finetunejob", job, namespace) or {}).get("status")
                        for job in jobs}  # fmt: skip
            operator_log = log.read_text(errors="replace")[-6000:] if log.exists() else ""
            pytest.fail(f"README line `{command.line}` still running after {timeout}s; "
                        f"status: {json.dumps(statuses, indent=1)}\noperator log:\n"
                        f"{operator_log}")  # fmt: skip
        assert result.returncode == 0, (
            f"README line `{command.line}` failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
        return result.stdout

    outputs: dict[str, str] = {}
    with uninstalled_after(cluster) as releases, contextlib.ExitStack() as operator:
        for command in commands:
            if command.is_("kubectl", "wait") and not operator_started:
                # The stand-ins for a real cluster (see the module docstring).
                assert len(releases) == 1, f"one chart install before the wait: {releases}"
                for job in jobs:
                    cluster.kubectl("annotate", "finetunejob", job, "-n", namespace,
                                    f"kubetune.io/pod-metadata={FAKE_PODS}")
                kubeconfig = service_account_kubeconfig(
                    cluster, releases[0], tmp_path / "operator.kubeconfig"
                )
                operator.enter_context(operator_process(cluster, releases[0], kubeconfig, log))
                operator_started = True
            outputs[command.line] = run(command)
            if command.is_("helm", "install"):
                release_namespace = command.option("--namespace", "-n") or namespace
                releases.append(
                    Release(command.argv[2], release_namespace, (), outputs[command.line])
                )

    waits = [outputs[c.line] for c in commands if c.is_("kubectl", "wait")]
    for job in jobs:
        assert any(f"finetunejob.kubetune.io/{job} condition met" in out for out in waits), waits
    listings = [outputs[c.line] for c in commands if c.is_("kubectl", "get")]
    for job in jobs:
        assert all(job in listing for listing in listings), listings
