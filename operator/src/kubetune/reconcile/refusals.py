"""Children the API server refused to store, as status conditions.

A 400 or 422 on apply (an invalid or immutable object) cannot be fixed by sending the same
manifest again, so the applier sends it once and remembers the refusal; without this the
status would keep saying "creating the training Job" forever. The refusal is reported on the
condition of the work that child belongs to, with the API server's own message, for as long as
KubeTune still wants that very manifest (an edited spec renders another one, which is sent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.api import ConditionType
from kubetune.builders import naming
from kubetune.reconcile.conditions import Cond

REASON = "Refused"
MESSAGE_LIMIT = 1024
"""Condition messages stay readable in `kubectl describe`; the API server's are long."""


@dataclass(frozen=True)
class Refusal:
    """The API server refused to store this manifest (HTTP 400 or 422 on apply)."""

    kind: str
    name: str
    digest: str
    """The refused manifest's applied-hash annotation: which version of the child it was."""
    message: str
    """What the API server said (its Status `message`)."""


CONDITION_OF_COMPONENT = {
    naming.COMPONENT_TRAINER: ConditionType.TRAINED,
    naming.COMPONENT_STORAGE: ConditionType.TRAINED,
    naming.COMPONENT_CONFIG: ConditionType.TRAINED,
    naming.COMPONENT_RENDEZVOUS: ConditionType.TRAINED,
    naming.COMPONENT_EXPORTER: ConditionType.EXPORTED,
    naming.COMPONENT_SERVER: ConditionType.SERVING,
}
"""Whose work waits on a child: the trainer pods need the claim, run config and rendezvous
Service as much as their Job."""


def refusal_conditions(
    wanted: Sequence[Mapping[str, Any]], refused: Sequence[Refusal]
) -> dict[ConditionType, Cond]:
    """The conditions that say which wanted children the API server refused and why: False,
    reason `Refused`, one per condition (several refusals joined)."""
    by_ref = {(r.kind, r.name, r.digest): r for r in refused}
    messages: dict[ConditionType, list[str]] = {}
    for manifest in wanted:
        meta = manifest["metadata"]
        digest = str((meta.get("annotations") or {}).get(naming.ANNOTATION_HASH, ""))
        refusal = by_ref.get((manifest["kind"], meta["name"], digest))
        if refusal is None:
            continue
        component = (meta.get("labels") or {}).get(naming.LABEL_COMPONENT, "")
        kind = CONDITION_OF_COMPONENT.get(component, ConditionType.TRAINED)
        messages.setdefault(kind, []).append(
            f'the API server refused {refusal.kind} "{refusal.name}": {refusal.message}'
        )
    return {
        kind: Cond(kind, "False", REASON, "; ".join(lines)[:MESSAGE_LIMIT])
        for kind, lines in messages.items()
    }
