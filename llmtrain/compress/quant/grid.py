"""The integer grid every quantiser in llmtrain uses: weight-only, per group of `group_size` input
columns of each output row.

    w[o, g*G:(g+1)*G]  ~  scale[o, g] * (q[o, g*G:(g+1)*G] - zero[o, g])

- symmetric (the default for 8 bits): q in [-(2^(b-1)-1), 2^(b-1)-1], zero = 0, scale = max|w| / qmax.
- asymmetric (the default for 4 bits): q in [0, 2^b - 1], scale = (max - min) / (2^b - 1) and an integer
  zero point, so a group whose weights are not centred on 0 keeps all 16 levels.

Groups run along the input dimension (the dimension a row-parallel linear shards), so as long as
`group_size` divides the local width, a tensor-parallel shard computes exactly the scales of its slice of
the full weight. `group_size = 0` means one group per output row (per-channel).

Post-training quantisation (RTN, GPTQ), fake quantisation in training (`fake_quantize`, straight-through)
and the packed on-disk format all go through `group_params` / `quantize` / `dequantize` here; GGUF's own
block formats (q8_0, q4_0, q4_k) are defined by llama.cpp and live with the GGUF exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmtrain.errors import UserError

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    group_size: int = 128  # input columns per scale; 0 = one group per output row
    symmetric: bool | None = None  # None: symmetric for 8 bits, asymmetric for 4

    @property
    def sym(self) -> bool:
        return self.bits == 8 if self.symmetric is None else self.symmetric

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.sym else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.sym else 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == 0 else in_features // self.group_size


def check_spec(spec: QuantSpec, in_features: int | None = None, what: str = "quant") -> None:
    """Raise UserError naming the key when `spec` cannot quantise a linear `in_features` wide."""
    if spec.bits not in SUPPORTED_BITS:
        raise UserError(f"{what}.bits={spec.bits} is not supported; use one of {list(SUPPORTED_BITS)}")
    if spec.group_size < 0:
        raise UserError(f"{what}.group_size={spec.group_size} must be >= 0 (0 = one scale per output row)")
    if in_features is not None and spec.group_size and in_features % spec.group_size:
        raise UserError(
            f"{what}.group_size={spec.group_size} does not divide a linear layer's input width {in_features}; "
            f"pick a divisor of {in_features} (e.g. 32, 64, 128) or 0 for one scale per row"
        )


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    out, inp = w.shape
    return w.reshape(out, spec.groups(inp), -1)


def group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of shape (out, groups), float32 scales and integer-valued float zeros."""
    g = _grouped(w.detach().float(), spec)
    if spec.sym:
        scale = g.abs().amax(dim=-1) / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        lo = g.amin(dim=-1).clamp(max=0.0)
        hi = g.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / spec.qmax
        zero = torch.round(-lo / scale.clamp(min=torch.finfo(torch.float32).tiny))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integers (int8 storage) of `w` on the grid of (scale, zero)."""
    g = _grouped(w.detach().float(), spec)
    q = torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(spec.qmin, spec.qmax).reshape(w.shape).to(torch.int8 if spec.sym else torch.uint8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = _grouped(q.float(), spec)
    return ((g - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape).to(dtype)


def round_to_nearest(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`w` rounded onto its own grid (quantise then dequantise), in w's dtype."""
    scale, zero = group_params(w, spec)
    return dequantize(quantize(w, scale, zero, spec), scale, zero, spec, w.dtype)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest in the forward, identity in the backward (straight-through estimator)."""
    return w + (round_to_nearest(w, spec) - w).detach()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values [0, 15] per byte along the last dimension (low nibble first); width must be even."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
