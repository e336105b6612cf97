"""The progress endpoint trainer pods report to (`KUBETUNE_REPORT_URL`), by concern.

`POST /v1/progress/<namespace>/<name>` with `Authorization: Bearer <token>`, where the token
is the pod's projected ServiceAccount token for the KubeTune audience. A report is accepted
only when

- a TokenReview asking for that audience authenticates the token, and the token is bound to a
  pod (`binding.check_review`);
- the pod (same uid) was created by a training Job that FineTuneJob `<namespace>/<name>` (same
  uid) controls, through the ownerReferences the Job controller and the operator set, never
  through labels anyone who can create pods could copy (`binding.bind`);
- that Job belongs to the generation the FineTuneJob trains now (its training hash is the
  spec's, or it is the generation `status.training` records): a previous generation's pod,
  still running out its grace period, is refused with 409 and its report is dropped, also
  when it was accepted earlier and waits in the sink (`binding.check_current`).

Nothing unauthenticated reaches the API server unbounded (`limits.ReviewLimits`): a token
refused once is remembered by its sha256 and refused again for free; TokenReviews are rationed
per source address and in all (`kubetune.api.ratelimit.TokenBuckets`, answered with 429 and
Retry-After), and at most a few are in flight, on a client of their own with a small
connection pool and no retries, so a flood of bad tokens never queues in front of the
reconciles' requests. Status patches are rate-limited per FineTuneJob; the newest report
always lands, at most `min_interval` seconds late (`sink`).

Modules, each importing only those before it: `status` (the `status.progress` merge patch a
report makes; pure), `binding` (the TokenReview's verdict and the pod -> Job -> FineTuneJob
owner chain; pure), `limits` (the review budgets and the bounded caches), `sink` (the
rate-limited status patches), `server` (the aiohttp app: reports, /healthz, /metrics).
Imports `kubetune.operator.client` and `kubetune.operator.metrics`, `kubetune.reconcile` and
what it stands on.
"""
