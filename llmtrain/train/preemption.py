"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption with `--signal`, `scancel`, Ctrl-C via torchrun).

The handler only sets a flag. At each step boundary the ranks agree (one all-reduce of a flag, MAX) so
that all of them checkpoint at the same step and exit together; a rank that got no signal still stops.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has been signalled (collective)."""
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
