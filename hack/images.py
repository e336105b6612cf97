#!/usr/bin/env python3
"""KubeTune's two OCI images without a Docker engine: buildah builds the Dockerfiles on a
Debian base that debootstrap makes, and each image is cached as an OCI archive named by a hash
of everything its build reads, so an unchanged image is never built twice.

    python hack/images.py build                      # last stdout line: JSON (see main)
    python hack/images.py import --address SOCKET    # build if needed, then `ctr images import`

The archives live in ${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}/images, the
cache hack/build-control-plane.sh uses; only the newest archive of each image is kept. The ref
inside an archive is the name the kubelet looks up for the image field `kubetune/NAME:TAG`:
`docker.io/kubetune/NAME:TAG`.

The base stands in for the Dockerfiles' default bases (python:3.11-slim, nvidia/cuda): Debian
bookworm from the mirror the host's apt uses, trusting the host's CAs, so the builds need
nothing but that mirror and the package index the host's pip reaches. The trainer is built
with TORCH_VARIANT=cpu (see IMAGES).

Needs root: buildah, debootstrap and containerd's socket. Only the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
# The suites the base's apt reads, from the host's sources for them.
SUITES = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
# python3-venv: both install scripts make a venv; ca-certificates: pip and apt over TLS.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Part of the base's hash, which covers data, not code: bump it when build_base() changes.
BASE_RECIPE = "1"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Runs in the base after debootstrap: the host's CAs (a TLS-intercepting proxy's among them)
# become trusted, updates from the same mirror are applied, apt's caches and logs go.
BASE_SETUP = """set -eu
update-ca-certificates
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old
"""
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    # pip in a venv trusts certifi's bundle, not the system's (which has the host's CAs).
    "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
}
# Left out of the build context and of the hash; .dockerignore says the same (a test checks).
IGNORED = ("__pycache__", "*.pyc", "*.egg-info")


@dataclass(frozen=True)
class Spec:
    """One image: its Dockerfile, the build arg that names its base, other build args."""

    name: str
    dockerfile: str
    base_arg: str
    build_args: dict[str, str] = field(default_factory=dict)


IMAGES = (
    Spec("operator", "operator/Dockerfile", "PYTHON_IMAGE"),
    # The real node has no GPU: leave out what torch installs but only GPUs use (~1.3 GB).
    Spec("trainer", "trainer-image/Dockerfile", "CUDA_IMAGE", {"TORCH_VARIANT": "cpu"}),
)


@dataclass(frozen=True)
class Built:
    ref: str
    archive: Path
    seconds: float | None  # None: taken from the cache

    def summary(self) -> dict[str, object]:
        return {"ref": self.ref, "archive": str(self.archive),
                "size_bytes": self.archive.stat().st_size,
                "build_seconds": None if self.seconds is None else round(self.seconds)}


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}/images (empty is unset)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("KUBETUNE_CACHE") or f"{cache_home}/kubetune") / "images"


# --------------------------------------------------------------------------- apt sources


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_apt_sources(text: str) -> list[AptSource]:
    """The `deb` entries of an apt sources file, deb822 (stanzas of Types/URIs/Suites/
    Components; `Enabled: no` skipped) or one-line (`deb [options] URI SUITE COMPONENT...`)."""
    sources = []
    for stanza in re.split(r"\n\s*\n", text):
        lines = [line for line in stanza.splitlines() if not line.lstrip().startswith("#")]
        fields = {}
        for line in lines:
            key, colon, value = line.partition(":")
            if colon and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", key):
                fields[key.lower()] = value.split()
        if "types" in fields:
            if "deb" in fields["types"] and fields.get("enabled") != ["no"]:
                sources += [AptSource(uri, tuple(fields.get("suites", [])),
                                      tuple(fields.get("components", [])))
                            for uri in fields.get("uris", [])]
            continue
        for line in lines:
            words = re.sub(r"\[[^]]*\]", " ", line).split()
            if len(words) >= 3 and words[0] == "deb":
                sources.append(AptSource(words[1], (words[2],), tuple(words[3:])))
    return sources


def host_apt_sources(etc: Path = Path("/etc/apt")) -> list[AptSource]:
    """What the host's apt reads (it ignores other names, e.g. `x.list.disabled`; so do we)."""
    parts = etc / "sources.list.d"
    files = [etc / "sources.list", *sorted(parts.glob("*.list")), *sorted(parts.glob("*.sources"))]
    return [source for path in files if path.is_file()
            for source in parse_apt_sources(path.read_text())]


def mirror_for(sources: Iterable[AptSource], suite: str) -> str:
    for source in sources:
        if suite in source.suites:
            return source.uri
    raise SystemExit(f"the host's apt has no source for {suite}: no Debian mirror to use")


def base_apt_sources(sources: Iterable[AptSource]) -> str:
    """The base's deb822 sources: the host's URIs for SUITES, so that a Dockerfile's
    `apt-get install` uses the host's mirror."""
    stanzas = []
    for source in sources:
        suites = [suite for suite in source.suites if suite in SUITES]
        if suites:
            stanzas.append(f"Types: deb\nURIs: {source.uri}\nSuites: {' '.join(suites)}\n"
                           f"Components: {' '.join(source.components) or 'main'}\n"
                           f"Signed-By: {DEBIAN_KEYRING}\n")
    return "\n".join(stanzas)


# --------------------------------------------------------------------------- hashes


def instructions(dockerfile_text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    result = []
    for line in re.sub(r"\\\n", " ", dockerfile_text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def copied_sources(dockerfile_text: str) -> list[str]:
    """The build-context paths a Dockerfile COPYs or ADDs (`COPY --from=stage` is no read of
    the context)."""
    sources = []
    for keyword, rest in instructions(dockerfile_text):
        words = rest.split()
        if keyword in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            sources += [word for word in words[:-1] if not word.startswith("--")]
    return sources


def ignored(relative: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in IGNORED)


def context_files(root: Path, sources: Iterable[str]) -> list[Path]:
    """Every file the build copies from `root`."""
    files: set[Path] = set()
    for source in sources:
        path = root / source
        if path.is_dir():
            files |= {p for p in path.rglob("*")
                      if p.is_file() and not ignored(p.relative_to(root))}
        elif path.is_file():
            files.add(path)
        else:
            raise SystemExit(f"the Dockerfile copies {source}, which does not exist")
    return sorted(files)


def image_hash(root: Path, dockerfile: str, build_args: dict[str, str]) -> str:
    """12 hex digits of a sha256 over the Dockerfile, .dockerignore, every file the Dockerfile
    copies (constraints and install script among them) and the build args (the base's ref
    among them, which carries the base's hash). pip's index settings are not inputs: the
    constraints pin every version."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode() + data)

    text = (root / dockerfile).read_text()
    add("Dockerfile", text.encode())
    if (root / ".dockerignore").exists():
        add(".dockerignore", (root / ".dockerignore").read_bytes())
    for path in context_files(root, copied_sources(text)):
        mode = "x" if os.access(path, os.X_OK) else "-"
        add(f"file {path.relative_to(root).as_posix()} {mode}", path.read_bytes())
    for name, value in sorted(build_args.items()):
        add(f"arg {name}", value.encode())
    return digest.hexdigest()[:12]


def base_hash(sources: Sequence[AptSource], certs: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for part in (BASE_RECIPE, SUITE, " ".join(BASE_PACKAGES), BASE_SETUP,
                 json.dumps(BASE_ENV, sort_keys=True), mirror_for(sources, SUITE),
                 base_apt_sources(sources)):
        digest.update(part.encode() + b"\0")
    for cert in certs:
        digest.update(cert.name.encode() + b"\0" + cert.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def pip_config(environ: dict[str, str]) -> str | None:
    """The host's PIP_* settings as a pip.conf, so that pip in a build reaches the index the
    host's pip does. Left out: values naming a host path (the build cannot read them; the base
    sets PIP_CERT itself) and PIP_NO_CACHE_DIR (builds have their own pip cache)."""
    settings = [f"{name[4:].lower().replace('_', '-')} = {value}"
                for name, value in sorted(environ.items())
                if name.startswith("PIP_") and name != "PIP_NO_CACHE_DIR"
                and not value.startswith("/")]
    return "[global]\n" + "\n".join(settings) + "\n" if settings else None


# --------------------------------------------------------------------------- buildah


def run(argv: Sequence[str | Path], *, capture: bool = False) -> str:
    """Run a command; what it prints goes to stderr (stdout is for the JSON) unless captured."""
    result = subprocess.run([str(arg) for arg in argv], check=True, text=True,
                            stdout=subprocess.PIPE if capture else sys.stderr)
    return result.stdout.strip() if capture else ""


def quiet(argv: Sequence[str]) -> bool:
    """Run a command whose output does not matter: did it succeed?"""
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          check=False).returncode == 0


BUILD_TOOLS = ("buildah", "debootstrap", "runc")
RUNTIME = "runc"
"""The OCI runtime buildah's RUN steps use, as the real node's containerd does. Debian's buildah
depends on crun or runc and apt picks crun on a machine without runc, but crun 1.8 refuses
hybrid cgroups ("cgroups in hybrid mode not supported"), which this kind of machine has."""


def ensure_tools() -> None:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit(f"{' and '.join(missing)} missing: installing needs root and apt-get")
        log(f"installing {', '.join(BUILD_TOOLS)} ({' and '.join(missing)} missing)")
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", *BUILD_TOOLS])
    # buildah reads its runtime from the environment, for `run` and `bud` alike.
    os.environ["BUILDAH_RUNTIME"] = shutil.which(RUNTIME) or RUNTIME


def image_size(ref: str) -> str:
    """Unpacked, as buildah counts it (e.g. `5.7 GB`)."""
    return run(["buildah", "images", "--format", "{{.Size}}", ref], capture=True)


def export(ref: str, archive: Path) -> None:
    """`buildah push` to an OCI archive holding `ref`, under a temporary name first: an
    interrupted push must not pass for a cached image."""
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    started = time.monotonic()
    run(["buildah", "push", "--quiet", ref, f"oci-archive:{partial}:{ref}"])
    partial.rename(archive)
    log(f"{archive.name}: {archive.stat().st_size / 2**20:.0f} MiB, "
        f"written in {time.monotonic() - started:.0f} s")


def prune(prefix: str, keep_archive: Path, keep_ref: str) -> None:
    """Drop the older archives and images of one name. Their build layers that the newest
    image shares stay in buildah's storage: that is the layer cache."""
    for old in keep_archive.parent.glob(f"{prefix}-*.tar"):
        if old != keep_archive:
            log(f"removing {old}")
            old.unlink()
    repository = keep_ref.rpartition(":")[0]
    images = json.loads(run(["buildah", "images", "--json"], capture=True) or "[]")
    for name in {name for image in images for name in image.get("names") or []}:
        # An old base may still be the parent of old layers: then it stays, quietly.
        if (name.rpartition(":")[0] == repository and name != keep_ref
                and quiet(["buildah", "rmi", name])):
            log(f"removed image {name}")


def build_base(images_dir: Path) -> Built:
    """Debian (minbase) with python3 and its venv module, the host's CAs and apt mirror."""
    sources = host_apt_sources()
    certs = sorted(HOST_CA_DIR.glob("*.crt"))
    tag = base_hash(sources, certs)
    ref = f"localhost/kubetune-base:{SUITE}-{tag}"
    archive = images_dir / f"base-{tag}.tar"
    have_image = quiet(["buildah", "inspect", "--type", "image", ref])
    if have_image and archive.exists():
        return Built(ref, archive, None)
    if have_image:
        export(ref, archive)
        return Built(ref, archive, None)
    if archive.exists():
        log(f"restoring {ref} from {archive}")
        image_id = run(["buildah", "pull", "--quiet", f"oci-archive:{archive}"], capture=True)
        run(["buildah", "tag", image_id.splitlines()[-1], ref])
        return Built(ref, archive, None)

    log(f"building {ref}")
    started = time.monotonic()
    container = run(["buildah", "from", "scratch"], capture=True)
    try:
        rootfs = Path(run(["buildah", "mount", container], capture=True))
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             SUITE, rootfs, mirror_for(sources, SUITE)])
        # A container's runtime provides /dev, /etc/hostname and /etc/resolv.conf: drop
        # debootstrap's device nodes and the copies of the host's files.
        for node in (rootfs / "dev").iterdir():
            shutil.rmtree(node) if node.is_dir() and not node.is_symlink() else node.unlink()
        (rootfs / "etc/hostname").unlink(missing_ok=True)
        (rootfs / "etc/resolv.conf").write_text("")
        for cert in certs:
            shutil.copy(cert, rootfs / "usr/local/share/ca-certificates" / cert.name)
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(base_apt_sources(sources))
        run(["buildah", "umount", container])
        run(["buildah", "run", "--network", "host", container, "--", "sh", "-c", BASE_SETUP])
        run(["buildah", "config", *(f"--env={k}={v}" for k, v in BASE_ENV.items()),
             "--cmd", '["python3"]', "--label", "org.opencontainers.image.title=kubetune-base",
             container])
        run(["buildah", "commit", "--quiet", "--rm", container, ref])
    except BaseException:
        quiet(["buildah", "rm", container])
        raise
    seconds = time.monotonic() - started
    log(f"{ref}: built in {seconds:.0f} s, {image_size(ref)}")
    export(ref, archive)
    prune("base", archive, ref)
    return Built(ref, archive, seconds)


def build_image(spec: Spec, base: Built, images_dir: Path) -> Built:
    build_args = {spec.base_arg: base.ref, **spec.build_args}
    tag = image_hash(ROOT, spec.dockerfile, build_args)
    ref = f"docker.io/kubetune/{spec.name}:{tag}"
    archive = images_dir / f"{spec.name}-{tag}.tar"
    if archive.exists():
        log(f"{ref}: cached in {archive}")
        return Built(ref, archive, None)

    log(f"building {ref}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as temp:
        # The host's pip settings reach pip as /etc/pip.conf, bind-mounted: a mount is not
        # committed, whereas `bud --env` lands in the image (and its --unsetenv unsets the
        # variable during the build too). A Dockerfile's ENV PIP_* still wins.
        volume = []
        config = pip_config(dict(os.environ))
        if config:
            (Path(temp) / "pip.conf").write_text(config)
            volume = ["--volume", f"{temp}/pip.conf:/etc/pip.conf:ro"]
        run(["buildah", "bud", "--network", "host", "--layers", "--force-rm",
             "--file", ROOT / spec.dockerfile, *volume,
             *(f"--build-arg={name}={value}" for name, value in build_args.items()),
             "--tag", ref, ROOT])
    seconds = time.monotonic() - started
    log(f"{ref}: built in {seconds:.0f} s, {image_size(ref)}")
    export(ref, archive)
    prune(spec.name, archive, ref)
    return Built(ref, archive, seconds)


@contextlib.contextmanager
def exclusive(images_dir: Path) -> Iterator[None]:
    """One build at a time per cache: `make test` starts a build in the background while the
    control plane compiles, and the real-node tier's import, arriving during it, waits for it
    and then finds the archives (instead of building the same images beside it)."""
    with open(images_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another build of these images is running: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_all() -> dict[str, Built]:
    images_dir = cache_dir()
    images_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(images_dir):
        ensure_tools()
        base = build_base(images_dir)
        built = {spec.name: build_image(spec, base, images_dir) for spec in IMAGES}
    return {**built, "base": base}


# --------------------------------------------------------------------------- containerd


def import_all(address: str, built: dict[str, Built]) -> None:
    """Import the operator and trainer into containerd's k8s.io namespace (the kubelet's),
    each unless an image of its ref is there already (same ref: same inputs)."""
    if shutil.which("ctr") is None:
        raise SystemExit("ctr (containerd's client) is not installed")
    ctr = ["ctr", "--address", address, "--namespace", "k8s.io"]
    for name, image in built.items():
        if name == "base":
            continue
        if image.ref in run([*ctr, "images", "ls", "--quiet"], capture=True).splitlines():
            log(f"{image.ref}: already in containerd")
            continue
        started = time.monotonic()
        # ctr keeps the archive's ref only when it starts with --base-name (else it names the
        # image import-DATE).
        run([*ctr, "images", "import", "--base-name", image.ref.rpartition(":")[0],
             image.archive])
        if image.ref not in run([*ctr, "images", "ls", "--quiet"], capture=True).splitlines():
            raise SystemExit(f"ctr imported {image.archive}, yet lists no {image.ref}")
        log(f"{image.ref}: imported in {time.monotonic() - started:.0f} s")
    # Older builds of the same images go: the node's image store is in the cache and
    # survives runs, and each trainer build would otherwise keep gigabytes there.
    listed = run([*ctr, "images", "ls", "--quiet"], capture=True).splitlines()
    stale = stale_refs(listed, [image.ref for name, image in built.items() if name != "base"])
    if stale:
        # --sync: the blobs and unpacked layers go now, not at some later collection.
        run([*ctr, "images", "rm", "--sync", *stale])
        log(f"removed from containerd: {', '.join(stale)}")


def stale_refs(listed: Iterable[str], current: Iterable[str]) -> list[str]:
    """Refs of the same repositories as `current` with another tag."""
    current = list(current)
    repositories = {ref.rpartition(":")[0] for ref in current}
    return sorted(
        ref for ref in listed if ref.rpartition(":")[0] in repositories and ref not in current
    )


def start_in_background() -> None:
    """`build` detached from the caller, its output in the cache's build.log: `make test`
    starts it before the control plane compiles, so the images' downloads (debootstrap, apt,
    pip) overlap that build instead of the real-node tier. Where this user cannot build them
    (not root), nothing starts: the tier is skipped there anyway."""
    if os.geteuid() != 0:
        log("not root: the images are not built in the background")
        return
    images_dir = cache_dir()
    images_dir.mkdir(parents=True, exist_ok=True)
    log_path = images_dir / "build.log"
    with open(log_path, "w") as output:
        subprocess.Popen(
            [sys.executable, __file__, "build"], stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    log(f"building in the background (log: {log_path})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    builder = commands.add_parser(
        "build", help="build the operator and trainer images, or reuse them"
    )
    builder.add_argument(
        "--background", action="store_true",
        help="start the build detached (log: build.log in the cache) and return at once",
    )  # fmt: skip
    importer = commands.add_parser("import", help="build if needed, then import into containerd")
    importer.add_argument("--address", required=True, help="containerd's socket")
    args = parser.parse_args(argv)

    if args.command == "build" and args.background:
        start_in_background()
        return
    built = build_all()
    if args.command == "import":
        import_all(args.address, built)
    # The last line of stdout, one object: {"operator": {"ref", "archive", "size_bytes",
    # "build_seconds" (null: cached)}, "trainer": {...}, "base": {...}}
    print(json.dumps({name: image.summary() for name, image in built.items()}))


if __name__ == "__main__":
    main()
