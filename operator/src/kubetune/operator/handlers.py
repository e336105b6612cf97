"""kopf wiring only: indexes of children, and event handlers a few lines long that call the
controller. Handlers return nothing (a returned value would land in status); a failed pass
is retried from here after RETRY_SECONDS (kopf retries no event handler), never by sleeping
in the handler.

A resync loop (not a kopf timer: see `resync_forever`) makes the operator level-based.
Indexes hold the FineTuneJobs and every child kind (Jobs, Pods, Deployments, Services,
ConfigMaps, PVCs), keyed by (namespace, FineTuneJob name). kopf fills them from the
watches before any handler runs. A FineTuneJob's own event reconciles it at once; its
children's events share one pass per job that waits for the critical lane
(`reconcile_after_child`), so new jobs' Jobs go first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.operator.controller import Controller, RetryLater
from kubetune.operator.indexes import (
    CHILD_KINDS,
    INDEXES,
    MANAGED,
    MANAGED_SELECTOR,
    children_of,
    namespace_jobs,
    owner_key,
    pool_key,
    pool_members,
    pool_of_key,
    register_indexes,
    share_of,
)
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.progress.sink import ProgressSink

RETRY_SECONDS = 5.0


def leading(memo: kopf.Memo) -> bool:
    """The operator's write gate (`memo.leading`, the Lease's `LeaseLock.leading`): a pass,
    a retry or a resync that could not write anything is not started. Without one (tests
    that run a Controller alone), always."""
    gate = memo.get("leading")
    return gate is None or bool(gate())


def stop_delayed_work(memo: kopf.Memo) -> None:
    """The Lease is lost: cancel every pending retry (each would reconcile and write)."""
    retries: dict[tuple[str, str], asyncio.Task[None]] = memo.shared.get("retries") or {}
    for task in retries.values():
        task.cancel()
    retries.clear()


async def reconcile_pass(
    memo: kopf.Memo, body: Mapping[str, Any], indexes: Mapping[str, Any]
) -> None:
    if not leading(memo):
        return  # another operator holds the Lease: it reconciles
    if "indexes" not in memo.shared:
        # kopf's indexes are live views: keep them for the resync loop, which no handler
        # calls. kopf gives each object a shallow copy of the memo: `shared` is one dict.
        memo.shared["indexes"] = {name: indexes[name] for name in INDEXES}
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    controller: Controller = memo.controller
    metrics: OperatorMetrics | None = memo.get("metrics")
    if metrics is not None:
        metrics.reconciles.inc()
    share = share_of(body)
    # A pool member decides with the namespace's jobs (who else is in its pool) and the
    # pool's objects; anyone else with neither.
    peers = namespace_jobs(key[0], indexes) if share else []
    pool_children = children_of(pool_key(key[0], share), indexes) if share else []
    try:
        await controller.reconcile(body, children_of(key, indexes), peers, pool_children)
        for member in controller.revisit():
            retry_later(memo, member)
    except Exception as error:
        if not leading(memo):
            # The Lease was lost during the pass: the client refused its writes (NotLeading).
            logging.getLogger(__name__).info("%s/%s: pass dropped, Lease lost", *key)
            return
        # kopf does not retry event handlers: this module does, from the indexes.
        if metrics is not None:
            metrics.reconcile_errors.inc()
        log = logging.getLogger(__name__)
        if isinstance(error, RetryLater):
            log.warning("%s/%s: %s; retrying in %.0f s", *key, error, RETRY_SECONDS)
        else:
            log.exception("%s/%s: reconcile failed; retrying in %.0f s", *key, RETRY_SECONDS)
        retry_later(memo, key)


async def reconcile_after_child(
    memo: kopf.Memo, key: tuple[str, str], indexes: Mapping[str, Any]
) -> None:
    """A child of `key` changed: reconcile it once no critical write is in flight (the
    Jobs of new FineTuneJobs go first, see `kubetune.operator.lanes`), in one pass for
    every child event that arrives until that pass starts. It reads the job and its
    children from the indexes when it starts, so the events it folds in are all seen; an
    event after that schedules the next pass.

    Each event used to run a pass of its own, at once: in a burst of 1,000 jobs
    (bench/fleet.py) a job's pods and Jobs send a dozen events, and those passes took the
    single event loop from the new jobs whose first Job the user waits for."""
    pending: dict[tuple[str, str], asyncio.Task[None]] = memo.shared.setdefault(
        "pending_passes", {}
    )
    task = pending.get(key)
    if task is None:
        controller: Controller = memo.controller

        async def folded_pass() -> None:
            try:
                await controller.critical_idle()
            finally:
                pending.pop(key, None)  # from here on, a new event needs a pass of its own
            for body in list(indexes["finetunejobs"].get(key) or ()):
                await reconcile_pass(memo, body, indexes)

        task = pending[key] = asyncio.create_task(folded_pass())
    # Shielded: kopf cancelling one child's handler must not cancel the pass the others
    # wait for.
    await asyncio.shield(task)


def retry_later(memo: kopf.Memo, key: tuple[str, str]) -> None:
    """Reconcile `key` again after RETRY_SECONDS with the freshest body and children the
    indexes hold then; one pending retry per FineTuneJob."""
    retries: dict[tuple[str, str], asyncio.Task[None]] = memo.shared.setdefault("retries", {})
    if key in retries or not leading(memo):
        return

    async def retry() -> None:
        await asyncio.sleep(RETRY_SECONDS)  # a back-off, not a wait for a condition
        retries.pop(key, None)
        indexes = memo.shared["indexes"]
        for body in list(indexes["finetunejobs"].get(key) or ()):
            await reconcile_pass(memo, body, indexes)

    retries[key] = asyncio.create_task(retry())


async def resync_forever(memo: kopf.Memo, interval: float) -> None:
    """Level-based safety net: every `interval` seconds, reconcile every FineTuneJob from the
    indexes. It catches what no event announces (a Secret created later, a missed watch
    event); with nothing to change a pass sends no request. Jobs an event reconciled within
    the last interval are skipped, so a burst is not reconciled twice.

    A loop rather than `@kopf.timer`: kopf puts a finalizer on every object with a timer,
    which costs a patch and a round trip before the first Job, and blocks deletion
    whenever the operator is not running.
    """
    while True:
        await asyncio.sleep(interval)  # the resync period itself, not a wait for a condition
        indexes = memo.shared.get("indexes")
        if indexes is None or not leading(memo):
            continue
        controller: Controller = memo.controller
        for key, bodies in list(indexes["finetunejobs"].items()):
            if controller.passed_within(key, interval):
                continue
            for body in list(bodies):
                await reconcile_pass(memo, body, indexes)


def register(registry: kopf.OperatorRegistry) -> None:
    """Put the handlers on `registry` (one per operator; tests build their own)."""

    register_indexes(registry)

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> Any:
        # A registry of our own has none of kopf's default login handlers.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    # One event handler for create, update, resume (kopf's initial listing) and delete. kopf's
    # change handlers (on.create/on.update/on.resume) would record a last-handled-configuration
    # annotation on every FineTuneJob after each change: one more write per change for the
    # API server, and one more watch event for the operator. The reconcile is level-based
    # (spec generation vs status.observedGeneration, children from the indexes), so it needs
    # no diff from kopf; in bench/operator_burst.py that write was a sixth of all requests.
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="finetunejob")
    async def finetunejob_changed(
        body: kopf.Body, type: str | None, memo: kopf.Memo, **kwargs: Any
    ) -> None:
        key = (body.metadata.namespace or "", body.metadata.name or "")
        controller: Controller = memo.controller
        if type == "DELETED":
            # Children are owned: the garbage collector deletes them. Nothing to block on, so
            # no finalizer; only this process's memory of the job is dropped.
            controller.forget(key)
            sink: ProgressSink = memo.sink
            sink.forget(key)
            share = share_of(body)
            if share:
                # The pool's other members take it out of the adapter set and unload it.
                for member in pool_members(key[0], share, kwargs):
                    if member["metadata"]["name"] != key[1]:
                        await reconcile_pass(memo, member, kwargs)
            return
        if controller.wrote(key, body):
            return  # the echo of this process's own status patch: nothing new to decide
        await reconcile_pass(memo, body, kwargs)

    async def child_changed(
        body: kopf.Body, type: str | None, memo: kopf.Memo, **kwargs: Any
    ) -> None:
        key = owner_key(body)
        if key is None:
            return
        if type == "DELETED":
            memo.controller.child_deleted(key, body.get("kind", ""), body.metadata.name)
        pool = pool_of_key(key)
        # A snapshot: kopf's index is live, and an owner indexed while a pass awaits would
        # break the walk (an owner indexed meanwhile has its own event to be reconciled by).
        owners = ([key] if pool is None else
                  [(m["metadata"]["namespace"], m["metadata"]["name"])
                   for m in pool_members(key[0], pool, kwargs)])
        for owner in owners:
            await reconcile_after_child(memo, owner, kwargs)

    # Every kind KubeTune applies (and its Pods): a child deleted or edited by someone else
    # is reconciled at once, from the watch the index already holds open, and put back
    # (kubetune.reconcile.drift decides what counts as changed). Not a timer: a timer puts a
    # finalizer on every object (see `resync_forever`), and waits for its period.
    for child in CHILD_KINDS:
        kopf.on.event(
            child.group, child.version, child.plural,
            labels=MANAGED, registry=registry, id=f"child_changed_{child.plural}",
        )(child_changed)  # fmt: skip


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base. kopf builds one (a deep copy of the body) for every event of every
    watched object, to feed change handlers; this operator registers none (see
    `finetunejob_changed`), so the copy would be thrown away: in bench/operator_burst.py it was a
    tenth of the operator's CPU during a burst."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


GLOB_CHARACTERS = frozenset("*?!,")


def needs_scanning(namespaces: Sequence[str]) -> bool:
    """Whether kopf must list and watch Namespaces: only to match `--namespace` globs
    (kopf's patterns: `*`, `?`, `!negation`, `a,b` lists). Exact names, or all namespaces,
    need no Namespace listing. Pure."""
    return any(GLOB_CHARACTERS & set(pattern) for pattern in namespaces)


def settings(prefix: str = "kubetune.io", namespaces: Sequence[str] = ()) -> kopf.OperatorSettings:
    """kopf's bookkeeping in annotations (never in status), few events of its own."""
    result = kopf.OperatorSettings()
    # kopf's scanning lists and watches CRDs and Namespaces, which least-privilege RBAC does
    # not grant: kopf then retries for about a minute before serving anything. The CRD is
    # installed before the operator starts (one discovery at startup still finds it), so
    # scanning is only kept for namespace globs, which need the Namespace list to match.
    result.scanning.disabled = not needs_scanning(namespaces)
    result.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    result.persistence.diffbase_storage = NoDiffBase()
    result.persistence.finalizer = f"{prefix}/finalizer"
    # kopf would post an Event per handler run; the operator posts its own on transitions.
    result.posting.level = logging.WARNING
    result.watching.server_timeout = 300
    # Children are selected by the API server: the watches of ConfigMaps, Services, Pods...
    # carry KubeTune's objects only, not every one in the cluster (the handlers' own label
    # filter would drop the rest after they crossed the wire).
    for child in CHILD_KINDS:
        result.watching.label_selectors[child.group, child.version, child.plural] = (
            MANAGED_SELECTOR
        )
    # kopf keeps one worker per object for `idle_timeout` after its last event; a cap on
    # workers would make a burst of new objects wait for idle ones to expire.
    result.queueing.worker_limit = None
    result.queueing.idle_timeout = 1.0
    # (kopf 1.45 removed time-based batching: no batch window delays a reaction any more.)
    result.execution.max_workers = 4
    # On SIGTERM kopf stops and `kubetune operator` then releases its Lease: no SIGKILL.
    result.process.ultimate_exiting_timeout = None
    return result
