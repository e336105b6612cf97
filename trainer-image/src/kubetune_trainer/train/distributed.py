"""Ranks, process groups and the node rank.

The trainer runs directly (one process) or under `torchrun`, which sets `RANK`, `WORLD_SIZE`,
`LOCAL_RANK` and `GROUP_RANK`. In a cluster the operator starts, on every pod of the Indexed
Job, `torchrun --nnodes N --nproc_per_node G --node_rank $JOB_COMPLETION_INDEX
--rdzv_endpoint <pod-0 host>:29500 -m kubetune_trainer train ...`, so the node rank is the
pod's completion index; `node_rank()` reads the same variables for logs and reports when
torchrun's own are absent. The backend is `nccl` on GPUs and `gloo` on CPUs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(env: dict[str, str] | None = None) -> Ranks:
    """This process's rank and the world size (one process when not under torchrun)."""
    env = dict(os.environ) if env is None else env
    return Ranks(
        rank=int(env.get("RANK", "0")),
        world=int(env.get("WORLD_SIZE", "1")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
    )


def node_rank(env: dict[str, str] | None = None) -> int:
    """torchrun's `GROUP_RANK`, else the Indexed Job's `JOB_COMPLETION_INDEX`, else 0."""
    env = dict(os.environ) if env is None else env
    return int(env.get("GROUP_RANK") or env.get("JOB_COMPLETION_INDEX") or "0")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(ranks: Ranks) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return torch.device("cpu")


def ensure_rendezvous_env() -> None:
    """A single process started without torchrun still needs an address for DeepSpeed."""
    if "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
         "LOCAL_RANK": "0"}
    )


def init(ranks: Ranks, need_group: bool) -> None:
    """Start the process group when there are several ranks or DeepSpeed needs one."""
    if dist.is_initialized() or not (need_group or ranks.world > 1):
        return
    ensure_rendezvous_env()
    import deepspeed

    skip_shared_memory_all_reduce()
    deepspeed.init_distributed(dist_backend=backend())


SHARED_MEMORY_OP = "deepspeed_shm_comm"
"""DeepSpeed's CPU shared-memory all-reduce: built by its backend's constructor (a JIT C++
extension) and used by `inference_all_reduce` alone, which training never calls."""


def skip_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed from compiling `SHARED_MEMORY_OP` when its backend starts.

    On a CPU it did on every trainer start, in the pod: two c++ processes of ~1.5 GB each
    beside the loaded model, a minute or more of the pod's CPU share. On a 5 GiB trainer pod
    (the real-node test's) that build was OOM-killed after 12 minutes of thrashing (CI,
    2026-12-07). Marked incompatible, the backend goes without it (its all-reduce is the
    process group's either way)."""
    from deepspeed import ops

    ops.__compatible_ops__[SHARED_MEMORY_OP] = False


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_text(text: str | None, ranks: Ranks) -> str | None:
    """Rank 0's string on every rank (used to agree on which checkpoint to resume)."""
    if not dist.is_initialized() or ranks.world == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(value: int, ranks: Ranks, device: torch.device) -> int:
    """The largest of every rank's `value` (a collective: every rank calls it at the same
    point). Used to agree on a stop signal and on whether a checkpoint loaded everywhere."""
    if not dist.is_initialized() or ranks.world == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
