"""hack/images.py (the Docker-free image build), hack/image/torch_cpu.py and
hack/image/trainer_requirements.py, without building:
the content hash that names the images, the Debian mirror read from apt's sources, the host's
pip settings, the trimming of torch's requirements for machines without a GPU, and ONNX
Runtime's builds per variant.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


images = load(ROOT / "hack" / "images.py")
torch_cpu = load(ROOT / "hack" / "image" / "torch_cpu.py")
trainer_requirements = load(ROOT / "hack" / "image" / "trainer_requirements.py")

# --------------------------------------------------------------------------- hash

DOCKERFILE = """\
ARG BASE=python:3.11
FROM ${BASE} AS build
COPY pyproject.toml README.md ./
COPY --chown=0:0 src src
COPY install.sh \\
     install.sh
RUN bash install.sh
FROM ${BASE}
COPY --from=build /opt /opt
"""


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    for name in ("pyproject.toml", "README.md", "install.sh", "unrelated.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    return tmp_path


def digest(root: Path, **build_args: str) -> str:
    return str(images.image_hash(root, "Dockerfile", {"BASE": "base:1", **build_args}))


def test_copied_sources_are_the_context_paths_the_dockerfile_reads() -> None:
    assert images.copied_sources(DOCKERFILE) == ["pyproject.toml", "README.md", "src",
                                                 "install.sh"]


def test_hash_is_stable_and_twelve_hex_digits(context: Path) -> None:
    first = digest(context)
    assert len(first) == 12 and int(first, 16) >= 0
    assert digest(context) == first


@pytest.mark.parametrize("path", ["src/pkg/mod.py", "install.sh", "README.md", "Dockerfile"])
def test_hash_changes_when_a_copied_file_or_the_dockerfile_changes(
    context: Path, path: str
) -> None:
    before = digest(context)
    (context / path).write_text((context / path).read_text() + "# changed\n")
    assert digest(context) != before


def test_hash_changes_when_a_copied_directory_gains_a_file_or_a_build_arg_changes(
    context: Path,
) -> None:
    before = digest(context)
    assert digest(context, TORCH_VARIANT="cpu") != before
    assert images.image_hash(context, "Dockerfile", {"BASE": "base:2"}) != before
    (context / "src" / "pkg" / "new.py").write_text("")
    assert digest(context) != before


def test_hash_ignores_what_the_build_does_not_copy(context: Path) -> None:
    before = digest(context)
    (context / "unrelated.txt").write_text("changed")
    (context / "src" / "pkg" / "__pycache__").mkdir()
    (context / "src" / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (context / "src" / "pkg.egg-info").mkdir()
    (context / "src" / "pkg.egg-info" / "PKG-INFO").write_text("x")
    assert digest(context) == before


def test_hash_refuses_a_dockerfile_that_copies_a_missing_path(context: Path) -> None:
    (context / "install.sh").unlink()
    with pytest.raises(SystemExit, match=r"install\.sh"):
        digest(context)


def test_the_real_images_hash_their_constraints_and_install_scripts() -> None:
    for spec, script in zip(images.IMAGES, ("install-operator.sh", "install-trainer.sh"),
                            strict=True):
        files = images.context_files(
            ROOT, images.copied_sources((ROOT / spec.dockerfile).read_text()))
        relative = {path.relative_to(ROOT).as_posix() for path in files}
        assert {"requirements/constraints.txt", f"hack/image/{script}"} <= relative
        assert not any("__pycache__" in path or ".egg-info" in path for path in relative)
    trainer = next(spec for spec in images.IMAGES if spec.name == "trainer")
    assert trainer.build_args == {"TORCH_VARIANT": "cpu"}  # the real node has no GPU


def test_dockerignore_leaves_out_what_the_hash_ignores() -> None:
    patterns = (ROOT / ".dockerignore").read_text().split()
    assert all(f"**/{pattern}" in patterns for pattern in images.IGNORED)


def test_trainer_dockerfile_defaults_to_the_cuda_variant() -> None:
    assert "ARG TORCH_VARIANT=cuda" in (ROOT / "trainer-image" / "Dockerfile").read_text()


# --------------------------------------------------------------------------- apt sources

DEB822 = """\
Types: deb
# a comment: http://old.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://source.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no
"""

ONE_LINE = """\
# deb http://commented.example/debian bookworm main
deb-src http://source.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian bookworm main
deb http://mirror.example/debian-security bookworm-security main
deb https://vendor.example/apt stable main
"""


def test_parses_deb822_sources() -> None:
    assert images.parse_apt_sources(DEB822) == [
        images.AptSource("http://mirror.example/debian", ("bookworm", "bookworm-updates"),
                         ("main", "contrib")),
        images.AptSource("http://mirror.example/debian-security", ("bookworm-security",),
                         ("main",)),
    ]


def test_parses_one_line_sources() -> None:
    sources = images.parse_apt_sources(ONE_LINE)
    assert sources[0] == images.AptSource("http://mirror.example/debian", ("bookworm",),
                                          ("main",))
    assert [source.uri for source in sources] == [
        "http://mirror.example/debian", "http://mirror.example/debian-security",
        "https://vendor.example/apt"]


@pytest.mark.parametrize("text", [DEB822, ONE_LINE], ids=["deb822", "one-line"])
def test_mirror_is_the_source_of_the_suite(text: str) -> None:
    sources = images.parse_apt_sources(text)
    assert images.mirror_for(sources, "bookworm") == "http://mirror.example/debian"
    assert images.mirror_for(sources, "bookworm-security") == (
        "http://mirror.example/debian-security")
    with pytest.raises(SystemExit, match="trixie"):
        images.mirror_for(sources, "trixie")


def test_base_sources_keep_the_hosts_debian_uris_only() -> None:
    text = images.base_apt_sources(images.parse_apt_sources(ONE_LINE))
    assert images.parse_apt_sources(text) == [
        images.AptSource("http://mirror.example/debian", ("bookworm",), ("main",)),
        images.AptSource("http://mirror.example/debian-security", ("bookworm-security",),
                         ("main",)),
    ]
    assert "vendor.example" not in text
    assert text.count(f"Signed-By: {images.DEBIAN_KEYRING}") == 2


def test_host_sources_skip_files_apt_ignores(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "other.list.disabled").write_text(ONE_LINE)
    assert [s.uri for s in images.host_apt_sources(tmp_path)] == [
        "http://mirror.example/debian", "http://mirror.example/debian-security"]


# --------------------------------------------------------------------------- pip settings


def test_pip_config_carries_the_hosts_pip_variables_but_not_host_paths() -> None:
    config = images.pip_config({
        "PIP_INDEX_URL": "https://index.example/simple", "PIP_DEFAULT_TIMEOUT": "180",
        "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt", "PIP_FIND_LINKS": "/opt/wheels",
        "PIP_NO_CACHE_DIR": "1", "HOME": "/root"})
    assert config == "[global]\ndefault-timeout = 180\nindex-url = https://index.example/simple\n"
    assert images.pip_config({"HOME": "/root"}) is None


def test_cache_dir_follows_build_control_plane(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_CACHE", "/c")
    assert images.cache_dir() == Path("/c/images")
    monkeypatch.setenv("KUBETUNE_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert images.cache_dir() == Path("/x/kubetune/images")


# --------------------------------------------------------------------------- torch_cpu

TORCH_METADATA = """\
Metadata-Version: 2.4
Name: torch
Version: 2.15.0
Requires-Dist: filelock
Requires-Dist: sympy>=1.13.3
Requires-Dist: cuda-toolkit[cublas,cudart,cusolver,nvtx]==13.2.2; platform_system == "Linux"
Requires-Dist: cuda-bindings<14,>=13.0.3; platform_system == "Linux" and python_version < "3.15"
Requires-Dist: nvidia-cudnn-cu13==9.26.0.51; platform_system == "Linux"
Requires-Dist: triton~=3.9.0; platform_system == "Linux" and python_version < "3.16"
Requires-Dist: optree>=0.13.0; extra == "optree"
Provides-Extra: optree

Requires-Dist: triton (this line is the long description, not a header)
"""


def test_cpu_metadata_drops_what_torch_does_not_link_against() -> None:
    text, requirements = torch_cpu.cpu_metadata(TORCH_METADATA)
    assert requirements == [
        "filelock",
        "sympy>=1.13.3",
        'cuda-toolkit[cublas,cudart,nvtx]==13.2.2; platform_system == "Linux"',
        'nvidia-cudnn-cu13==9.26.0.51; platform_system == "Linux"',
    ]
    headers, _, body = text.partition("\n\n")
    assert "triton~=" not in headers and "cuda-bindings" not in headers
    assert "cusolver" not in headers
    assert 'Requires-Dist: optree>=0.13.0; extra == "optree"' in headers  # kept, not printed
    assert body == "Requires-Dist: triton (this line is the long description, not a header)\n"


@pytest.mark.parametrize(("requirement", "expected"), [
    ("triton", None),
    ("Triton==3.9.0", None),
    ("cuda_bindings>=13", None),
    ("cuda-toolkit[cusolver]==13.2.2", "cuda-toolkit==13.2.2"),
    ("cuda-toolkit[cusolver,nvrtc] ==13.2.2", "cuda-toolkit[nvrtc] ==13.2.2"),
    ("cuda-toolkit[cublas]==13.2.2", "cuda-toolkit[cublas]==13.2.2"),
    ("nvidia-nccl-cu13==2.30.7", "nvidia-nccl-cu13==2.30.7"),
    ("jinja2", "jinja2"),
])
def test_cpu_requirement(requirement: str, expected: str | None) -> None:
    assert torch_cpu.cpu_requirement(requirement) == expected


def test_stale_refs_are_other_tags_of_the_current_repositories() -> None:
    listed = [
        "docker.io/kubetune/operator:aaa",
        "docker.io/kubetune/operator:bbb",
        "docker.io/kubetune/trainer:ccc",
        "localhost/kubetune-pause:1",
        "docker.io/library/other:aaa",
    ]
    current = ["docker.io/kubetune/operator:bbb", "docker.io/kubetune/trainer:ccc"]
    assert images.stale_refs(listed, current) == ["docker.io/kubetune/operator:aaa"]


def test_an_import_removes_older_builds_and_collects_them_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Without --sync containerd left the removed images' blobs and unpacked layers on disk
    # (the node's store reached 25 GB of old trainers).
    listed = ["docker.io/kubetune/operator:new", "docker.io/kubetune/operator:old",
              "docker.io/kubetune/trainer:new"]  # fmt: skip
    calls: list[list[str]] = []

    def fake_run(argv: list[str], *, capture: bool = False) -> str:
        calls.append([str(a) for a in argv])
        return "\n".join(listed) if capture else ""

    monkeypatch.setattr(images, "run", fake_run)
    monkeypatch.setattr(images.shutil, "which", lambda _: "/usr/bin/ctr")
    built = {name: images.Built(f"docker.io/kubetune/{name}:new", tmp_path / name, None)
             for name in ("operator", "trainer")}  # fmt: skip
    images.import_all("/run/containerd.sock", built)
    [removal] = [c for c in calls if "rm" in c]
    assert removal[-3:] == ["rm", "--sync", "docker.io/kubetune/operator:old"]


# --------------------------------------------------------------------------- one build at a time


def test_a_second_build_waits_for_the_one_running(tmp_path: Path) -> None:
    """`make test`'s background build and the real-node tier's import share the cache: the
    second to arrive waits for the first instead of building the same images beside it."""
    import threading

    order: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        with images.exclusive(tmp_path):
            order.append("first in")
            holding.set()
            release.wait(10)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(10)
    def second() -> None:
        with images.exclusive(tmp_path):
            order.append("second in")

    waiter = threading.Thread(target=second)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and order == ["first in"]
    release.set()
    thread.join(10)
    waiter.join(10)
    assert order == ["first in", "first out", "second in"]


def test_buildah_runs_steps_with_runc_not_crun(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's buildah pulls in crun on a machine without runc, and crun 1.8 refuses hybrid
    cgroups: the base's first RUN failed on a new machine. runc is installed with buildah and
    named as buildah's runtime."""
    monkeypatch.setattr(images.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.delenv("BUILDAH_RUNTIME", raising=False)
    images.ensure_tools()
    assert images.os.environ["BUILDAH_RUNTIME"] == "/usr/bin/runc"
    assert "runc" in images.BUILD_TOOLS


# --------------------------------------------------------------------------- trainer_requirements


def test_the_cuda_variant_installs_onnx_runtimes_cuda_builds_and_the_cpu_variant_its_cpu_ones(
) -> None:
    """A CUDA export needs CUDAExecutionProvider, which only the CUDA builds have (issue 28,
    item 13: the image installed the CPU builds for TORCH_VARIANT=cuda too)."""
    def names(variant: str) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower()
                for r in trainer_requirements.requirements(ROOT, variant)}

    cuda, cpu = names("cuda"), names("cpu")
    assert {"onnxruntime-gpu", "onnxruntime-genai-cuda"} <= cuda
    assert not {"onnxruntime", "onnxruntime-genai"} & cuda  # the same module: never both
    assert {"onnxruntime", "onnxruntime-genai"} <= cpu
    assert not {"onnxruntime-gpu", "onnxruntime-genai-cuda"} & cpu
    assert cuda - {"onnxruntime-gpu", "onnxruntime-genai-cuda"} == cpu - {
        "onnxruntime", "onnxruntime-genai"}
    assert not any(name.startswith("kubetune") for name in cuda | cpu)
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    for name in ("onnxruntime-gpu", "onnxruntime-genai-cuda"):
        assert re.search(rf"^{name}==\S+$", constraints, re.M), f"{name} is not pinned"


@pytest.mark.parametrize(
    ("requirement", "variant", "expected"),
    [
        ("onnxruntime>=1.20", "cuda", "onnxruntime-gpu>=1.20"),
        ("onnxruntime-genai>=0.7", "cuda", "onnxruntime-genai-cuda>=0.7"),
        ("onnxruntime_genai", "cuda", "onnxruntime-genai-cuda"),
        ("onnxruntime>=1.20", "cpu", "onnxruntime>=1.20"),
        ("onnx>=1.17", "cuda", "onnx>=1.17"),
        ("onnx-ir>=0.1", "cuda", "onnx-ir>=0.1"),
    ],
)
def test_for_variant(requirement: str, variant: str, expected: str) -> None:
    assert trainer_requirements.for_variant(requirement, variant) == expected


def test_the_install_script_takes_its_requirements_from_trainer_requirements() -> None:
    script = (ROOT / "hack" / "image" / "install-trainer.sh").read_text()
    assert 'hack/image/trainer_requirements.py" \\\n  "$source_dir" "$variant"' in script
    # The distributions' own requirements would bring the CPU builds back.
    assert '--no-deps "$source_dir" "$source_dir/trainer-image[trainer,serve]"' in script
