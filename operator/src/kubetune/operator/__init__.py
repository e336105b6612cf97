"""`kubetune operator`: the kopf process that acts on what `kubetune.reconcile` decides.

Owns the I/O: the API client (`client`), kopf's handlers and indexes (`handlers`), one
reconcile pass (`controller`), applying children (`applier`, `lanes`), the leader lease
(`leader`), the progress endpoint trainers report to (`progress`, a package by concern),
existence checks of referenced objects (`references`), the metrics (`metrics`) and the HTTP
calls that load and unload a shared pool's adapters on its replicas (`adapters`). Imports
`kubetune.reconcile` and what it stands on; never `kubetune.local` or the data plane.
"""
