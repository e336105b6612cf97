"""`kubetune.api.status.STATUS_DEFAULTS`: the defaults the API server fills into `status`, the
same ones the generated CRD carries (reconcile must not null them: see test_status_patch)."""

from __future__ import annotations

from typing import Any

from kubetune.api.codegen.crd import build_crd
from kubetune.api.status import STATUS_DEFAULTS


def _schema_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """Defaults in an OpenAPI schema's properties, nested; list items left out."""
    found: dict[str, Any] = {}
    for key, node in (schema.get("properties") or {}).items():
        if "default" in node:
            found[key] = node["default"]
        elif node.get("type") == "object":
            nested = _schema_defaults(node)
            if nested:
                found[key] = nested
    return found


def test_status_defaults_are_the_crds() -> None:
    [version] = build_crd()["spec"]["versions"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert _schema_defaults(status) == STATUS_DEFAULTS
    assert STATUS_DEFAULTS["evaluation"] == {"exportMessage": "", "message": ""}
