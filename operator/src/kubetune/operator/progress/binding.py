"""Who sent a progress report: the TokenReview's verdict (`check_review`), the pod -> Job ->
FineTuneJob chain of controller ownerReferences (`bind`) and the generation check
(`check_current`). Pure: the reads they judge are made by the server and the sink."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune.api import API_VERSION, KIND, FineTuneJobSpec
from kubetune.builders import naming
from kubetune.builders.meta import legacy_training_hash, training_hash
from kubetune.reconcile.status import recorded_training

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"


class Refused(Exception):
    """A request the endpoint answers with `status`. `lasting`: the same token would be
    refused the same way later for the same FineTuneJob (the pod's owners do not change), so
    it is remembered; a refusal that may clear (a lagging read, a busy API server) is not.
    `any_job`: the TokenReview's own verdict (not authenticated, another audience, no pod),
    the same whatever FineTuneJob the token reports for. `retry_after`: the seconds a
    throttled client should wait."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        lasting: bool = False,
        retry_after: float = 0.0,
        remembered: bool = False,
        any_job: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.lasting = lasting or any_job
        self.any_job = any_job
        self.retry_after = retry_after
        self.remembered = remembered
        """Answered from memory: already logged when it was first decided."""


@dataclass(frozen=True)
class Verdict:
    """A lasting refusal, remembered by the token's digest (a fresh `Refused` is raised from
    it each time: one exception object raised again and again would grow its traceback)."""

    status: int
    message: str


@dataclass(frozen=True)
class TokenClaim:
    """Who a TokenReview says sent the token: a pod, by namespace, name and uid."""

    namespace: str
    pod: str
    pod_uid: str


@dataclass(frozen=True)
class Binding:
    """A verified token: the pod that holds it and the FineTuneJob generation it trains."""

    namespace: str
    name: str
    finetunejob_uid: str
    job: str
    job_uid: str
    generation: int
    training_hash: str
    pod_uid: str


def check_review(review: Mapping[str, Any], audience: str) -> TokenClaim:
    """The pod a TokenReview names, or Refused. Pure.

    The review was asked for `audience` only, so the API server itself refuses a token for
    another audience; the audience is checked here too, so that a review sent without
    audiences (the API server then checks against its own, and every pod's default token
    passes) can never let such a token through."""
    status = review.get("status") or {}
    if not status.get("authenticated"):
        raise Refused(401, "token not authenticated", any_job=True)
    if audience not in (status.get("audiences") or []):
        raise Refused(401, "token is not for the KubeTune progress audience", any_job=True)
    user = status.get("user") or {}
    parts = str(user.get("username", "")).split(":")
    extra = user.get("extra") or {}
    pod_name = (extra.get(POD_NAME) or [None])[0]
    pod_uid = (extra.get(POD_UID) or [None])[0]
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not pod_name:
        raise Refused(403, "token is not bound to a pod", any_job=True)
    return TokenClaim(namespace=parts[2], pod=pod_name, pod_uid=pod_uid or "")


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference with `controller: true`, if any (there is at most one). Pure."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") is True:
            return dict(ref)
    return None


def current_training_hashes(finetunejob: Mapping[str, Any]) -> frozenset[str]:
    """The training hashes a Job of the generation the FineTuneJob trains now carries: its
    spec's, and the one older operators wrote for the same spec (as `reconcile.decide`
    matches them through `reconcile.children.training_generation`). Empty when the spec does
    not parse (then it trains nothing). Pure."""
    try:
        spec = FineTuneJobSpec.model_validate(finetunejob.get("spec") or {})
    except ValidationError:
        return frozenset()
    return frozenset((training_hash(spec), legacy_training_hash(spec)))


def bind(
    claim: TokenClaim,
    namespace: str,
    name: str,
    pod: Mapping[str, Any] | None,
    job: Mapping[str, Any] | None,
    finetunejob: Mapping[str, Any] | None,
) -> Binding:
    """The verdict on a reviewed token reporting for FineTuneJob `namespace/name`: the pod
    -> training Job -> FineTuneJob chain of controller ownerReferences, uids included, and
    the Job's generation being the FineTuneJob's current one. Refused otherwise. Pure.

    Labels decide nothing here: anyone who may create pods in the namespace can copy
    `kubetune.io/job`, but only the Job controller sets a pod's controller reference to a
    Job, and a pod's ownerReferences cannot be changed to a Job created later."""
    who = f"FineTuneJob {namespace}/{name}"
    if claim.namespace != namespace:
        raise Refused(403, f"the token's pod is not in namespace {namespace}", lasting=True)
    if pod is None:
        raise Refused(403, "the token's pod no longer exists", lasting=True)
    meta = pod.get("metadata") or {}
    if (claim.pod_uid and meta.get("uid") != claim.pod_uid) or meta.get("namespace") != namespace:
        raise Refused(403, "the token's pod no longer exists", lasting=True)
    pod_owner = controller_of(pod)
    if not pod_owner or (pod_owner.get("apiVersion"), pod_owner.get("kind")) != ("batch/v1", "Job"):
        raise Refused(403, f"the token's pod was not created by a training Job of {who}",
                      lasting=True)  # fmt: skip
    if job is None:
        raise Refused(403, f"the token's pod's Job no longer exists ({who})", lasting=True)
    job_meta = job.get("metadata") or {}
    if job_meta.get("uid") != pod_owner.get("uid") or job_meta.get("name") != pod_owner.get("name"):
        raise Refused(403, f"the token's pod's Job no longer exists ({who})", lasting=True)
    job_owner = controller_of(job)
    labels = job_meta.get("labels") or {}
    generation_label = str(labels.get(naming.LABEL_GENERATION) or "")
    generation = int(generation_label) if generation_label.isdigit() else -1
    if (
        not job_owner
        or (job_owner.get("apiVersion"), job_owner.get("kind")) != (API_VERSION, KIND)
        or job_owner.get("name") != name
        or labels.get(naming.LABEL_COMPONENT) != naming.COMPONENT_TRAINER
        or job_meta.get("name") != naming.training_job_name(name, generation)
    ):
        raise Refused(403, f"the token's pod is not a trainer of {who}", lasting=True)
    if finetunejob is None:
        raise Refused(403, f"{who} does not exist")
    ftj_uid = (finetunejob.get("metadata") or {}).get("uid")
    if job_owner.get("uid") != ftj_uid:
        # A FineTuneJob deleted and created again under the same name: the old one's pods
        # are not its trainers.
        raise Refused(403, f"the token's pod is not a trainer of {who}", lasting=True)
    job_hash = str((job_meta.get("annotations") or {}).get(naming.ANNOTATION_TRAINING_HASH) or "")
    binding = Binding(
        namespace=namespace,
        name=name,
        finetunejob_uid=str(ftj_uid),
        job=str(job_meta.get("name")),
        job_uid=str(job_meta.get("uid")),
        generation=generation,
        training_hash=job_hash,
        pod_uid=str(meta.get("uid")),
    )
    check_current(binding, finetunejob)
    return binding


def check_current(binding: Binding, finetunejob: Mapping[str, Any] | None) -> None:
    """Refused (409) unless the bound pod's generation is the one the FineTuneJob trains now:
    same FineTuneJob (uid), and the spec's training hash on the pod's Job or the pod's
    generation the one `status.training` records (an invalid edit starts no generation: the
    recorded one trains on until the spec is valid). Pure."""
    who = f"FineTuneJob {binding.namespace}/{binding.name}"
    if finetunejob is None or (finetunejob.get("metadata") or {}).get("uid") != (
        binding.finetunejob_uid
    ):
        raise Refused(409, f"{who} is gone: the report of its pod is dropped")
    recorded = recorded_training(finetunejob.get("status") or {})
    still_recorded = recorded is not None and (recorded.generation, recorded.training_hash) == (
        binding.generation, binding.training_hash
    )
    if binding.training_hash not in current_training_hashes(finetunejob) and not still_recorded:
        raise Refused(
            409,
            f"the token's pod trains generation {binding.generation}, no longer the one "
            f"{who} trains: its report is dropped",
        )
