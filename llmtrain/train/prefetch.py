"""Keep data loading off the critical path: the next step's batches are built on a background thread
(and pinned on GPU, so the copy to the device overlaps compute) while the current step runs.

Relies on the data contract: `train_batches(step)` depends only on the step, so building step+1 early
changes nothing about what step+1 sees.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmtrain.data.contract import RunData


class Prefetcher:
    def __init__(self, data: RunData, pin_memory: bool, enabled: bool = True):
        self.data, self.pin = data, pin_memory
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtrain-prefetch") if enabled else None
        self.pending: tuple[int, Future] | None = None

    def _load(self, step: int) -> list[dict[str, torch.Tensor]]:
        batches = self.data.train_batches(step)
        if self.pin:
            batches = [{k: v.pin_memory() for k, v in mb.items()} for mb in batches]
        return batches

    def batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Batches of `step`; starts building `step + 1` in the background."""
        if self.pool is None:
            return self._load(step)
        if self.pending is not None and self.pending[0] == step:
            current = self.pending[1].result()
        else:
            current = self._load(step)
        self.pending = (step + 1, self.pool.submit(self._load, step + 1))
        return current

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
