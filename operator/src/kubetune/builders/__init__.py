"""Pure manifest builders: FineTuneJob (+ plan, settings) in, Kubernetes objects as dicts out.

No I/O, no clock, no kopf: every child carries its owner reference, the standard labels and
a hash of itself, so the caller can tell an unchanged child from one to apply. Owns the child
names and labels (`naming`), the operator's settings (`config`), one module per child kind,
and `pool`: a shared serving pool's objects, owned by every member.
Imports `kubetune.api` only.
"""
