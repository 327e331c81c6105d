"""Speed switches applied from outside the model: torch.compile per block and the SDPA kernel choice.

`train.compile` compiles each transformer block on its own (`nn.Module.compile`, in place) rather than
the whole model: every block has the same graph, so inductor compiles it once and reuses it; parameter
names, state dicts, activation checkpointing and the pipeline split stay as they are; and the graph
breaks DeepSpeed puts between blocks (hooks, communication) fall outside the compiled regions. This is
torchtitan's per-block choice, for the same reasons.

`train.attention_backend` pins the SDPA kernel (flash, memory-efficient, cuDNN or math). `auto` lets
torch choose; naming a kernel makes a call it cannot serve fail loudly, instead of silently falling back
to the math kernel, which materialises the s x s attention matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from llmtrain.errors import UserError


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile every module of `model.blocks` in place; returns how many were compiled."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise UserError(
            f"train.compile compiles transformer blocks, but {type(model).__name__} has no "
            f"`blocks` ModuleList; set train.compile=false"
        )
    for block in blocks:
        block.compile()
    return len(blocks)


BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


@contextlib.contextmanager
def attention_backend(name: str, device: torch.device) -> Iterator[None]:
    """Within the block, scaled_dot_product_attention uses only the named kernel (`auto`: torch picks)."""
    if name not in BACKENDS:
        raise UserError(f"train.attention_backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "auto":
        yield
        return
    if device.type != "cuda" and name in ("efficient", "cudnn"):
        raise UserError(f"train.attention_backend={name} needs a CUDA GPU; on {device.type} use auto, flash or math")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    with sdpa_kernel(kernel):
        yield
