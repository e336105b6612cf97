"""A real node beside kwok's fake ones: kubelet + containerd + a CNI bridge + kube-proxy + DNS.

hack/cluster.py starts it with `up(..., real_node=True)` (CLI: `up --real-node`). What runs:

- containerd (Debian's package) with its own config, socket and state under the work
  directory; its image store lives in the cache directory so imported images survive a
  `down` (the trainer image is gigabytes; importing it again each run costs minutes).
- kubelet and kube-proxy (iptables mode), built by hack/build-control-plane.sh from the same
  Kubernetes module as the control plane; CoreDNS as a process on the node's IP, which the
  kubelet hands to pods as their cluster DNS.
- a CNI bridge `kt0` (10.88.0.0/16) whose gateway is the host, so pod IPs and Service
  ClusterIPs are reachable from the host.

This module holds the decisions (config files, argv) as pure functions and the host
preparation and clean-up; hack/cluster.py owns the processes. Needs root and Linux.

The settings this kind of machine needs, and why:
- cgroup v1 hierarchies are mounted: `failCgroupV1: false`, the cgroupfs driver and a
  cgroupRoot of our own (`/kubetune`) that `prepare_host` creates in every hierarchy.
- root lacks CAP_SYS_RESOURCE, so runc cannot lower a process's oom_score_adj:
  containerd's `restrict_oom_score_adj` (without it every sandbox fails with runc's
  "can't get final child's PID from pipe: EOF").
- the disk may be over 85% full: eviction and image garbage collection thresholds are
  absolute (1Gi) instead of the kubelet's percentages, which would evict the first pod and
  delete the images that cannot be pulled again.
- there is no image registry: the pod sandbox ("pause") image is a static binary built
  here with gcc and written as an OCI archive by `pause_archive`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

NODE_NAME = "kt-real"
NODE_LABEL = "kubetune.io/real-node"
BRIDGE = "kt0"
POD_CIDR = "10.88.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = "kubetune"
PAUSE_IMAGE = "localhost/kubetune-pause:1"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
APT_PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "conntrack": "conntrack",
    "ip": "iproute2",
}
# Chain-name prefixes of the rules the kubelet, kube-proxy and the CNI plugins add.
OWNED_CHAIN_PREFIXES = ("KUBE-", "CNI-")
# containerd 1.6's CRI plugin pins pod network namespaces here, whatever its state directory.
NETNS_DIR = Path("/var/run/netns")

PAUSE_SOURCE = r"""
/* The pod sandbox's process: hold the namespaces, reap orphans, exit on SIGTERM/SIGINT. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
    struct sigaction q = {0}, r = {0};
    q.sa_handler = quit; r.sa_handler = reap; r.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGINT, &q, NULL); sigaction(SIGTERM, &q, NULL); sigaction(SIGCHLD, &r, NULL);
    for (;;) pause();
}
"""


class NodeUnavailable(RuntimeError):
    """This machine cannot run a real node (not root, not Linux, a tool missing)."""


@dataclass(frozen=True)
class NodeLayout:
    """Where the node's files live: per run under `workdir`, images under `cache`."""

    workdir: Path
    cache: Path

    @property
    def root(self) -> Path:
        return self.workdir / "node"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd-state"

    @property
    def containerd_root(self) -> Path:
        # Persistent: the image store (see the module docstring).
        return self.cache / "containerd-root"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni"

    @property
    def cni_data_dir(self) -> Path:
        return self.root / "cni-ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet.yaml"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy.yaml"

    @property
    def corefile(self) -> Path:
        return self.root / "Corefile"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def state(self) -> Path:
        return self.root / "host-changes.json"


def cache_dir() -> Path:
    """The same cache root as hack/build-control-plane.sh."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("KUBETUNE_CACHE") or Path(cache_home) / "kubetune") / "node"


# --------------------------------------------------------------------------- decisions


def node_ip_from_route(route_get_output: str) -> str | None:
    """The source address of `ip -4 route get ...`: the host address pods can reach."""
    match = re.search(r"\bsrc (\d+\.\d+\.\d+\.\d+)", route_get_output)
    return match.group(1) if match else None


def containerd_config(layout: NodeLayout, cni_bin_dir: str) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{layout.containerd_root}"
state = "{layout.containerd_state}"
# Plugins that would otherwise write outside the work directory or the cache.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{layout.containerd_socket}"

# An image removed (hack/images.py import drops older builds of KubeTune's images) is
# collected at once. By default containerd collects only after 100 mutations or at start:
# the store, in the cache, had kept every trainer ever imported (25 GB: 5.7 GB unpacked each).
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: runc cannot set a negative oom_score_adj.
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [{cri}.cni]
    bin_dir = "{cni_bin_dir}"
    conf_dir = "{layout.cni_conf_dir}"
"""


def cni_config(layout: NodeLayout) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "kubetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                # A pod reaching a Service that load-balances back to itself.
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(layout.cni_data_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "loopback"},
        ],
    }


def kubelet_config(layout: NodeLayout, node_ip: str) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        # cgroup v1 is what this kind of machine mounts (see the module docstring).
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        # The apiserver reaches the kubelet for logs and exec with no client certificate.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [node_ip],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(layout.resolv_conf),
        "readOnlyPort": 0,
        "failSwapOn": False,
        # Absolute thresholds: the machine's disk may already be past the default 85%/10%.
        "evictionHard": {
            "nodefs.available": "1Gi",
            "imagefs.available": "1Gi",
            "memory.available": "200Mi",
        },
        # Never garbage-collect images: there is no registry to pull them from again.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "staticPodPath": "",
    }


def kube_proxy_config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict[str, object]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_CIDR,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # Leave the host's conntrack table sizes alone.
        "conntrack": {"maxPerCore": 0, "min": 0},
    }


def corefile(node_ip: str, kubeconfig: Path) -> str:
    # No `forward`: the machine has no upstream resolver worth asking; names outside the
    # cluster domain fail fast.
    return f""".:53 {{
    bind {node_ip}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""


def kubelet_argv(bin_dir: Path, layout: NodeLayout, kubeconfig: Path, node_ip: str) -> list[str]:
    return [
        str(bin_dir / "kubelet"),
        f"--config={layout.kubelet_config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={layout.kubelet_root}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={node_ip}",
        f"--node-labels={NODE_LABEL}=true",
        "--v=1",
    ]


def kube_proxy_argv(bin_dir: Path, layout: NodeLayout) -> list[str]:
    return [str(bin_dir / "kube-proxy"), f"--config={layout.kube_proxy_config}", "--v=1"]


def coredns_argv(bin_dir: Path, layout: NodeLayout) -> list[str]:
    return [str(bin_dir / "coredns"), "-conf", str(layout.corefile)]


def containerd_argv(layout: NodeLayout) -> list[str]:
    exe = shutil.which("containerd") or "containerd"
    return [exe, "--config", str(layout.containerd_config)]


def without_owned_rules(iptables_save: str) -> str:
    """`iptables-save` output less every chain, rule and jump of OWNED_CHAIN_PREFIXES.

    Applied with `iptables-restore`, this removes what the kubelet, kube-proxy and the CNI
    plugins added (KUBE-FIREWALL hooked into INPUT, kube-proxy's Service chains, the
    bridge plugin's masquerade chains), whichever of them ran and however they stopped.
    """
    kept = []
    for line in iptables_save.splitlines():
        if line.startswith(":") and line[1:].startswith(OWNED_CHAIN_PREFIXES):
            continue
        if line.startswith("-A "):
            fields = line.split()
            if fields[1].startswith(OWNED_CHAIN_PREFIXES):
                continue
            if any(
                flag in ("-j", "-g") and target.startswith(OWNED_CHAIN_PREFIXES)
                for flag, target in itertools.pairwise(fields)
            ):
                continue
        kept.append(line)
    return "\n".join(kept) + "\n"


# --------------------------------------------------------------------------- the host


def unavailable_reason() -> str | None:
    """Why this machine cannot run the real node, or None when it can."""
    if not Path("/proc/self").exists():
        return "a real node needs Linux"
    if os.geteuid() != 0:
        return "a real node needs root (containerd, the kubelet, iptables, cgroups)"
    missing = [tool for tool in APT_PACKAGES if shutil.which(tool) is None]
    if missing and shutil.which("apt-get") is None:
        return f"missing {', '.join(missing)} and no apt-get to install them"
    if shutil.which("gcc") is None:
        return "gcc is needed to build the pod sandbox (pause) binary"
    return None


def install_packages() -> None:
    """apt-get install what is missing: containerd, runc, the CNI plugins, iptables."""
    packages = sorted({pkg for tool, pkg in APT_PACKAGES.items() if shutil.which(tool) is None})
    if not any(Path(d, "bridge").exists() for d in CNI_BIN_DIRS):
        packages.append("containernetworking-plugins")
    if not packages:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        check=True,
        env=env,
    )


def cni_bin_dir() -> str:
    for directory in CNI_BIN_DIRS:
        if Path(directory, "bridge").exists():
            return directory
    raise NodeUnavailable(f"no CNI bridge plugin in {', '.join(CNI_BIN_DIRS)}")


def detect_node_ip() -> str:
    result = subprocess.run(
        ["ip", "-4", "route", "get", "192.0.2.255"], capture_output=True, text=True, check=False
    )
    address = node_ip_from_route(result.stdout)
    if address is None or address.startswith("127."):
        raise NodeUnavailable(
            f"no non-loopback IPv4 address with a route (ip route get: {result.stdout!r}"
            f" {result.stderr!r}); the kubelet refuses a loopback node IP"
        )
    return address


def _cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup hierarchies (v1 controllers and the v2 unified one)."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] in ("cgroup", "cgroup2"):
            mounts.append(Path(fields[1]))
    return mounts


def _prepare_cgroups() -> None:
    for hierarchy in _cgroup_hierarchies():
        ours = hierarchy / CGROUP_ROOT
        ours.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            # A v1 cpuset cgroup starts with no CPUs or memory nodes: nothing could run in it.
            for name in ("cpuset.cpus", "cpuset.mems"):
                (ours / name).write_text((hierarchy / name).read_text())
            (ours / "cgroup.clone_children").write_text("1")


def _remove_cgroups() -> None:
    for hierarchy in _cgroup_hierarchies():
        ours = hierarchy / CGROUP_ROOT
        if not ours.is_dir():
            continue
        # Children first; a cgroup directory is removed with rmdir even though it lists files.
        for directory in sorted(
            (p for p in ours.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            ours.rmdir()


def _set_sysctl(name: str, value: str, changes: dict[str, str]) -> None:
    path = Path("/proc/sys") / name.replace(".", "/")
    old = path.read_text().strip()
    if old != value:
        changes.setdefault(name, old)
        path.write_text(value)


def prepare_host(layout: NodeLayout, node_ip: str, kubeconfig: Path) -> None:
    """Packages, kernel settings, cgroups, the pause image and every config file."""
    install_packages()
    if shutil.which("modprobe"):  # kernels without module loading have them built in
        for module in ("overlay", "br_netfilter"):
            subprocess.run(["modprobe", module], capture_output=True, check=False)
    changes: dict[str, str] = {}
    # Pod -> ClusterIP -> pod traffic is routed by the host and seen by iptables on the bridge.
    _set_sysctl("net.ipv4.ip_forward", "1", changes)
    _set_sysctl("net.bridge.bridge-nf-call-iptables", "1", changes)
    layout.root.mkdir(parents=True, exist_ok=True)
    netns_before = sorted(p.name for p in NETNS_DIR.glob("*")) if NETNS_DIR.is_dir() else []
    layout.state.write_text(json.dumps({"sysctl": changes, "netns_before": netns_before}))
    _prepare_cgroups()

    for directory in (layout.containerd_state, layout.cni_conf_dir, layout.cni_data_dir,
                      layout.kubelet_root, layout.containerd_root):  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
    layout.containerd_config.write_text(containerd_config(layout, cni_bin_dir()))
    (layout.cni_conf_dir / "10-kubetune.conflist").write_text(
        json.dumps(cni_config(layout), indent=2)
    )
    layout.kubelet_config.write_text(json.dumps(kubelet_config(layout, node_ip), indent=2))
    layout.corefile.write_text(corefile(node_ip, kubeconfig))
    # Pods with dnsPolicy Default get this: the host's resolvers are not reachable from pods.
    layout.resolv_conf.write_text(f"nameserver {node_ip}\n")


def write_kube_proxy_config(
    layout: NodeLayout, kubeconfig: Path, healthz_port: int, metrics_port: int
) -> None:
    layout.kube_proxy_config.write_text(
        json.dumps(kube_proxy_config(kubeconfig, healthz_port, metrics_port), indent=2)
    )


# --------------------------------------------------------------------------- pause image


def _tar_bytes(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A reproducible tar of {path: (content, mode)} (mtime 0, root-owned)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), mode, 0
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def oci_archive(ref: str, binary: bytes, entrypoint: str) -> bytes:
    """An OCI image archive (`ctr images import` reads it) of one static binary.

    `ref` is recorded as the image's name (annotation org.opencontainers.image.ref.name with
    containerd's io.containerd.image.name), so the import needs no tagging.
    """
    layer_tar = _tar_bytes({entrypoint.lstrip("/"): (binary, 0o755)})
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": [entrypoint], "User": "65535:65535"},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()],
            },
        },
        sort_keys=True,
    ).encode()

    def descriptor(media_type: str, blob: bytes) -> dict[str, object]:
        return {
            "mediaType": media_type,
            "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
            "size": len(blob),
        }

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)],
        },
        sort_keys=True,
    ).encode()
    tag = ref.rsplit(":", 1)[1]
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    **descriptor("application/vnd.oci.image.manifest.v1+json", manifest),
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    blobs = {
        f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}": (blob, 0o644)
        for blob in (layer, config, manifest)
    }
    return _tar_bytes(
        {
            "oci-layout": (b'{"imageLayoutVersion":"1.0.0"}', 0o644),
            "index.json": (index, 0o644),
            **blobs,
        }
    )


def pause_archive(cache: Path) -> Path:
    """The pause image's OCI archive, built once per source (cached by its hash)."""
    digest = hashlib.sha256(PAUSE_SOURCE.encode()).hexdigest()[:12]
    archive = cache / f"pause-{digest}.tar"
    if archive.exists():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    build = cache / f"pause-{digest}-build"
    build.mkdir(exist_ok=True)
    (build / "pause.c").write_text(PAUSE_SOURCE)
    subprocess.run(
        ["gcc", "-static", "-Os", "-o", str(build / "pause"), str(build / "pause.c")],
        check=True,
        capture_output=True,
    )
    tmp = archive.with_suffix(".tmp")
    tmp.write_bytes(oci_archive(PAUSE_IMAGE, (build / "pause").read_bytes(), "/pause"))
    tmp.replace(archive)
    shutil.rmtree(build)
    return archive


def ctr(layout: NodeLayout, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ctr", "--address", str(layout.containerd_socket), "-n", "k8s.io", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
    )


def image_present(layout: NodeLayout, ref: str) -> bool:
    listed = ctr(layout, "images", "ls", "-q").stdout.split()
    return ref in listed


def import_image(layout: NodeLayout, archive: Path, ref: str) -> None:
    if not image_present(layout, ref):
        ctr(layout, "images", "import", str(archive))
    if not image_present(layout, ref):
        raise NodeUnavailable(f"importing {archive} did not create the image {ref}")


# --------------------------------------------------------------------------- clean-up


def remove_containers(layout: NodeLayout) -> None:
    """Stop every task and container in containerd's k8s.io namespace (with containerd up).

    Pod sandboxes' shims outlive containerd and keep their mounts; the kubelet, which would
    remove them, is stopped before this runs.
    """
    if not layout.containerd_socket.exists():
        return
    tasks = ctr(layout, "tasks", "ls", "-q", check=False).stdout.split()
    for task in tasks:
        ctr(layout, "tasks", "kill", "-s", "SIGKILL", task, check=False)
    deadline = time.monotonic() + 10
    for task in tasks:
        while ctr(layout, "tasks", "delete", task, check=False).returncode != 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    containers = ctr(layout, "containers", "ls", "-q", check=False).stdout.split()
    if containers:
        ctr(layout, "containers", "delete", *containers, check=False)


def _unmount_under(prefix: Path) -> None:
    # Deepest first; lazily, so a mount still busy for a moment does not stop the rest.
    targets = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == str(prefix) or target.startswith(f"{prefix}/"):
            targets.append(target)
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def _remove_iptables_rules() -> None:
    for save, restore in (("iptables-save", "iptables-restore"),
                          ("ip6tables-save", "ip6tables-restore")):  # fmt: skip
        if shutil.which(save) is None:
            continue
        current = subprocess.run([save], capture_output=True, text=True, check=False).stdout
        if not any(prefix in current for prefix in OWNED_CHAIN_PREFIXES):
            continue
        subprocess.run(
            [restore], input=without_owned_rules(current), text=True, check=True,
            capture_output=True,
        )  # fmt: skip


def _remove_network_namespaces(existing_before: set[str]) -> None:
    """The pod network namespaces the CRI plugin made during this run (their veths go too)."""
    if not NETNS_DIR.is_dir():
        return
    for path in NETNS_DIR.glob("cni-*"):
        if path.name not in existing_before:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
            with contextlib.suppress(OSError):
                path.unlink()


def leftovers(layout: NodeLayout) -> list[str]:
    """What a stopped node left on the host (empty after a clean `down`)."""
    found = []
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    found += [f"mount {m.split()[1]}" for m in mounts if m.split()[1].startswith(str(layout.root))]
    if Path("/sys/class/net", BRIDGE).exists():
        found.append(f"link {BRIDGE}")
    for save in ("iptables-save", "ip6tables-save"):
        if shutil.which(save):
            rules = subprocess.run([save], capture_output=True, text=True, check=False).stdout
            chains = [
                line.split()[0][1:]
                for line in rules.splitlines()
                if line.startswith(":") and line[1:].startswith(OWNED_CHAIN_PREFIXES)
            ]
            found += [f"{save} chain {chain}" for chain in chains]
    found += [
        f"cgroup {h / CGROUP_ROOT}" for h in _cgroup_hierarchies() if (h / CGROUP_ROOT).exists()
    ]
    return found


def _kill_orphans(layout: NodeLayout) -> None:
    """What outlives a node whose containerd was killed rather than stopped (a test session
    killed with SIGKILL): containerd's shims for our socket and the containers' processes
    in our cgroups. `remove_containers` needs a live containerd; this does not."""
    socket = str(layout.containerd_socket)
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in argv:
                os.kill(int(proc.name), 9)
    for hierarchy in _cgroup_hierarchies():
        for procs in (hierarchy / CGROUP_ROOT).rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                for pid in procs.read_text().split():
                    os.kill(int(pid), 9)
    time.sleep(0.5)


def cleanup_host(layout: NodeLayout) -> None:
    """Undo `prepare_host` and what the node's processes left (after they are stopped)."""
    _kill_orphans(layout)
    _unmount_under(layout.root)
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
    _remove_iptables_rules()
    _remove_cgroups()
    if layout.state.exists():
        state = json.loads(layout.state.read_text())
        _remove_network_namespaces(set(state.get("netns_before", [])))
        for name, old in state.get("sysctl", {}).items():
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / name.replace(".", "/")).write_text(old)
        layout.state.unlink()
    # host-local IPAM's leases and containerd's state belong to this run only.
    shutil.rmtree(layout.cni_data_dir, ignore_errors=True)
    shutil.rmtree(layout.containerd_state, ignore_errors=True)
