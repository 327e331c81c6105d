"""Small helpers shared by every part: rank-0 printing and rank queries that work before and after
the process group exists."""

from __future__ import annotations

import os
import sys


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def print0(*args, **kwargs) -> None:
    """Print on global rank 0 only, flushed (so launchers that pipe output show it at once)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
