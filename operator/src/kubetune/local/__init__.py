"""`kubetune run FILE.yaml`: the whole FineTuneJob on this machine, no cluster.

Owns reading the model's config.json for the planner (`modelconfig`), the run directory
(`rundir`), the child processes (`processes`: the same `python -m kubetune_trainer ...`
commands the pods run), the progress line and loss plot (`progress`), serving on localhost
(`serve`) and held-out evaluation through the served endpoint (`evaluate`). Imports
`kubetune.reconcile` and what it stands on; never `kubetune.operator` or the data plane (it
reads the data plane's typed reports from `kubetune.api.dataplane`).
"""
