"""`kubetune operator`: run the operator (kopf) with its progress endpoint and a leader Lease.

Only the instance holding the Lease acts; a second instance waits for it (see `leader`).
kopf runs in standalone mode (no kopf peering CRDs): the Lease is the guard.

RBAC the operator needs, in every namespace it serves (a ClusterRole, or a Role per listed
namespace): the chart's `templates/_rbac.tpl` is the one list, pinned by
tests/unit/deploy/test_chart.py and proven on the real API server by tests/e2e/test_chart.py.
In short:
- kubetune.io finetunejobs: list, watch (kopf; the progress endpoint reads one by listing
  by name); finetunejobs/status: patch
- batch jobs, apps deployments, configmaps, services: list, watch, create, patch, delete
  (the progress endpoint reads a token's Job by listing by name, like the FineTuneJob)
- persistentvolumeclaims: get, list, watch, create, patch (never delete)
- pods: get, list, watch (status, termination messages, the progress token's pod)
- secrets: get, existence only (read as PartialObjectMetadata, never the data), and only in
  the Roles of watched namespaces; cluster-wide the chart grants none and passes
  `--no-check-secrets`
- events: create, list (posting transitions; a namespace's FailedAttachVolume Events while
  a pod waits for its volumes); authentication.k8s.io tokenreviews: create (always cluster-wide)
- coordination.k8s.io leases in the Lease namespace: create, and get/update of its own
- namespaces and customresourcedefinitions: list, watch, only with `--namespace` globs
  (kopf's scanning is off otherwise, see `handlers.needs_scanning`; the chart lists exact
  namespaces)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import uuid
from typing import TYPE_CHECKING, Any

from kubetune.builders.config import DEFAULT_SERVING_IMAGE, DEFAULT_TRAINER_IMAGE, OperatorConfig

if TYPE_CHECKING:  # the progress module needs aiohttp, which only the operator extra installs
    from kubetune.operator.progress.limits import ReviewLimits

log = logging.getLogger("kubetune.operator")


def add_operator_command(subparsers: Any) -> None:
    """Register `kubetune operator` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "operator", help="run the KubeTune operator against the current cluster"
    )
    parser.add_argument(
        "--namespace", "-n", action="append", default=[], dest="namespaces",
        help="watch this namespace (repeatable; globs allowed); default: all namespaces",
    )  # fmt: skip
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, $KUBECONFIG)")
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=8081,
        help="port of the liveness endpoint /healthz (0: none)",
    )
    parser.add_argument(
        "--progress-port",
        type=int,
        default=8080,
        help="port of the progress endpoint trainer pods report to",
    )
    parser.add_argument(
        "--progress-url",
        default=os.environ.get("KUBETUNE_PROGRESS_URL"),
        help="URL at which pods reach the progress port (default: "
        "http://kubetune-operator.<lease namespace>.svc:<progress port>)",
    )
    parser.add_argument(
        "--progress-min-interval",
        type=float,
        default=5.0,
        help="seconds between status patches of one job's progress",
    )
    # Defaults: kubetune.operator.progress.limits.ReviewLimits (None: its default).
    parser.add_argument(
        "--progress-source-review-rate",
        type=float,
        help="TokenReviews per second one source address earns at the progress endpoint "
        "(default 0.2; new tokens only: a verified or refused token is remembered)",
    )
    parser.add_argument(
        "--progress-source-review-burst",
        type=int,
        help="TokenReviews one source address may spend at once (default 5)",
    )
    parser.add_argument(
        "--progress-review-rate",
        type=float,
        help="TokenReviews per second from all sources together (default 5)",
    )
    parser.add_argument(
        "--progress-review-burst",
        type=int,
        help="TokenReviews all sources together may spend at once (default 20)",
    )
    parser.add_argument(
        "--progress-reviews-in-flight",
        type=int,
        help="TokenReviews sent at once, on a client of their own with as many connections "
        "(default 4)",
    )
    parser.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE)
    parser.add_argument("--serving-image", default=DEFAULT_SERVING_IMAGE)
    parser.add_argument(
        "--trainer-service-account",
        default=os.environ.get("KUBETUNE_TRAINER_SERVICE_ACCOUNT", ""),
        help="ServiceAccount of training and export pods, in the job's namespace "
        "(default: $KUBETUNE_TRAINER_SERVICE_ACCOUNT; empty: the namespace's default)",
    )
    parser.add_argument(
        "--serving-service-account",
        default=os.environ.get("KUBETUNE_SERVING_SERVICE_ACCOUNT", ""),
        help="ServiceAccount of inference pods, in the job's namespace "
        "(default: $KUBETUNE_SERVING_SERVICE_ACCOUNT; empty: the namespace's default)",
    )
    parser.add_argument(
        "--image-pull-policy", default="IfNotPresent", choices=["Always", "IfNotPresent", "Never"]
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=60.0,
        help="level-based resync of every FineTuneJob (sends nothing if idle)",
    )
    parser.add_argument("--lease-name", default="kubetune-operator")
    parser.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    parser.add_argument(
        "--lease-duration",
        type=int,
        default=15,
        help="seconds before a silent leader's Lease may be taken over",
    )
    parser.add_argument(
        "--check-secrets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check that referenced Secrets exist before training (needs `secrets: get` in "
        "the job's namespace; without it a missing Secret shows on the pods)",
    )
    parser.add_argument(
        "--allow-pod-metadata",
        action="store_true",
        help="honour the kubetune.io/pod-metadata annotation (tests only)",
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    parser.set_defaults(func=run_operator)


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    progress_url = args.progress_url or (
        f"http://kubetune-operator.{args.lease_namespace}.svc:{args.progress_port}"
    )
    return OperatorConfig(
        trainer_image=args.trainer_image,
        serving_image=args.serving_image,
        image_pull_policy=args.image_pull_policy,
        progress_url=progress_url,
        allow_pod_metadata=args.allow_pod_metadata,
        trainer_service_account=args.trainer_service_account,
        serving_service_account=args.serving_service_account,
    )


def review_limits_from_args(args: argparse.Namespace) -> ReviewLimits:
    from kubetune.operator.progress.limits import ReviewLimits

    given = {
        "source_rate": args.progress_source_review_rate,
        "source_burst": args.progress_source_review_burst,
        "total_rate": args.progress_review_rate,
        "total_burst": args.progress_review_burst,
        "in_flight": args.progress_reviews_in_flight,
    }
    return ReviewLimits(**{key: value for key, value in given.items() if value is not None})


def run_operator(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("kopf.objects", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130


async def serve(args: argparse.Namespace) -> int:
    import kopf
    from aiohttp import web
    from kopf._core.engines.peering import Identity

    from kubetune.operator import handlers
    from kubetune.operator.client import KubeClient
    from kubetune.operator.controller import Controller, utc_now
    from kubetune.operator.leader import LeaseLock
    from kubetune.operator.metrics import OperatorMetrics, index_bodies
    from kubetune.operator.progress.server import ProgressServer
    from kubetune.operator.progress.sink import ProgressSink, api_lookup, index_lookup

    if args.kubeconfig:
        # kopf logs in on its own: point it at the same cluster.
        os.environ["KUBECONFIG"] = args.kubeconfig
    config = config_from_args(args)
    client = KubeClient.connect(args.kubeconfig)
    identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    # The Lease's own requests are the election: ungated, and on a pool of their own, so a
    # renewal never waits for the reconciles' connections.
    elector = client.sibling(connections=2, attempts=client.attempts, write_gate=None)
    lease = LeaseLock(
        elector, args.lease_namespace, args.lease_name, identity, args.lease_duration
    )
    await lease.acquire()
    # Every other write passes the gate: once the Lease is lost nothing more is sent, by a
    # handler, a retry, the progress sink or an Event (see `leader`).
    client.write_gate = lease.leading

    controller = Controller(client, config, check_secrets=args.check_secrets)
    shared: dict[str, Any] = {}
    # The progress endpoint's TokenReviews and the reads that follow them go through a
    # client of their own: a flood of tokens never takes the reconciles' connections.
    limits = review_limits_from_args(args)
    reviewer = client.sibling(connections=limits.in_flight, attempts=1)
    finetunejobs = index_lookup(shared, api_lookup(reviewer))
    sink = ProgressSink(
        client, args.progress_min_interval, utc_now,
        on_patched=controller.remember, finetunejobs=finetunejobs, leading=lease.leading,
    )  # fmt: skip
    metrics = OperatorMetrics(
        api_requests=lambda: client.requests + reviewer.requests + elector.requests,
        progress_patches=lambda: sink.patches,
        finetunejobs=lambda: index_bodies(shared),
    )
    progress = ProgressServer(
        client, config.progress_audience, sink, metrics,
        reviewer=reviewer, finetunejobs=finetunejobs, limits=limits,
    )  # fmt: skip
    runner = web.AppRunner(progress.app())
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", args.progress_port).start()

    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    memo = kopf.Memo(
        controller=controller, sink=sink, shared=shared, metrics=metrics, leading=lease.leading
    )
    stop = asyncio.Event()
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    operator = asyncio.create_task(
        kopf.operator(
            registry=registry,
            # kopf would otherwise name itself after the user, and a container's UID often has
            # no passwd entry (the image's 65532 has none): getpwuid() then raises KeyError.
            identity=Identity(identity),
            settings=handlers.settings(namespaces=args.namespaces),
            standalone=True,
            clusterwide=not args.namespaces,
            namespaces=args.namespaces,
            liveness_endpoint=liveness,
            stop_flag=stop,
            memo=memo,
        )
    )
    resync = asyncio.create_task(handlers.resync_forever(memo, args.resync_seconds))
    holder = asyncio.create_task(lease.hold())
    done, _ = await asyncio.wait({operator, holder}, return_when=asyncio.FIRST_COMPLETED)
    lost = holder in done
    if lost:
        # The gate already refuses every write; drop the work still waiting to send one.
        handlers.stop_delayed_work(memo)
        sink.close()
        controller.cancel_background()
    stop.set()
    holder.cancel()
    resync.cancel()
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await operator
    finally:
        # kopf handles SIGTERM/SIGINT itself and returns; only then is the Lease released.
        # Also when kopf failed: the next operator pod then starts at once instead of
        # waiting out the Lease of a process that is gone.
        await runner.cleanup()
        if not lost:
            await lease.release()
        await controller.adapters.client.close()
        await reviewer.close()
        await elector.close()
        await client.close()
    return 1 if lost else 0
