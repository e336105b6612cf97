"""Whether a child must be applied: missing, changed by KubeTune, or changed by someone else.

Level-based means the observed world converges to the desired one, whoever moved it: a
deleted Service comes back, a `kubectl set image` on the serving Deployment is reverted. The
decision compares the desired manifest with the object as observed (kopf's indexes hold
what `observed_view` keeps). Pure.

What is compared, by kind:

- Deployment, Service: labels, annotations and the whole `spec` KubeTune writes
  (`spec.serving.replicas` included: the FineTuneJob is the source of truth, so a
  `kubectl scale` is reverted like a `kubectl set image`).
- ConfigMap: labels, annotations and `data`.
- PersistentVolumeClaim: labels and annotations only. A claim's spec is immutable but for
  growing its size, so a revert could only be refused; a deleted claim is created again and
  a larger `storage.size` still goes out through the hash.
- Job: nothing beyond presence and the applied hash. A Job's pod template is immutable (a
  drifted template cannot be patched back), and `suspend`, its one mutable field KubeTune
  sets, is Kueue's to flip when it admits the Job: a revert would fight the queue. A deleted
  Job is created again, same generation, and resumes from the newest checkpoint.

"Desired is a subset of observed": every field KubeTune sets must be there with its value;
fields the API server defaults (a Service's clusterIP, a container's
terminationMessagePath) or others add are ignored. A zero value KubeTune writes (false, 0,
"", {}, []) matches a field the server leaves out, since it drops empty fields; quantities
compare by value ("0.5" is stored as "500m"); lists of named items (containers, env, ports,
volumes) match by name, other lists item by item.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from kubetune.builders import naming
from kubetune.reconcile.runs import slim

COMPARED: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec",),
    "Service": ("spec",),
    "ConfigMap": ("data",),
    "PersistentVolumeClaim": (),
}
"""Top-level sections compared, beyond labels and annotations, per kind. A kind that is not
here (Job) is compared by presence and applied hash only."""

QUANTITY_PARENTS = frozenset({"requests", "limits", "capacity"})
QUANTITY_KEYS = frozenset({"sizeLimit"})

_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][-+]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_SUFFIX = {
    None: Fraction(1),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}


def quantity(text: str) -> Fraction | None:
    """A Kubernetes quantity's value ("500m" -> 1/2, "4Gi" -> 4 * 2**30), or None."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        return None
    try:
        return Fraction(match.group(1)) * _SUFFIX[match.group(2)]
    except (ValueError, ZeroDivisionError):
        return None


def _zero(value: Any) -> bool:
    return value is None or value is False or value == 0 or value in ("", {}, [])


def _named(items: list[Any]) -> bool:
    """Items told apart by a unique `name` (containers, env, ports, volumes)."""
    if not items or not all(isinstance(i, Mapping) and "name" in i for i in items):
        return False
    return len({i["name"] for i in items}) == len(items)


def contains(observed: Any, desired: Any, key: str = "", parent: str = "") -> bool:
    """Whether `observed` holds everything `desired` sets (see the module docstring)."""
    if isinstance(desired, Mapping):
        if not isinstance(observed, Mapping):
            return _zero(observed) and all(_zero(v) for v in desired.values())
        return all(
            contains(observed[k], v, k, key) if k in observed else _zero(v)
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(observed, list):
            return _zero(observed) and not desired
        if _named(desired) and _named(observed):
            by_name = {item["name"]: item for item in observed}
            return all(
                item["name"] in by_name and contains(by_name[item["name"]], item, key, parent)
                for item in desired
            )
        return len(observed) == len(desired) and all(
            contains(o, d, key, parent) for o, d in zip(observed, desired, strict=True)
        )
    if isinstance(desired, str) and isinstance(observed, str) and desired != observed:
        if parent in QUANTITY_PARENTS or key in QUANTITY_KEYS:
            wanted = quantity(desired)
            return wanted is not None and wanted == quantity(observed)
        return False
    if isinstance(desired, bool) or isinstance(observed, bool):
        return desired is observed or (_zero(desired) and observed is None)
    return bool(desired == observed)


def drifted(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> bool:
    """Whether someone changed a field KubeTune sets on this child (kind-dependent, see
    COMPARED). Pure."""
    sections = COMPARED.get(desired["kind"])
    if sections is None:
        return False
    want_meta = desired.get("metadata") or {}
    have_meta = observed.get("metadata") or {}
    for field in ("labels", "annotations"):
        if not contains(have_meta.get(field) or {}, want_meta.get(field) or {}):
            return True
    return any(not contains(observed.get(s), desired.get(s), s) for s in sections)


def applied_hash(obj: Mapping[str, Any] | None) -> str | None:
    annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
    value = annotations.get(naming.ANNOTATION_HASH)
    return str(value) if value is not None else None


def should_apply(desired: Mapping[str, Any], observed: Mapping[str, Any] | None) -> bool:
    """Apply when the child is missing, when KubeTune's manifest changed (applied hash), or
    when someone changed what KubeTune sets on it (`drifted`). Pure."""
    if observed is None:
        return True
    if applied_hash(observed) != applied_hash(desired):
        return True
    return drifted(desired, observed)


def observed_view(obj: Mapping[str, Any], kind: str, api_version: str) -> dict[str, Any]:
    """What the indexes keep of a child: `slim` (what reconcile reads), plus the sections
    `drifted` compares for the kinds it compares (one Deployment, two Services, a ConfigMap
    and a claim per FineTuneJob: small next to the Pods and Jobs, which stay slim)."""
    view = slim(obj, kind, api_version)
    for section in COMPARED.get(kind, ()):
        if section in obj:
            view[section] = copy.deepcopy(dict(obj[section]))
    return view
