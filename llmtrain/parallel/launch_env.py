"""Settings a launcher hands to its ranks that llmtrain's config owns.

`accelerate launch` passes its options (`--zero_stage`, `--mixed_precision`, an `accelerate config`
file, ...) to the script as ACCELERATE_* environment variables, for scripts built on `Accelerator`.
llmtrain starts DeepSpeed from the recipe, so those values would be silently ignored; a run that differs
from what the user asked for is refused instead, naming the recipe key to set.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from llmtrain.config import Config, ConfigError, Derived

_PRECISION = {"bf16": ("bf16", "bf16-autocast"), "fp16": ("fp16",)}

# env var -> (the llmtrain key to use instead, does the env value agree with the config?)
_CHECKS: dict[str, tuple[str, Callable[[str, Config, Derived], bool]]] = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("parallel.zero_stage", lambda v, c, d: int(v) == c.parallel.zero_stage),
    # "no" is also accelerate's default when nothing was passed: it cannot be told apart, so it is not checked.
    "ACCELERATE_MIXED_PRECISION": ("precision", lambda v, c, d: v == "no" or c.precision in _PRECISION.get(v, ())),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": (
        "train.global_batch_size (accumulation is derived from it)",
        lambda v, c, d: int(v) == d.grad_accum,
    ),
    "ACCELERATE_GRADIENT_CLIPPING": ("train.grad_clip", lambda v, c, d: float(v) == c.train.grad_clip),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": (
        "parallel.offload_optimizer",
        lambda v, c, d: (v != "none") == c.parallel.offload_optimizer,
    ),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": (
        "parallel.offload_params",
        lambda v, c, d: (v != "none") == c.parallel.offload_params,
    ),
    "ACCELERATE_DEEPSPEED_CONFIG_FILE": (
        "parallel.deepspeed_overrides (DeepSpeed keys the recipe does not model)",
        lambda v, c, d: False,
    ),
}


def check_launcher_settings(cfg: Config, derived: Derived) -> None:
    """Raise ConfigError if `accelerate launch` asked for something the recipe does not do."""
    conflicts = [
        f"{var}={os.environ[var]} (use {key})"
        for var, (key, agrees) in _CHECKS.items()
        if var in os.environ and not agrees(os.environ[var].lower(), cfg, derived)
    ]
    if conflicts:
        raise ConfigError(
            "accelerate launch options that llmtrain does not read, because the recipe sets the layout and "
            f"precision: {'; '.join(conflicts)}. Drop them from the accelerate command (or `accelerate "
            "config`) and give the recipe key as a key=value override instead"
        )
