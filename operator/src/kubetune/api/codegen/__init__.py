"""Files generated from the API models: the CRD (`crd`) and `docs/api.md` (`docs`).

Imports `kubetune.api` only; tests fail when a generated file is stale.
"""
