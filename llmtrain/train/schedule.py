"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

from llmtrain.config import OptimConfig


def lr_multiplier(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Return f(step) -> multiplier of optim.lr for 0-based optimizer step `step`."""
    warmup = cfg.warmup_steps
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, max_steps - warmup)
    floor = cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, decay))
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
