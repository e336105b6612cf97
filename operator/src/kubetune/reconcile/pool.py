"""Shared serving pools (`spec.serving.share`): which FineTuneJobs one server answers for, what
its adapter set is, and which load and unload calls bring a running replica to that set.

Pure: the caller passes the namespace's FineTuneJob bodies (the operator's index holds them)
and what it knows each replica has loaded; the HTTP calls are `kubetune.operator.adapters`'.

A pool is keyed by its name within a namespace. Its base is its founder's: the oldest member
(creation time, then name) whose model can be an adapter. A later job naming the pool with
another base or export is served on its own, with the reason, rather than silently moving
the pool to another base under its members' traffic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetune.api import FineTuneJobSpec
from kubetune.api.dataplane import AdapterSet, ServedAdapter
from kubetune.api.spec import Method, Quantization
from kubetune.builders import naming


@dataclass(frozen=True)
class PoolBase:
    """What every member of a pool must have in common: the base the server holds once, and
    how it was exported (an adapter trained on one base is no update of another)."""

    source: str
    revision: str | None
    precision: str
    quantization: str | None
    device: str

    @classmethod
    def of(cls, spec: FineTuneJobSpec) -> PoolBase:
        serving = spec.serving
        return cls(
            source=spec.model.source,
            revision=spec.model.revision,
            precision=serving.precision.value,
            quantization=serving.quantization.value if serving.quantization else None,
            device=serving.device.value,
        )

    def describe(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        quantization = f"-{self.quantization}" if self.quantization else ""
        return f"{self.source}{revision} ({self.precision}{quantization} on {self.device})"


@dataclass(frozen=True)
class PoolJob:
    """A FineTuneJob that names a pool, as the pool decisions read it."""

    name: str
    uid: str
    created: str
    pool: str
    spec: FineTuneJobSpec
    published_generation: int | None
    """The generation whose adapter passed its gate and was published to this pool
    (`status.serving.modelGeneration` while `status.serving.pool` names it)."""
    published_metrics: Mapping[str, float] = field(default_factory=dict)
    """That generation's validation metrics, kept with its adapter in the pool's set (its
    status does not hold them): what a next generation must beat under `mustBeatServing`."""

    @property
    def base(self) -> PoolBase:
        return PoolBase.of(self.spec)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PoolJob | None:
        """The job's pool view, or None when it names no pool (or serves nothing, or its
        spec is one the models refuse: it is reported Invalid on its own pass)."""
        try:
            spec = FineTuneJobSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return None
        if spec.serving.share is None or not spec.serving.enabled:
            return None
        meta = body.get("metadata") or {}
        serving = (body.get("status") or {}).get("serving") or {}
        published = serving.get("modelGeneration")
        if serving.get("pool") != spec.serving.share or not isinstance(published, int):
            published = None
        return cls(
            name=meta["name"],
            uid=meta.get("uid", ""),
            created=meta.get("creationTimestamp") or "",
            pool=spec.serving.share,
            spec=spec,
            published_generation=published,
        )


def not_adapter_reason(spec: FineTuneJobSpec) -> str | None:
    """Why this job's model cannot be served as an adapter on a shared base, or None.

    The trainer's PEFT config has no trained bias and no `modules_to_save` (`bias="none"`,
    `kubetune_trainer/train/model.py`), so the method decides here; the server checks each
    adapter's `adapter_config.json` again when it loads it, and its refusal lands in status."""
    if spec.method is Method.FULL:
        return "method Full trains every weight: there is no adapter to load on a shared base"
    if spec.method is Method.DORA:
        return (
            "DoRA rescales each merged weight by its own norm, which no low-rank branch beside "
            "a shared base reproduces; served from its merged export instead"
        )
    if spec.serving.quantization is Quantization.GPTQ:
        return (
            "serving.quantization GPTQ calibrates an export on its own job's training records; "
            "a pool's base is exported once for all its members (use RTN, KQuant or "
            "KQuantMixed)"
        )
    if not spec.model.source.startswith(("builtin://", "pvc://")):
        return (
            f"the pool's base export is built from model.source, and {spec.model.source} is "
            "not exported without training (only builtin:// and pvc:// bases can be shared)"
        )
    return None


@dataclass(frozen=True)
class Pool:
    name: str
    base: PoolBase
    founder: PoolJob
    """The oldest member: the pool's server settings (replicas, resources, max tokens) and
    base are its."""
    members: tuple[PoolJob, ...]
    """Every job served by the pool, by name."""

    def adapter_set(self) -> AdapterSet:
        """What the pool's server loads at start: each member whose adapter passed its gate
        and is published, at its current generation's path, by name."""
        return AdapterSet(
            adapters=[
                ServedAdapter(
                    name=naming.served_model_name(member.name),
                    path=naming.served_adapter_path(member.name, member.published_generation),
                    metrics=dict(member.published_metrics),
                )
                for member in self.members
                if member.published_generation is not None
            ]
        )


@dataclass(frozen=True)
class Pools:
    """A namespace's pools, and the jobs that name one but are served on their own."""

    pools: Mapping[str, Pool]
    alone: Mapping[str, str]
    """Job name -> why it is served on its own Deployment."""

    def pool_of(self, job: str) -> Pool | None:
        return next((p for p in self.pools.values() if any(m.name == job for m in p.members)),
                    None)


def form_pools(jobs: Sequence[PoolJob]) -> Pools:
    """Group the namespace's pool-naming jobs into pools (see the module's docstring)."""
    alone: dict[str, str] = {}
    eligible: dict[str, list[PoolJob]] = {}
    for job in sorted(jobs, key=lambda j: (j.created, j.name)):
        reason = not_adapter_reason(job.spec)
        if reason is not None:
            alone[job.name] = reason
        else:
            eligible.setdefault(job.pool, []).append(job)
    pools: dict[str, Pool] = {}
    for name, candidates in eligible.items():
        founder = candidates[0]
        members = []
        for job in candidates:
            if job.base == founder.base:
                members.append(job)
            else:
                alone[job.name] = (
                    f"pool {name} serves {founder.base.describe()} (its first member "
                    f"{founder.name}'s); this job's base is {job.base.describe()}"
                )
        pools[name] = Pool(name, founder.base, founder, tuple(sorted(members, key=_by_name)))
    return Pools(pools=pools, alone=alone)


def _by_name(job: PoolJob) -> str:
    return job.name


def pools_of(bodies: Sequence[Mapping[str, Any]]) -> Pools:
    """`form_pools` over FineTuneJob bodies (the namespace's, as the operator's index holds
    them); jobs being deleted are no members."""
    jobs = [
        job
        for body in bodies
        if not (body.get("metadata") or {}).get("deletionTimestamp")
        and (job := PoolJob.from_body(body)) is not None
    ]
    return form_pools(jobs)


def applied_adapters(config_map: Mapping[str, Any] | None) -> dict[str, AppliedAdapter]:
    """Adapter name -> its generation and metrics, as the pool's ConfigMap lists them (what
    the last pass of any member applied); {} when there is none or it cannot be read."""
    text = ((config_map or {}).get("data") or {}).get(naming.ADAPTER_SET_KEY)
    adapters = AdapterSet.parse(text)
    if adapters is None:
        return {}
    found = {}
    for adapter in adapters.adapters:
        generation = naming.adapter_generation(adapter.path)
        if generation is not None:
            found[adapter.name] = AppliedAdapter(generation, adapter.metrics)
    return found


@dataclass(frozen=True)
class AppliedAdapter:
    """One entry of the pool's set as applied."""

    generation: int
    metrics: Mapping[str, float]


# ---------------------------------------------------------------- the adapter calls


@dataclass(frozen=True)
class LoadAdapter:
    """`POST /v1/load_lora_adapter`: adds `name`, or replaces it atomically (requests in
    flight finish on the old one)."""

    name: str
    path: str


@dataclass(frozen=True)
class UnloadAdapter:
    """`POST /v1/unload_lora_adapter`."""

    name: str


AdapterCall = LoadAdapter | UnloadAdapter

UNKNOWN_PATH = ""
"""The path of an adapter a replica lists (`/v1/models`) but the operator did not load
itself (it restarted, or the replica read it from the ConfigMap at start): reloaded."""


def adapter_calls(desired: AdapterSet, loaded: Mapping[str, str]) -> list[AdapterCall]:
    """The calls that bring one replica from `loaded` (adapter name -> path) to `desired`:
    loads of what is missing or at another path (a new generation), in name order, then
    unloads of what is no longer wanted. Loads first: a replaced adapter never leaves a
    window in which its name is unknown."""
    wanted = {adapter.name: adapter.path for adapter in desired.adapters}
    calls: list[AdapterCall] = [
        LoadAdapter(name, path)
        for name, path in sorted(wanted.items())
        if loaded.get(name) != path
    ]
    calls += [UnloadAdapter(name) for name in sorted(loaded) if name not in wanted]
    return calls


@dataclass(frozen=True)
class AdapterRefusal:
    """A replica refused a member's adapter (a 4xx with the server's reason)."""

    pod: str
    name: str
    message: str
    path: str = ""
    """The adapter path refused (the same files are not offered again; a new generation
    is)."""


def refusal_message(refusals: Sequence[AdapterRefusal], job: str) -> str | None:
    """What a member's status says about its adapter's refusals, or None when none refused."""
    mine = [r for r in refusals if r.name == naming.served_model_name(job)]
    if not mine:
        return None
    first = mine[0]
    pods = ", ".join(sorted({r.pod for r in mine}))
    return f"the pool's server refused the adapter ({pods}): {first.message}"
