"""Model FLOPs utilisation (MFU) and hardware FLOPs utilisation (HFU).

Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6N + 12·L·d·T, where N counts the
parameters that take part in matmuls per token (the model family counts them: learned position tables
are lookups and are left out; a tied embedding counts once, for the output head), L the layers, d the width and T the sequence length
(the 12·L·d·T term is attention's QK^T and AV, forward and backward). MFU divides the achieved model
FLOP rate by the device's dense BF16 peak. HFU also counts work redone by activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from llmtrain.data.config import DataConfig

# Dense BF16 peak per device, FLOP/s, matched against torch.cuda.get_device_name(). Vendor datasheets.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L4", 121e12),
)


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense BF16 FLOP/s for a CUDA device name; None for CPUs and unknown devices (never invented)."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16:
        if key in device_name:
            return peak
    return None


def block_params(named_params: Iterable[tuple[str, Any]]) -> int:
    """Parameters inside the transformer blocks (`blocks.*`): the part activation checkpointing recomputes
    (the embedding lookup and the output head run once)."""
    # a mixture-of-experts stack counts the share a token runs through (moe.py's llmtrain_active_fraction)
    return int(
        sum(
            p.numel() * getattr(p, "llmtrain_active_fraction", 1.0)
            for name, p in named_params
            if name.startswith("blocks.")
        )
    )


def model_flops_per_token(n_matmul_params: float, n_layer: int, d_model: int, seq_len: int) -> float:
    return 6.0 * n_matmul_params + 12.0 * n_layer * d_model * seq_len


def recompute_flops_per_token(
    mode: str, n_block_params: int, n_layer: int, d_model: int, seq_len: int, every_n: int = 2
) -> float:
    """Extra forward FLOPs per token spent recomputing activations in backward: a block's forward is
    2 x its parameters + the attention core 4·d·T; `every_n` recomputes blocks 0, n, 2n, ..."""
    core = 4.0 * d_model * seq_len  # QK^T and AV of one layer, forward
    block_fwd = 2.0 * n_block_params / max(1, n_layer) + core
    if mode == "full":
        return n_layer * block_fwd
    if mode == "every_n":
        return len(range(0, n_layer, max(1, every_n))) * block_fwd
    if mode == "selective":  # only the attention core (QK^T, softmax, AV) is recomputed
        return n_layer * core
    return 0.0


def flops_per_token(
    model: nn.Module,
    n_layer: int,
    d_model: int,
    seq_len: int,
    data: DataConfig | None = None,
    checkpointing: str = "none",
    every_n: int = 2,
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per token of a training step of `model` (an nn.Module, meta is fine) on
    `data` (its DataConfig: which batches, e.g. BERT's masked-LM fraction). The matmul parameters per token
    are the model family's count (`ModelFamily.matmul_params_per_token`): it knows its lookups and its
    heads that run on fewer positions."""
    from llmtrain.models.registry import family_of

    named = list(model.named_parameters())
    n_mm = family_of(model.cfg).matmul_params_per_token(named, seq_len, data)
    per_token = model_flops_per_token(n_mm, n_layer, d_model, seq_len)
    extra = recompute_flops_per_token(checkpointing, block_params(named), n_layer, d_model, seq_len, every_n)
    return per_token, per_token + extra


def utilisation(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_s_per_device * flops_per_token / peak
