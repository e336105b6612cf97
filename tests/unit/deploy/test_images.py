"""The container images without a Docker engine: the Dockerfiles' shape, the install scripts
they run (the operator one really runs, into a fresh virtual environment, from the files the
Dockerfile copies), the trainer pins against the package index, and the entry points.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
OPERATOR_DOCKERFILE = ROOT / "operator" / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer-image" / "Dockerfile"
INSTALL_OPERATOR = ROOT / "hack" / "image" / "install-operator.sh"
INSTALL_TRAINER = ROOT / "hack" / "image" / "install-trainer.sh"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
# The trainer image's interpreter (Ubuntu 24.04's python3) and platform.
TRAINER_PYTHON = "3.12"
TRAINER_PLATFORMS = [
    *(f"manylinux_2_{minor}_x86_64" for minor in (39, 35, 34, 31, 28, 27, 26, 24, 17)),
    "manylinux2014_x86_64",
    "linux_x86_64",
]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def base_images(dockerfile: Path) -> list[str]:
    """FROM images with ARG defaults substituted; build stages referenced by name dropped."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    images = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        elif keyword == "FROM":
            image, *alias = rest.split(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.strip())
            if image not in stages:
                images.append(image)
            if alias:
                stages.add(alias[0].strip())
    return images


def constraint(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", CONSTRAINTS.read_text(), re.M | re.I)
    assert match, f"{package} is not pinned in {CONSTRAINTS}"
    return match.group(1)


def _clean_env() -> dict[str, str]:
    """This environment without the dev venv's activation, so scripts pick their own Python."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def pypi_reachable() -> str | None:
    """None when pip can reach the package index, else why not."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "pip", "--timeout", "15"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except subprocess.TimeoutExpired:
        return "the package index did not answer within 60 s"
    if result.returncode == 0:
        return None
    return f"pip cannot reach the package index: {result.stderr}"


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize(
    "dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"]
)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    images = base_images(dockerfile)
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image
        assert re.search(r"\d+\.\d+", tag), f"{image}: tag names no version"


def test_operator_image_is_slim_python_3_11_with_the_operator_extra_only() -> None:
    assert all(image.startswith("python:3.11") and "slim" in image
               for image in base_images(OPERATOR_DOCKERFILE))
    script = INSTALL_OPERATOR.read_text()
    assert "[operator]" in script
    assert not re.search(r"\[(trainer|serve)", script)


def test_trainer_image_is_cuda_based_with_trainer_and_serve_extras() -> None:
    [image] = base_images(TRAINER_DOCKERFILE)
    assert image.startswith("nvidia/cuda:") and "ubuntu24.04" in image
    assert "trainer-image[trainer,serve]" in INSTALL_TRAINER.read_text()


@pytest.mark.parametrize(
    ("dockerfile", "user"), [(OPERATOR_DOCKERFILE, 65532), (TRAINER_DOCKERFILE, 1000)],
    ids=["operator", "trainer"],
)
def test_images_run_as_a_numeric_non_root_user(dockerfile: Path, user: int) -> None:
    users = [rest for keyword, rest in instructions(dockerfile) if keyword == "USER"]
    # The last USER wins; numeric so the kubelet can verify runAsNonRoot.
    assert users[-1].split(":")[0] == str(user)


def test_trainer_image_user_matches_the_operator_pod_security_context() -> None:
    from kubetune.builders.config import OperatorConfig

    assert OperatorConfig().run_as_user == 1000


@pytest.mark.parametrize(
    ("dockerfile", "script"),
    [(OPERATOR_DOCKERFILE, INSTALL_OPERATOR), (TRAINER_DOCKERFILE, INSTALL_TRAINER)],
    ids=["operator", "trainer"],
)
def test_dockerfile_installs_only_through_its_script(dockerfile: Path, script: Path) -> None:
    runs = [rest for keyword, rest in instructions(dockerfile) if keyword == "RUN"]
    relative = script.relative_to(ROOT).as_posix()
    assert any(f"bash {relative} /opt/kubetune" in run for run in runs)
    assert not any("pip install" in run for run in runs), "pip runs only inside the script"
    for keyword, rest in instructions(dockerfile):
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile} copies missing {source}"


@pytest.mark.parametrize("script", [INSTALL_OPERATOR, INSTALL_TRAINER], ids=["operator", "trainer"])
def test_install_scripts_are_valid_strict_bash(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    assert "set -euo pipefail" in script.read_text()
    assert "-c \"$source_dir/requirements/constraints.txt\"" in script.read_text() or (
        "constraints=$source_dir/requirements/constraints.txt" in script.read_text()
    )


# --------------------------------------------------------------------------- installs


def _copy_build_context(dockerfile: Path, target: Path) -> None:
    """What the Dockerfile's build stage COPYs, so the test sees what `docker build` sees."""
    for keyword, rest in instructions(dockerfile):
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, destination = rest.split()
        for source in sources:
            dest = target / (source if destination.endswith("/") or destination == "./"
                             else destination)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, dest, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.egg-info"))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, dest)


def test_operator_install_script_builds_a_working_venv_from_the_build_context(
    tmp_path: Path,
) -> None:
    reason = pypi_reachable()
    if reason:
        pytest.skip(reason)
    context = tmp_path / "src"
    _copy_build_context(OPERATOR_DOCKERFILE, context)
    venv = tmp_path / "venv"

    result = subprocess.run(
        ["bash", str(context / "hack/image/install-operator.sh"), str(venv), str(context)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**_clean_env(), "PYTHON": getattr(sys, "_base_executable", sys.executable)},
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # The image's ENTRYPOINT ["kubetune"] with CMD ["operator"].
    help_text = subprocess.run(
        [str(venv / "bin" / "kubetune"), "--help"], capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout
    assert "usage: kubetune" in help_text
    assert "operator" in help_text  # the image's CMD
    subprocess.run([str(venv / "bin" / "kubetune"), "operator", "--help"],
                   capture_output=True, timeout=60, check=True)
    # Slim: none of the data plane's heavy dependencies came along.
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    installed = {line.split()[0].lower() for line in listed.splitlines()[2:]}
    assert {"kopf", "kubernetes", "aiohttp", "pydantic"} <= installed
    assert not {"torch", "transformers", "deepspeed", "onnxruntime"} & installed
    # Only the control plane: the trainer's code is another distribution.
    assert "kubetune-trainer" not in installed
    no_trainer = subprocess.run([str(venv / "bin" / "python"), "-c", "import kubetune_trainer"],
                                capture_output=True, text=True, timeout=60, check=False)
    assert no_trainer.returncode != 0 and "No module named" in no_trainer.stderr
    versions = dict(line.split()[:2] for line in listed.splitlines()[2:])
    assert versions["kopf"] == constraint("kopf")


def test_trainer_pins_exist_for_the_image_python_and_platform() -> None:
    """Each pinned compiled trainer/serve dependency has a wheel for CPython 3.12 on manylinux
    x86-64 (pure-Python pins are the ones the dev venv installed from the same index;
    DeepSpeed is an sdist built in the image). Reads only the index pages: no downloads."""
    reason = pypi_reachable()
    if reason:
        pytest.skip(reason)
    wheels = ["torch", "bitsandbytes", "onnxruntime", "onnxruntime-genai", "onnxruntime-gpu",
              "onnxruntime-genai-cuda", "safetensors", "tokenizers", "matplotlib", "aiohttp"]
    platform_args = [arg for p in TRAINER_PLATFORMS for arg in ("--platform", p)]

    def available(package: str) -> tuple[str, str]:
        args = [sys.executable, "-m", "pip", "index", "versions", package]
        if package != "deepspeed":
            args += ["--python-version", TRAINER_PYTHON, "--implementation", "cp",
                     "--only-binary", ":all:", *platform_args]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
        return package, result.stdout + result.stderr

    with ThreadPoolExecutor(max_workers=4) as pool:
        listings = dict(pool.map(available, [*wheels, "deepspeed"]))
    missing = []
    for package, listing in listings.items():
        pin = constraint(package)
        versions = re.search(r"Available versions: (.*)", listing)
        if not versions or pin not in [v.strip() for v in versions.group(1).split(",")]:
            missing.append(f"{package}=={pin}: {listing.strip()[:200]}")
    assert missing == []


# --------------------------------------------------------------------------- entry points


def test_operator_entry_point_runs() -> None:
    kubetune = Path(sys.executable).parent / "kubetune"
    result = subprocess.run([str(kubetune), "--help"], capture_output=True, text=True,
                            timeout=60, check=True)
    assert "usage: kubetune" in result.stdout


def test_trainer_entry_point_dispatches_the_pod_commands() -> None:
    """The image's ENTRYPOINT is `python -m kubetune_trainer`; pods run its subcommands."""
    env = {**_clean_env(), "HF_HUB_OFFLINE": "1"}
    usage = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--help"],
                           capture_output=True, text=True, timeout=120, check=False, env=env)
    assert "usage: python -m kubetune_trainer" in usage.stdout + usage.stderr
    for command in ("train", "export", "serve"):
        assert command in usage.stdout + usage.stderr
    for command in ("train", "export", "serve"):
        result = subprocess.run([sys.executable, "-m", "kubetune_trainer", command, "--help"],
                                capture_output=True, text=True, timeout=300, check=False, env=env)
        assert result.returncode == 0, f"{command} --help: {result.stderr[-2000:]}"
        assert "usage:" in result.stdout
