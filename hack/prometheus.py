"""A real Prometheus for a hack/cluster.py control plane, configured from the chart's monitors.

No Prometheus Operator runs here (its CRDs are not installed), so its job is done by hand:
`scrape_configs` translates the ServiceMonitor and PodMonitor that `helm template` renders
(with `--api-versions monitoring.coreos.com/v1`) into Prometheus `scrape_configs` with the
`kubernetes_sd_configs` and relabelling the Prometheus Operator generates for those fields.
Only the fields the chart uses are translated; any other field is refused, naming it, so a
chart change cannot be silently dropped from what the real-node tier scrapes.

Debian's Prometheus (`/usr/bin/prometheus`, the package hack/install-promtool.sh installs) is
built without Kubernetes service discovery (its `kubernetes_sd_configs` is an unknown field),
so `Discovery` does that part: an HTTP service discovery endpoint on loopback that lists the
Endpoints, Services and Pods from the API server in the kubeconfig and answers the targets
with the `__meta_kubernetes_*` labels Prometheus' Kubernetes SD gives them (`endpoint_groups`,
`pod_groups`), and `served_by` points each translated job's Kubernetes SD at it
(`http_sd_configs`). The relabelling, the part the chart decides, stays the Operator's.

`start` runs Prometheus as one more component of the cluster's workdir: recorded in its
state, so `cluster.py down` stops it too, and killed with the test process
(die_with_parent) like the others.

It lives in hack/ beside cluster.py and realnode.py because it is cluster machinery: it uses
their process records, and a developer can run it against `cluster.py up` by hand.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cluster as controlplane
import yaml

MONITORING_API = "monitoring.coreos.com/v1"
PROMETHEUS_ENV = "KUBETUNE_PROMETHEUS"
DEBIAN_PROMETHEUS = "/usr/bin/prometheus"
LOOPBACK = "127.0.0.1"

# The fields of each monitor the translation knows (the chart's, today). Anything else in a
# rendered monitor raises UnsupportedMonitorField naming its path.
SERVICE_MONITOR_SPEC = {"namespaceSelector", "selector", "endpoints"}
POD_MONITOR_SPEC = {"namespaceSelector", "selector", "podMetricsEndpoints", "jobLabel"}
ENDPOINT_FIELDS = {"port", "path", "honorLabels", "interval", "scrapeTimeout"}
NAMESPACE_SELECTOR_FIELDS = {"matchNames", "any"}
SELECTOR_FIELDS = {"matchLabels"}
METADATA_FIELDS = {"name", "namespace", "labels", "annotations"}


class UnsupportedMonitorField(ValueError):
    """A rendered monitor uses a field this translation does not implement."""


class PrometheusUnavailable(RuntimeError):
    """No prometheus binary here."""


def _refuse_unknown(where: str, given: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise UnsupportedMonitorField(
            f"{where}.{unknown[0]} is not translated into a scrape config (hack/prometheus.py "
            f"knows {', '.join(sorted(known))}): translate it or keep it out of the chart"
        )


def sanitize_label_name(name: str) -> str:
    """A Kubernetes label key as Prometheus' service discovery writes it in
    `__meta_kubernetes_*_label_<name>`: every character outside [a-zA-Z0-9_] becomes `_`."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _namespaces(where: str, monitor: Mapping[str, Any]) -> dict[str, Any] | None:
    """The SD's `namespaces` for the monitor's namespaceSelector: its names, every namespace
    for `any: true`, and the monitor's own namespace when it has no selector."""
    selector = monitor["spec"].get("namespaceSelector") or {}
    _refuse_unknown(f"{where}.spec.namespaceSelector", selector, NAMESPACE_SELECTOR_FIELDS)
    if selector.get("any"):
        return None
    names = selector.get("matchNames") or [monitor["metadata"]["namespace"]]
    return {"names": list(names)}


def _selector_keeps(where: str, selector: Mapping[str, Any], role: str) -> list[dict[str, Any]]:
    """`keep` on each matchLabels pair: the label present and equal (as the Operator does)."""
    _refuse_unknown(f"{where}.spec.selector", selector, SELECTOR_FIELDS)
    keeps = []
    for key, value in sorted((selector.get("matchLabels") or {}).items()):
        label = sanitize_label_name(key)
        keeps.append({
            "action": "keep",
            "source_labels": [f"__meta_kubernetes_{role}_label_{label}",
                              f"__meta_kubernetes_{role}_labelpresent_{label}"],
            "regex": f"({re.escape(str(value))});true",
        })  # fmt: skip
    return keeps


def _scrape_job(
    job_name: str, endpoint: Mapping[str, Any], role: str, namespaces: dict[str, Any] | None,
    kubeconfig: Path, relabel_configs: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    sd: dict[str, Any] = {"role": role, "kubeconfig_file": str(kubeconfig)}
    if namespaces is not None:
        sd["namespaces"] = namespaces
    job: dict[str, Any] = {
        "job_name": job_name,
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "metrics_path": endpoint.get("path", "/metrics"),
        "kubernetes_sd_configs": [sd],
        "relabel_configs": relabel_configs,
    }
    if "interval" in endpoint:
        job["scrape_interval"] = endpoint["interval"]
    if "scrapeTimeout" in endpoint:
        job["scrape_timeout"] = endpoint["scrapeTimeout"]
    return job


def _monitor_parts(
    monitor: Mapping[str, Any], kind: str, spec_fields: Any, endpoints_key: str, role: str
) -> tuple[Any, list[dict[str, Any]], list[tuple[int, Mapping[str, Any], str]]]:
    """What a ServiceMonitor and a PodMonitor share: their fields checked, the namespaces,
    the selector's keep rules, and each endpoint with its index and port name."""
    meta, spec = monitor["metadata"], monitor["spec"]
    where = f"{kind} {meta['name']}"
    _refuse_unknown(f"{where}.spec", spec, spec_fields)
    namespaces = _namespaces(where, monitor)
    keeps = _selector_keeps(where, spec.get("selector") or {}, role)
    endpoints = []
    for index, endpoint in enumerate(spec[endpoints_key]):
        _refuse_unknown(f"{where}.spec.{endpoints_key}[{index}]", endpoint, ENDPOINT_FIELDS)
        if "port" not in endpoint:
            raise UnsupportedMonitorField(f"{where}.spec.{endpoints_key}[{index}] names no port")
        endpoints.append((index, endpoint, endpoint["port"]))
    return namespaces, keeps, endpoints


def _service_monitor(monitor: Mapping[str, Any], kubeconfig: Path) -> list[dict[str, Any]]:
    meta = monitor["metadata"]
    namespaces, keeps, endpoints = _monitor_parts(
        monitor, "ServiceMonitor", SERVICE_MONITOR_SPEC, "endpoints", "service"
    )
    jobs = []
    for index, endpoint, port in endpoints:
        target = ["__meta_kubernetes_endpoint_address_target_kind",
                  "__meta_kubernetes_endpoint_address_target_name"]  # fmt: skip
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            *keeps,
            {"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"],
             "regex": re.escape(port)},
            {"source_labels": target, "separator": ";", "regex": "Node;(.*)",
             "replacement": "${1}", "target_label": "node"},
            {"source_labels": target, "separator": ";", "regex": "Pod;(.*)",
             "replacement": "${1}", "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"],
             "target_label": "container"},
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"],
             "regex": "(Failed|Succeeded)"},
            # No jobLabel: `job` is the Service's name.
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job",
             "replacement": "${1}"},
            {"target_label": "endpoint", "replacement": port},
        ]  # fmt: skip
        jobs.append(_scrape_job(
            f"serviceMonitor/{meta['namespace']}/{meta['name']}/{index}", endpoint, "endpoints",
            namespaces, kubeconfig, relabel,
        ))  # fmt: skip
    return jobs


def _pod_monitor(monitor: Mapping[str, Any], kubeconfig: Path) -> list[dict[str, Any]]:
    meta, spec = monitor["metadata"], monitor["spec"]
    namespaces, keeps, endpoints = _monitor_parts(
        monitor, "PodMonitor", POD_MONITOR_SPEC, "podMetricsEndpoints", "pod"
    )
    jobs = []
    for index, endpoint, port in endpoints:
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"],
             "regex": "(Failed|Succeeded)"},
            *keeps,
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
             "regex": re.escape(port)},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"],
             "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
        ]  # fmt: skip
        if spec.get("jobLabel"):
            # The pod's label value replaces the default `job` where the pod has it.
            relabel.append({
                "source_labels": [f"__meta_kubernetes_pod_label_"
                                  f"{sanitize_label_name(spec['jobLabel'])}"],
                "target_label": "job", "regex": "(.+)", "replacement": "${1}",
            })  # fmt: skip
        relabel.append({"target_label": "endpoint", "replacement": port})
        jobs.append(_scrape_job(
            f"podMonitor/{meta['namespace']}/{meta['name']}/{index}", endpoint, "pod",
            namespaces, kubeconfig, relabel,
        ))  # fmt: skip
    return jobs


def scrape_configs(
    manifests: Iterable[Mapping[str, Any]], kubeconfig: Path
) -> list[dict[str, Any]]:
    """The scrape configs for every ServiceMonitor and PodMonitor in `manifests` (other kinds
    are ignored), discovering targets through the API server in `kubeconfig`. Pure."""
    configs: list[dict[str, Any]] = []
    for manifest in manifests:
        kind = manifest.get("kind")
        if kind not in ("ServiceMonitor", "PodMonitor"):
            continue
        if manifest.get("apiVersion") != MONITORING_API:
            raise UnsupportedMonitorField(
                f"{kind} {manifest['metadata']['name']}.apiVersion is "
                f"{manifest.get('apiVersion')!r}, not {MONITORING_API}"
            )
        _refuse_unknown(f"{kind} {manifest['metadata']['name']}", manifest,
                        {"apiVersion", "kind", "metadata", "spec"})  # fmt: skip
        _refuse_unknown(f"{kind} {manifest['metadata']['name']}.metadata",
                        manifest["metadata"], METADATA_FIELDS)  # fmt: skip
        translate = _service_monitor if kind == "ServiceMonitor" else _pod_monitor
        configs += translate(manifest, kubeconfig)
    return configs


def rule_groups(manifests: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A Prometheus rules file: the groups of every PrometheusRule in `manifests`."""
    groups: list[Any] = []
    for manifest in manifests:
        if manifest.get("kind") == "PrometheusRule":
            _refuse_unknown(f"PrometheusRule {manifest['metadata']['name']}.spec",
                            manifest["spec"], {"groups"})  # fmt: skip
            groups += manifest["spec"]["groups"]
    return {"groups": groups}


def config(
    scrape: Sequence[Mapping[str, Any]], rule_files: Sequence[Path], interval: str
) -> dict[str, Any]:
    """The whole prometheus.yml: scrapes and rule evaluation every `interval`. Pure."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": list(scrape),
    }


# --------------------------------------------------------------------------- discovery


def _object_labels(kind: str, obj: Mapping[str, Any]) -> dict[str, str]:
    """`__meta_kubernetes_<kind>_label_*` and `_labelpresent_*` of an object's labels."""
    found = {}
    for key, value in ((obj.get("metadata") or {}).get("labels") or {}).items():
        name = sanitize_label_name(key)
        found[f"__meta_kubernetes_{kind}_label_{name}"] = str(value)
        found[f"__meta_kubernetes_{kind}_labelpresent_{name}"] = "true"
    return found


def _pod_ready(pod: Mapping[str, Any]) -> str:
    conditions = (pod.get("status") or {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return "true" if ready else "false"


def _pod_meta(pod: Mapping[str, Any]) -> dict[str, str]:
    meta, status = pod["metadata"], pod.get("status") or {}
    found = {
        "__meta_kubernetes_namespace": meta["namespace"],
        "__meta_kubernetes_pod_name": meta["name"],
        "__meta_kubernetes_pod_ip": status.get("podIP", ""),
        "__meta_kubernetes_pod_node_name": (pod.get("spec") or {}).get("nodeName", ""),
        "__meta_kubernetes_pod_phase": status.get("phase", ""),
        "__meta_kubernetes_pod_ready": _pod_ready(pod),
        "__meta_kubernetes_pod_uid": meta.get("uid", ""),
        **_object_labels("pod", pod),
    }
    return found


def _container_port_meta(container: Mapping[str, Any], port: Mapping[str, Any]) -> dict[str, str]:
    return {
        "__meta_kubernetes_pod_container_name": container["name"],
        "__meta_kubernetes_pod_container_image": container.get("image", ""),
        "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
        "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
    }


def pod_groups(pods: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The `role: pod` targets: one per container port of every pod with an IP (a container
    without ports: one target at the pod's IP), as Prometheus' Kubernetes SD builds them.
    Pure."""
    groups = []
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            continue
        base = _pod_meta(pod)
        for container in (pod.get("spec") or {}).get("containers") or []:
            ports = container.get("ports") or []
            if not ports:
                labels = {**base, "__meta_kubernetes_pod_container_name": container["name"]}
                groups.append({"targets": [ip], "labels": labels})
            for port in ports:
                labels = {**base, **_container_port_meta(container, port)}
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    return groups


def endpoint_groups(
    endpoints: Iterable[Mapping[str, Any]],
    services: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The `role: endpoints` targets: one per address and port of every Endpoints object
    (ready and not ready ones), with its Service's and, for a pod address, the pod's labels.
    Pure."""
    by_service = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services}
    by_pod = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in pods}
    groups = []
    for endpoint in endpoints:
        meta = endpoint["metadata"]
        namespace = meta["namespace"]
        common = {
            "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_endpoints_name": meta["name"],
            **_object_labels("endpoints", endpoint),
        }
        service = by_service.get((namespace, meta["name"]))
        if service is not None:
            common["__meta_kubernetes_service_name"] = meta["name"]
            common.update(_object_labels("service", service))
        for subset in endpoint.get("subsets") or []:
            addresses = [(a, "true") for a in subset.get("addresses") or []] + [
                (a, "false") for a in subset.get("notReadyAddresses") or []
            ]
            for address, ready in addresses:
                for port in subset.get("ports") or []:
                    labels = {
                        **common,
                        "__meta_kubernetes_endpoint_port_name": port.get("name", ""),
                        "__meta_kubernetes_endpoint_port_protocol": port.get("protocol", "TCP"),
                        "__meta_kubernetes_endpoint_ready": ready,
                    }
                    ref = address.get("targetRef") or {}
                    if ref:
                        labels["__meta_kubernetes_endpoint_address_target_kind"] = ref["kind"]
                        labels["__meta_kubernetes_endpoint_address_target_name"] = ref["name"]
                    pod = by_pod.get((namespace, ref.get("name", ""))) if ref.get(
                        "kind") == "Pod" else None  # fmt: skip
                    if pod is not None:
                        labels.update(_pod_meta(pod))
                        for container in (pod.get("spec") or {}).get("containers") or []:
                            for container_port in container.get("ports") or []:
                                if container_port["containerPort"] == port["port"]:
                                    labels.update(_container_port_meta(container, container_port))
                    target = f"{address['ip']}:{port['port']}"
                    groups.append({"targets": [target], "labels": labels})
    return groups


def served_by(scrape: Sequence[Mapping[str, Any]], discovery_url: str) -> list[dict[str, Any]]:
    """`scrape` with each Kubernetes SD replaced by the same role and namespaces asked of
    `Discovery` at `discovery_url` over HTTP SD, refreshed every 2 s. Pure."""
    served = []
    for job in scrape:
        job = dict(job)
        http_sds = []
        for sd in job.pop("kubernetes_sd_configs"):
            query = {"role": sd["role"]}
            if "namespaces" in sd:
                query["namespaces"] = ",".join(sd["namespaces"]["names"])
            url = f"{discovery_url}/targets?{urllib.parse.urlencode(query)}"
            http_sds.append({"url": url, "refresh_interval": "2s"})
        served.append({**job, "http_sd_configs": http_sds})
    return served


class _KubeApi:
    """GETs to the API server with the kubeconfig's client certificate."""

    def __init__(self, kubeconfig: Path, scratch: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        self.server = cluster["server"]
        scratch.mkdir(parents=True, exist_ok=True)
        files = {}
        for key in ("certificate-authority", "client-certificate", "client-key"):
            if f"{key}-data" in {**cluster, **user}:
                path = scratch / key
                path.write_bytes(base64.b64decode({**cluster, **user}[f"{key}-data"]))
                path.chmod(0o600)
                files[key] = str(path)
            else:
                files[key] = {**cluster, **user}[key]
        context = ssl.create_default_context(cafile=files["certificate-authority"])
        context.load_cert_chain(files["client-certificate"], files["client-key"])
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

    def items(self, resource: str, namespaces: Sequence[str] | None) -> list[dict[str, Any]]:
        paths = ([f"/api/v1/namespaces/{ns}/{resource}" for ns in namespaces]
                 if namespaces is not None else [f"/api/v1/{resource}"])  # fmt: skip
        found: list[dict[str, Any]] = []
        for path in paths:
            with self._opener.open(self.server + path, timeout=10) as response:
                found += json.loads(response.read())["items"]
        return found


class Discovery:
    """Kubernetes service discovery over Prometheus' HTTP SD: `GET /targets?role=pod|endpoints
    [&namespaces=a,b]` lists from the API server on every call and answers target groups."""

    def __init__(self, kubeconfig: Path, scratch: Path) -> None:
        self.api = _KubeApi(kubeconfig, scratch)
        self.errors: list[str] = []
        discovery = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query)
                try:
                    body = json.dumps(discovery.targets(
                        query.get("role", [""])[0],
                        query["namespaces"][0].split(",") if "namespaces" in query else None,
                    )).encode()  # fmt: skip
                    code = 200
                except (OSError, ValueError, KeyError) as error:
                    discovery.errors.append(f"{self.path}: {error}")
                    body, code = json.dumps({"error": str(error)}).encode(), 500
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def targets(self, role: str, namespaces: Sequence[str] | None) -> list[dict[str, Any]]:
        if role == "pod":
            return pod_groups(self.api.items("pods", namespaces))
        if role == "endpoints":
            return endpoint_groups(
                self.api.items("endpoints", namespaces), self.api.items("services", namespaces),
                self.api.items("pods", namespaces),
            )  # fmt: skip
        raise ValueError(f"role {role!r} is not discovered (pod, endpoints)")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------- the process


def find_prometheus() -> str | None:
    """$KUBETUNE_PROMETHEUS, Debian's /usr/bin/prometheus, or `prometheus` on PATH."""
    override = os.environ.get(PROMETHEUS_ENV)
    if override:
        return override
    if os.access(DEBIAN_PROMETHEUS, os.X_OK):
        return DEBIAN_PROMETHEUS
    return shutil.which("prometheus")


@dataclass(frozen=True)
class Prometheus:
    url: str
    record: controlplane.ProcessRecord
    config_path: Path

    def get(self, path: str, **params: str | float) -> Any:
        """GET on the HTTP API; the `data` of a `success` answer, else ValueError with the
        error Prometheus gave."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.url}{path}{query}", timeout=30) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            answer = json.loads(error.read() or b"{}")
        if answer.get("status") != "success":
            raise ValueError(f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def log_tail(self, lines: int = 60) -> str:
        text = Path(self.record.log).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def start(
    workdir: Path, prometheus_config: Mapping[str, Any], *, die_with_parent: bool = True,
    timeout: float = 60,
) -> Prometheus:  # fmt: skip
    """Run Prometheus with `prometheus_config` on a free loopback port, its TSDB in
    `workdir`/prometheus; return once it is ready (its rule files loaded)."""
    binary = find_prometheus()
    if binary is None:
        raise PrometheusUnavailable(
            "prometheus not found: hack/install-promtool.sh installs Debian's prometheus "
            f"package (root, apt-get), or put its path in ${PROMETHEUS_ENV}"
        )
    home = workdir / "prometheus"
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(dict(prometheus_config), sort_keys=False))
    [port] = controlplane.free_ports(1)
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={home / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--storage.tsdb.retention.time=1d",
    ]
    record = controlplane.start_component(
        "prometheus", argv, workdir, die_with_parent=die_with_parent
    )
    running = Prometheus(url=f"http://{LOOPBACK}:{port}", record=record, config_path=config_path)
    controlplane.wait_for(
        lambda: controlplane.http_ok(f"{running.url}/-/ready"),
        timeout=timeout, what="prometheus /-/ready",
        check=lambda: controlplane.check_alive([record]),
    )  # fmt: skip
    return running


def stop(running: Prometheus, timeout: float = 15) -> None:
    controlplane.stop_component(running.record, timeout)
