#!/usr/bin/env python3
"""A real Kubernetes control plane on loopback, without Docker, for the e2e tests.

etcd, kube-apiserver (RBAC on), kube-controller-manager, kube-scheduler and kwok (fake GPU
nodes, pod lifecycles from hack/kwok/stages.yaml) run as plain processes built by
hack/build-control-plane.sh. Every port is on 127.0.0.1.

With `real_node=True` (CLI: `--real-node`) one real node joins the fake ones: kubelet,
containerd, a CNI bridge, kube-proxy and CoreDNS (hack/realnode.py). Pods on it must reach
the apiserver, so the apiserver then listens on the host's address instead of loopback and
the `kubernetes` Service points at it. Needs root.

As a module (tests import it by path)::

    cluster = up(workdir)            # -> Cluster, ready to use
    cluster.kubectl("get", "nodes")
    down(workdir)                    # stops what up() started, by process id

As a command::

    python hack/cluster.py up --workdir DIR     # prints the kubeconfig path once ready
    python hack/cluster.py up --workdir DIR --real-node
    python hack/cluster.py down --workdir DIR

Only the standard library, cryptography and pyyaml.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import realnode  # hack/realnode.py: this file's directory is on sys.path (script or tests)
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HACK_DIR = Path(__file__).resolve().parent
BUILD_SCRIPT = HACK_DIR / "build-control-plane.sh"
STAGES_FILE = HACK_DIR / "kwok" / "stages.yaml"
NODES_FILE = HACK_DIR / "nodes.yaml"

BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
    "kubelet",
    "kube-proxy",
    "coredns",
)
BIN_DIR_ENV = "KUBETUNE_CONTROLPLANE_BIN"

LOOPBACK = "127.0.0.1"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"  # first IP of SERVICE_CIDR: the `kubernetes` Service
POD_CIDR = "10.244.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node=fake"
FRONT_PROXY_CLIENT = "front-proxy-client"
STATE_FILE = "cluster.json"

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or used."""


class ControlPlaneUnavailable(ControlPlaneError):
    """This machine cannot provide the binaries (no Go toolchain and nothing cached)."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl/helm call whose message includes what the tool printed."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}\nstdout: {self.stdout}"


# --------------------------------------------------------------------------- binaries


def expected_bin_dir() -> Path | None:
    """The cache directory the build script would use, read from the script itself.

    The script refuses to run without `go`, even when everything is cached, so this lets a
    machine without Go use binaries built earlier (e.g. a CI cache).
    """
    text = BUILD_SCRIPT.read_text()
    versions = dict(re.findall(r"^(K8S_VERSION|KWOK_VERSION|HELM_VERSION)=(\S+)$", text, re.M))
    if len(versions) != 3:
        return None
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache_root = Path(os.environ.get("KUBETUNE_CACHE") or Path(cache_home) / "kubetune")
    name = (
        f"controlplane-k8s{versions['K8S_VERSION']}-kwok{versions['KWOK_VERSION']}"
        f"-helm{versions['HELM_VERSION']}"
    )
    return cache_root / name / "bin"


def missing_binaries(bin_dir: Path) -> list[str]:
    return [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]


def unavailable_reason() -> str | None:
    """Why the control plane cannot be had on this machine, or None when it can."""
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        missing = missing_binaries(Path(override))
        return f"{BIN_DIR_ENV}={override} lacks {', '.join(missing)}" if missing else None
    cached = expected_bin_dir()
    if cached is not None and not missing_binaries(cached):
        return None
    if shutil.which("go") is None:
        return (
            "go is not installed and the control-plane binaries are not cached in "
            f"{cached}: install Go >= 1.26 (and reach the Go module proxy) or set {BIN_DIR_ENV}"
        )
    return None


def find_bin_dir() -> Path:
    """The directory holding the binaries; builds them (once, cached) when needed."""
    reason = unavailable_reason()
    if reason is not None:
        raise ControlPlaneUnavailable(reason)
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        return Path(override)
    cached = expected_bin_dir()
    if cached is not None and not missing_binaries(cached):
        return cached
    # stderr is not captured so a first, long build shows its progress.
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}")
    bin_dir = Path(lines[-1])
    missing = missing_binaries(bin_dir)
    if missing:
        raise ControlPlaneError(f"{BUILD_SCRIPT} left {bin_dir} without {', '.join(missing)}")
    return bin_dir


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    apiserver_cert: Path
    apiserver_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path
    front_proxy_ca_cert: Path
    front_proxy_client_cert: Path
    front_proxy_client_key: Path


@dataclass(frozen=True)
class _Ca:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: _Ca,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # Backdated a little so clock skew between processes never makes it "not yet valid".
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(_pem_key(key))
    path.chmod(0o600)


def _new_ca(common_name: str, cert_path: Path) -> _Ca:
    ca = _Ca(
        name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
        key=ec.generate_private_key(ec.SECP256R1()),
    )
    public_key = ca.key.public_key()
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (_key_usage(ca=True), True),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
    ]
    cert_path.write_bytes(_sign(ca.name, public_key, ca, extensions))
    return ca


def _issue(
    ca: _Ca,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    cert_path: Path,
    key_path: Path,
    sans: Sequence[x509.GeneralName] = (),
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(ca=False), True),
        (x509.ExtendedKeyUsage([usage]), False),
    ]
    if sans:
        extensions.append((x509.SubjectAlternativeName(sans), False))
    cert_path.write_bytes(_sign(subject, key.public_key(), ca, extensions))
    _write_key(key_path, key)


def _common_name(name: str, organization: str | None = None) -> x509.Name:
    attributes = (
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)] if organization else []
    )
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, name)])


def generate_pki(pki_dir: Path, extra_ips: Sequence[str] = ()) -> Pki:
    """Fresh CAs and certificates for one control plane.

    ECDSA P-256 for the certificates (fast to generate); RSA for the service-account key,
    the usual choice for signing tokens. The front-proxy CA backs the apiserver's
    requestheader authentication, which the controller-manager and scheduler look up.
    """
    pki_dir.mkdir(parents=True, exist_ok=True)
    pki = Pki(
        ca_cert=pki_dir / "ca.crt",
        apiserver_cert=pki_dir / "apiserver.crt",
        apiserver_key=pki_dir / "apiserver.key",
        admin_cert=pki_dir / "admin.crt",
        admin_key=pki_dir / "admin.key",
        sa_key=pki_dir / "sa.key",
        sa_pub=pki_dir / "sa.pub",
        front_proxy_ca_cert=pki_dir / "front-proxy-ca.crt",
        front_proxy_client_cert=pki_dir / "front-proxy-client.crt",
        front_proxy_client_key=pki_dir / "front-proxy-client.key",
    )
    ca = _new_ca("kubetune-e2e-ca", pki.ca_cert)
    _issue(
        ca,
        _common_name("kube-apiserver"),
        ExtendedKeyUsageOID.SERVER_AUTH,
        pki.apiserver_cert,
        pki.apiserver_key,
        sans=[
            x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
            x509.IPAddress(ipaddress.ip_address(KUBERNETES_SERVICE_IP)),
            *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips),
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes"),
            x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local"),
        ],
    )
    # O=system:masters is bound to cluster-admin by the default RBAC policy.
    _issue(
        ca,
        _common_name("kubernetes-admin", organization="system:masters"),
        ExtendedKeyUsageOID.CLIENT_AUTH,
        pki.admin_cert,
        pki.admin_key,
    )
    front_proxy_ca = _new_ca("kubetune-e2e-front-proxy-ca", pki.front_proxy_ca_cert)
    _issue(
        front_proxy_ca,
        _common_name(FRONT_PROXY_CLIENT),
        ExtendedKeyUsageOID.CLIENT_AUTH,
        pki.front_proxy_client_cert,
        pki.front_proxy_client_key,
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def write_kubeconfig(path: Path, server: str, pki: Pki) -> None:
    """An admin kubeconfig with the credentials inlined, so it can be copied anywhere."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-e2e",
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": "kubetune-e2e-admin",
                "user": {
                    "client-certificate-data": b64(pki.admin_cert),
                    "client-key-data": b64(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {
                "name": "kubetune-e2e",
                "context": {"cluster": "kubetune-e2e", "user": "kubetune-e2e-admin"},
            }
        ],
        "current-context": "kubetune-e2e",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    exe: str
    log: str


# Popen objects of the processes this Python process started: poll() them rather than
# signal 0, which also succeeds on an unreaped zombie.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _die_with_parent() -> None:
    """preexec_fn: have Linux kill the child if the parent dies (e.g. pytest killed -9).

    SIGKILL, not SIGTERM: every component gets the signal at once, and a gracefully
    terminating apiserver whose etcd is gone waits up to a minute for in-flight requests.
    """
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _start(
    name: str,
    argv: list[str],
    workdir: Path,
    *,
    die_with_parent: bool,
    env: dict[str, str] | None = None,
) -> ProcessRecord:
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            # Own session: a Ctrl-C on the terminal reaches pytest (which tears down in
            # order), not every component at once; the CLI's processes outlive it.
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
        )
    _CHILDREN[proc.pid] = proc
    record = ProcessRecord(name=name, pid=proc.pid, exe=argv[0], log=str(log_path))
    _add_to_state(workdir, record)
    return record


def _pid_is_ours(record: ProcessRecord) -> bool:
    """Guards against pid reuse: the pid must still run the binary we started."""
    proc_dir = Path("/proc") / str(record.pid)
    if not Path("/proc/self").exists():
        return True  # no procfs: trust the pid
    try:
        argv0 = (proc_dir / "cmdline").read_bytes().split(b"\0", 1)[0].decode()
        state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return argv0 == record.exe and state != "Z"


def _alive(record: ProcessRecord) -> bool:
    child = _CHILDREN.get(record.pid)
    if child is not None:
        return child.poll() is None
    return _pid_is_ours(record)


def _log_tail(record: ProcessRecord, lines: int = 40) -> str:
    try:
        text = Path(record.log).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _check_alive(records: Sequence[ProcessRecord]) -> None:
    for record in records:
        if not _alive(record):
            raise ControlPlaneError(
                f"{record.name} (pid {record.pid}) exited; last lines of {record.log}:\n"
                f"{_log_tail(record)}"
            )


def _stop(record: ProcessRecord, timeout: float) -> None:
    if not _alive(record):
        _CHILDREN.pop(record.pid, None)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(record):
            time.sleep(0.05)
        if not _alive(record):
            break
    child = _CHILDREN.pop(record.pid, None)
    if child is not None:
        child.wait(timeout=timeout)


def start_component(
    name: str, argv: list[str], workdir: Path, *, die_with_parent: bool
) -> ProcessRecord:
    """Start one more process beside a running control plane (e.g. hack/prometheus.py's),
    recorded in `workdir`'s state so that `down` stops it with the rest."""
    return _start(name, argv, workdir, die_with_parent=die_with_parent)


def stop_component(record: ProcessRecord, timeout: float = 15) -> None:
    _stop(record, timeout)


def check_alive(records: Sequence[ProcessRecord]) -> None:
    """Raise ControlPlaneError with its log tail if one of `records` has exited."""
    _check_alive(records)


def free_ports(count: int) -> list[int]:
    return _free_ports(count)


def http_ok(url: str) -> bool:
    """GET on a loopback health endpoint answers 200."""
    return _http_ok(url)


# --------------------------------------------------------------------------- state


def _state_path(workdir: Path) -> Path:
    return workdir / STATE_FILE


def _read_state(workdir: Path) -> dict[str, Any]:
    path = _state_path(workdir)
    if not path.exists():
        return {"processes": []}
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def _write_state(workdir: Path, state: dict[str, Any]) -> None:
    tmp = _state_path(workdir).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(_state_path(workdir))


def _add_to_state(workdir: Path, record: ProcessRecord) -> None:
    # Written after every start so that `down` can stop a half-started control plane.
    state = _read_state(workdir)
    state["processes"].append(record.__dict__)
    _write_state(workdir, state)


def _records(workdir: Path) -> list[ProcessRecord]:
    return [ProcessRecord(**p) for p in _read_state(workdir)["processes"]]


# --------------------------------------------------------------------------- waiting


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    check: Callable[[], None] | None = None,
) -> T:
    """Poll `condition` until it returns something truthy; return that.

    An error the condition raises (I/O, a failed kubectl, a key not there yet) counts as
    "not yet" and is reported if time runs out. `check` runs before each poll and may raise
    (e.g. when a component died) to stop early.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if check is not None:
            check()
        try:
            result = condition()
        except (OSError, subprocess.SubprocessError, ValueError, LookupError) as exc:
            result, last_error = None, exc
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _free_ports(count: int) -> list[int]:
    # All sockets stay open until every port is picked so the kernel never hands one out twice.
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]


class _Api:
    """Minimal authenticated GETs to the apiserver, for readiness polls (no kubectl spawn)."""

    def __init__(self, server: str, pki: Pki) -> None:
        self.server = server
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        # No proxy: a proxy from the environment must never see loopback traffic.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with self._opener.open(self.server + path, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str) -> Any | None:
        status, body = self.get(path)
        return json.loads(body) if status == 200 else None


def _http_ok(url: str) -> bool:
    """GET on a loopback health endpoint. The components' self-signed serving certs are not
    verified: the URL is a loopback port this process just chose."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _node_ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions", [])
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    # The node-lifecycle controller taints new nodes until it has seen them Ready; pods
    # without a toleration would not schedule until the taint is gone.
    taints = node.get("spec", {}).get("taints", [])
    lifecycle_taint = any(t["key"].startswith("node.kubernetes.io/") for t in taints)
    return ready and not lifecycle_taint


# --------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class Cluster:
    """A running control plane. All tools run from `bin_dir`, never from PATH."""

    workdir: Path
    bin_dir: Path
    kubeconfig: Path
    server: str

    @property
    def env(self) -> dict[str, str]:
        """Environment for a process that should talk to this cluster (kubectl, helm, kopf)."""
        home = self.workdir / "home"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            # Keep kubectl's discovery cache and helm's state out of the user's home.
            "KUBECACHEDIR": str(home / "kube-cache"),
            "HELM_CACHE_HOME": str(home / "helm-cache"),
            "HELM_CONFIG_HOME": str(home / "helm-config"),
            "HELM_DATA_HOME": str(home / "helm-data"),
        }

    def _run(
        self, tool: str, args: Sequence[str], input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / tool), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self._run("kubectl", args, input, check, timeout)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return self._run("helm", args, input, check, timeout)

    def apply(self, *manifests: dict[str, Any]) -> None:
        """Server-side apply of manifests given as dicts.

        Sent as JSON documents: PyYAML writes the string "1e-3" unquoted (a float in YAML 1.2
        only), which kubectl would read back as a number."""
        documents = "\n---\n".join(json.dumps(manifest) for manifest in manifests)
        self.kubectl("apply", "--server-side", "-f", "-", input=documents)

    def token_kubeconfig(self, service_account: str, namespace: str, path: Path) -> Path:
        """A kubeconfig that holds only a fresh token of `service_account` (how a pod of it
        would authenticate), for the same server and CA as the admin kubeconfig."""
        token = self.kubectl(
            "create", "token", service_account, "-n", namespace, "--duration=1h"
        ).stdout.strip()
        admin = yaml.safe_load(self.kubeconfig.read_text())
        server = admin["clusters"][0]["cluster"]
        ca = (
            server.get("certificate-authority-data")
            or base64.b64encode(Path(server["certificate-authority"]).read_bytes()).decode()
        )
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "e2e", "cluster": {"server": server["server"],
                                            "certificate-authority-data": ca}}
            ],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "e2e", "user": service_account}}],
            "current-context": "sa",
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object as a dict, or None when it does not exist."""
        ns_args = ["-n", namespace] if namespace else []
        result = self.kubectl(
            "get", kind, name, *ns_args, "-o", "json", "--ignore-not-found", check=True
        )
        return json.loads(result.stdout) if result.stdout.strip() else None

    def wait_for(
        self,
        kind: str,
        name: str,
        until: Callable[[dict[str, Any]], bool],
        *,
        namespace: str | None = None,
        timeout: float = 60,
        what: str = "",
    ) -> dict[str, Any]:
        """Poll the object until `until(obj)` holds; return it."""

        def satisfied() -> dict[str, Any] | None:
            obj = self.get(kind, name, namespace)
            return obj if obj is not None and until(obj) else None

        target = f"{kind}/{name}" + (f" in {namespace}" if namespace else "")
        return wait_for(satisfied, timeout=timeout, what=what or target, interval=0.25)


def _etcd_argv(bin_dir: Path, workdir: Path, client_port: int, peer_port: int) -> list[str]:
    client = f"http://{LOOPBACK}:{client_port}"
    peer = f"http://{LOOPBACK}:{peer_port}"
    return [
        str(bin_dir / "etcd"),
        "--name=node0",
        f"--data-dir={workdir / 'etcd-data'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=node0={peer}",
        # Throwaway data: durability costs time and buys nothing.
        "--unsafe-no-fsync=true",
        "--log-level=warn",
    ]


def _apiserver_argv(
    bin_dir: Path, workdir: Path, pki: Pki, etcd_port: int, port: int, address: str
) -> list[str]:
    """`address`: loopback, or the host's address when a real node's pods must reach it."""
    on_loopback = address == LOOPBACK
    return [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers=http://{LOOPBACK}:{etcd_port}",
        f"--bind-address={address}",
        # Without it a loopback-bound apiserver looks for a host interface with a default
        # route, which fails (or leaks a non-loopback IP) on isolated machines.
        f"--advertise-address={address}",
        f"--secure-port={port}",
        f"--cert-dir={workdir / 'apiserver-certs'}",
        f"--tls-cert-file={pki.apiserver_cert}",
        f"--tls-private-key-file={pki.apiserver_key}",
        f"--client-ca-file={pki.ca_cert}",
        "--authorization-mode=Node,RBAC",
        f"--requestheader-client-ca-file={pki.front_proxy_ca_cert}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client_cert}",
        f"--proxy-client-key-file={pki.front_proxy_client_key}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        # The default audience; TokenRequest still accepts any other audience and TokenReview
        # checks against the audiences the review asks for.
        f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # Logs and exec reach a real node's kubelet at its address: its name resolves nowhere.
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        "--allow-privileged=true",
        # On loopback: stops the apiserver writing a loopback address into the `kubernetes`
        # Endpoints. Otherwise pods reach it through that Service (kube-proxy on the node).
        f"--endpoint-reconciler-type={'none' if on_loopback else 'lease'}",
        "--profiling=false",
    ]


def _component_kubeconfig_args(kubeconfig: Path) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
    ]


def _controller_manager_argv(
    bin_dir: Path, workdir: Path, pki: Pki, kubeconfig: Path, port: int
) -> list[str]:
    return [
        str(bin_dir / "kube-controller-manager"),
        *_component_kubeconfig_args(kubeconfig),
        f"--bind-address={LOOPBACK}",
        f"--secure-port={port}",
        f"--cert-dir={workdir / 'kcm-certs'}",
        "--leader-elect=false",
        "--controllers=*",
        f"--root-ca-file={pki.ca_cert}",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
    ]


def _scheduler_argv(bin_dir: Path, workdir: Path, kubeconfig: Path, port: int) -> list[str]:
    return [
        str(bin_dir / "kube-scheduler"),
        *_component_kubeconfig_args(kubeconfig),
        f"--bind-address={LOOPBACK}",
        f"--secure-port={port}",
        f"--cert-dir={workdir / 'scheduler-certs'}",
        "--leader-elect=false",
    ]


def _kwok_argv(bin_dir: Path, kubeconfig: Path) -> list[str]:
    return [
        str(bin_dir / "kwok"),
        f"--kubeconfig={kubeconfig}",
        f"--config={STAGES_FILE}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}",
        f"--node-ip={LOOPBACK}",
        f"--cidr={POD_CIDR}",
        # With a Lease, node liveness does not depend on frequent status heartbeats.
        "--node-lease-duration-seconds=40",
    ]


def fake_nodes(real_node: bool) -> list[dict[str, Any]]:
    """kwok's nodes from hack/nodes.yaml. Beside a real node only the GPU ones: CPU pods must
    land on the node that runs them (a fake CPU node would win the scheduler's scoring)."""
    nodes = [doc for doc in yaml.safe_load_all(NODES_FILE.read_text()) if doc]
    if real_node:
        nodes = [n for n in nodes if n["metadata"]["labels"].get("nvidia.com/gpu.present")]
    return nodes


def _ensure_stopped(workdir: Path) -> None:
    running = [r for r in _records(workdir) if _alive(r)]
    if running:
        names = ", ".join(f"{r.name}={r.pid}" for r in running)
        raise ControlPlaneError(f"{workdir} already runs a control plane ({names}); stop it first")


def up(
    workdir: Path | str,
    *,
    bin_dir: Path | None = None,
    timeout: float = 120,
    die_with_parent: bool = False,
    real_node: bool = False,
) -> Cluster:
    """Start the control plane in `workdir` and return once nodes are Ready.

    die_with_parent: have the kernel stop the components when this process dies (for test
    fixtures); the CLI leaves it off so the components outlive `up`.
    real_node: also run a real node (hack/realnode.py); `timeout` then covers it too.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _ensure_stopped(workdir)
    if real_node:
        reason = realnode.unavailable_reason()
        if reason is not None:
            raise ControlPlaneUnavailable(reason)
    bin_dir = bin_dir or find_bin_dir()
    shutil.rmtree(workdir / "etcd-data", ignore_errors=True)  # always a fresh cluster
    _write_state(workdir, {"processes": [], "real_node": real_node})
    try:
        return _start_all(workdir, bin_dir, timeout, die_with_parent, real_node)
    except BaseException:
        down(workdir)
        raise


def _start_all(
    workdir: Path, bin_dir: Path, timeout: float, die_with_parent: bool, real_node: bool
) -> Cluster:
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        return max(deadline - time.monotonic(), 1.0)

    address = realnode.detect_node_ip() if real_node else LOOPBACK
    pki = generate_pki(workdir / "pki", extra_ips=[address] if real_node else [])
    etcd_port, etcd_peer_port, api_port, kcm_port, scheduler_port = _free_ports(5)
    server = f"https://{address}:{api_port}"
    kubeconfig = workdir / "admin.kubeconfig"
    write_kubeconfig(kubeconfig, server, pki)
    started: list[ProcessRecord] = []

    def check() -> None:
        _check_alive(started)

    def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        started.append(_start(name, argv, workdir, die_with_parent=die_with_parent, env=env))

    start("etcd", _etcd_argv(bin_dir, workdir, etcd_port, etcd_peer_port))
    start("kube-apiserver", _apiserver_argv(bin_dir, workdir, pki, etcd_port, api_port, address))
    api = _Api(server, pki)
    wait_for(lambda: api.get("/readyz")[0] == 200, timeout=remaining(), what="/readyz", check=check)

    start(
        "kube-controller-manager",
        _controller_manager_argv(bin_dir, workdir, pki, kubeconfig, kcm_port),
    )
    start("kube-scheduler", _scheduler_argv(bin_dir, workdir, kubeconfig, scheduler_port))
    # KWOK_WORKDIR: kwok would otherwise also load ~/.kwok/kwok.yaml if the user has one.
    start("kwok", _kwok_argv(bin_dir, kubeconfig), env={"KWOK_WORKDIR": str(workdir / "kwok")})

    cluster = Cluster(workdir=workdir, bin_dir=bin_dir, kubeconfig=kubeconfig, server=server)
    state = _read_state(workdir)
    state.update(server=server, kubeconfig=str(kubeconfig), bin_dir=str(bin_dir))
    _write_state(workdir, state)

    nodes = fake_nodes(real_node)
    cluster.kubectl("create", "-f", "-", input=yaml.safe_dump_all(nodes))
    names = [n["metadata"]["name"] for n in nodes]
    _wait_ready(api, scheduler_port, names, timeout=remaining(), check=check)
    if real_node:
        _start_real_node(workdir, bin_dir, kubeconfig, address, start, check, remaining())
        wait_for(
            lambda: any(
                n["metadata"]["name"] == realnode.NODE_NAME and _node_ready(n)
                for n in (api.get_json("/api/v1/nodes") or {}).get("items", [])
            ),
            timeout=remaining(),
            what=f"node {realnode.NODE_NAME} Ready",
            check=check,
        )
    return cluster


def _start_real_node(
    workdir: Path,
    bin_dir: Path,
    kubeconfig: Path,
    node_ip: str,
    start: Callable[[str, list[str]], None],
    check: Callable[[], None],
    timeout: float,
) -> None:
    layout = realnode.NodeLayout(workdir=workdir, cache=realnode.cache_dir())
    realnode.prepare_host(layout, node_ip, kubeconfig)
    start("containerd", realnode.containerd_argv(layout))
    wait_for(
        lambda: realnode.ctr(layout, "version", check=False).returncode == 0,
        timeout=timeout,
        what="containerd's socket",
        check=check,
    )
    realnode.import_image(layout, realnode.pause_archive(layout.cache), realnode.PAUSE_IMAGE)
    start("kubelet", realnode.kubelet_argv(bin_dir, layout, kubeconfig, node_ip))
    healthz_port, metrics_port = _free_ports(2)
    realnode.write_kube_proxy_config(layout, kubeconfig, healthz_port, metrics_port)
    start("kube-proxy", realnode.kube_proxy_argv(bin_dir, layout))
    start("coredns", realnode.coredns_argv(bin_dir, layout))


def _wait_ready(
    api: _Api,
    scheduler_port: int,
    names: list[str],
    *,
    timeout: float,
    check: Callable[[], None],
) -> None:
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        return max(deadline - time.monotonic(), 1.0)

    def nodes_ready() -> bool:
        nodes = api.get_json("/api/v1/nodes")
        ready = {n["metadata"]["name"] for n in (nodes or {}).get("items", []) if _node_ready(n)}
        return ready >= set(names)

    wait_for(nodes_ready, timeout=remaining(), what=f"nodes {names} Ready", check=check)
    # The ServiceAccount admission plugin rejects pods until the SA controller made `default`.
    wait_for(
        lambda: api.get_json("/api/v1/namespaces/default/serviceaccounts/default") is not None,
        timeout=remaining(),
        what="ServiceAccount default/default",
        check=check,
    )
    wait_for(
        lambda: _http_ok(f"https://{LOOPBACK}:{scheduler_port}/healthz"),
        timeout=remaining(),
        what="kube-scheduler /healthz",
        check=check,
    )


def load(workdir: Path | str) -> Cluster:
    """The Cluster that `up` (e.g. the CLI) started in `workdir`."""
    state = _read_state(Path(workdir).resolve())
    if "kubeconfig" not in state:
        raise ControlPlaneError(f"no control plane state in {workdir}")
    return Cluster(
        workdir=Path(workdir).resolve(),
        bin_dir=Path(state["bin_dir"]),
        kubeconfig=Path(state["kubeconfig"]),
        server=state["server"],
    )


def down(workdir: Path | str, *, timeout: float = 15) -> None:
    """Stop, in reverse start order, only the processes `up` recorded in `workdir`.

    With a real node: its containers are removed before containerd stops (their shims would
    outlive it), and the host is left as it was (mounts, bridge, iptables rules, cgroups).
    """
    workdir = Path(workdir).resolve()
    layout = realnode.NodeLayout(workdir=workdir, cache=realnode.cache_dir())
    for record in reversed(_records(workdir)):
        if record.name == "containerd" and _alive(record):
            realnode.remove_containers(layout)
        _stop(record, timeout)
    if _state_path(workdir).exists():
        state = _read_state(workdir)
        if state.get("real_node"):
            realnode.cleanup_host(layout)
        state["processes"] = []
        _write_state(workdir, state)


@contextlib.contextmanager
def running(workdir: Path | str, **kwargs: Any) -> Iterator[Cluster]:
    """`with running(dir) as cluster:` brings the control plane up and always down."""
    cluster = up(workdir, **kwargs)
    try:
        yield cluster
    finally:
        down(workdir)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="start; print the kubeconfig path when ready")
    up_parser.add_argument("--workdir", required=True, type=Path)
    up_parser.add_argument("--timeout", type=float, default=240, help="seconds (default 240)")
    up_parser.add_argument(
        "--real-node",
        action="store_true",
        help="also run a real node (kubelet + containerd, hack/realnode.py); needs root",
    )
    down_parser = commands.add_parser("down", help="stop what `up` started in --workdir")
    down_parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.command == "down":
        down(args.workdir)
        return 0
    started_at = time.monotonic()
    try:
        cluster = up(args.workdir, timeout=args.timeout, real_node=args.real_node)
    except (ControlPlaneUnavailable, realnode.NodeUnavailable) as exc:
        print(f"control plane unavailable: {exc}", file=sys.stderr)
        return 3
    except (ControlPlaneError, TimeoutError) as exc:
        print(f"control plane failed to start: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started_at
    print(f"control plane ready at {cluster.server} in {elapsed:.1f}s", file=sys.stderr)
    print(cluster.kubeconfig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
