"""Which process am I? Read from the launcher's environment (torchrun and accelerate both set
RANK / WORLD_SIZE), so it is known before torch.distributed is initialised.

The engine uses this so that, under several processes, only the main process prints and
writes files, and a stop asked for on any process stops all of them at the same step.
"""
from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (one tiny all-reduce per call)."""
    import torch
    import torch.distributed as dist
    if world_size() == 1 or not dist.is_available() or not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    import torch.distributed as dist
    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
