"""KubeTune's control plane: the API, the planner, the builders, the reconcile logic, the
operator and the local runner, layered (imports point down only, `make test` checks it):

    cli  >  operator | local  >  reconcile  >  builders | planner  >  api

It never imports the data plane (`kubetune_trainer`): the two meet at `kubetune.api` (the run
config going in, the typed reports coming back) and at `python -m kubetune_trainer ...`.
"""
