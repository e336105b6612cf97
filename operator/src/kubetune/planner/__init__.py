"""The planner: a spec in, a `PlanStatus` out (world size, ZeRO stage, batch split, memory),
and the DeepSpeed config that plan trains with. Pure: no clock, no I/O.

Owns the model shapes (`shapes`), the memory model (`memory`), the search over ZeRO stages and
micro-batches (`search`), the plan itself (`plan`) and the DeepSpeed config (`deepspeed`).
Imports `kubetune.api` only.
"""
