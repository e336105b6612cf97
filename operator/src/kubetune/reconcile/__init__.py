"""The pure half of the operator: what the cluster should look like, given what it looks like.

`decide` turns an observation (the FineTuneJob and its children) into the objects to apply,
the status and the events; `children` selects among the observed children, `runs` reads what
a Job and its pods say about a run, `drift` decides whether a child must be applied (missing,
changed by KubeTune, or edited by someone else), `conditions` and `readiness` phrase the
status conditions, `refusals` reports the children the API server refused to store, `attach`
the pods that wait for a volume another node holds, `status` assembles the status body (with
each task metric of the base, fine-tuned and serving model side by side), `gate` checks a
report's task metrics against the evaluation gate, and `pool` forms the shared serving pools
(`serving.share`) and decides the adapter loads and unloads a pool replica needs. No I/O, no
clock (the caller passes the time), no kopf, aiohttp or Kubernetes client. Imports
`kubetune.api`, `kubetune.builders` and `kubetune.planner`.
"""
