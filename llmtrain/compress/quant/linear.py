"""`QuantLinear`: a linear layer whose weight is stored as integers on the shared grid (grid.py), and the
`quantized_weights` model converter that puts it in place of a model's `nn.Linear`s.

Storage (buffers, so they land in model.safetensors as they are, never as fp32 copies):

    weight_q      (out, in) int8 for 8 bits (symmetric), (out, in/2) uint8 for 4 bits (two per byte,
                  low nibble first: grid.pack_int4)
    weight_scale  (out, groups) float32
    weight_zero   (out, groups) uint8, asymmetric grids only (integer zero points)

`.weight` is a read-only property: the dequantised float32 weight, computed on every access (nothing is
cached, so memory holds the packed integers only, and it works on CPU, any device and "meta"). `forward`
is `F.linear(x, weight, bias)`: numerically the model that `grid.dequantize` describes.

The converter (`model.converters: [quantized_weights]`, settings in `model.weight_quant`) swaps every
`nn.Linear` except the ones tied to an embedding (the output head of a tied model) and the names listed in
`model.weight_quant.skip`; module names do not change, so `blocks.0.attn.qkv` holds
`blocks.0.attn.qkv.weight_q`. Applied to float weights it rounds them to nearest (RTN); readers build it
on "meta" and load the stored integers over it. Embeddings and norms stay float.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.compress.quant.grid import (
    QuantSpec,
    check_spec,
    dequantize,
    group_params,
    pack_int4,
    quantize,
    unpack_int4,
)
from llmtrain.errors import ConfigError
from llmtrain.models.converters import register_converter

if TYPE_CHECKING:
    from llmtrain.models.config import ModelConfig, WeightQuant

CONVERTER = "quantized_weights"


class QuantLinear(nn.Linear):
    """nn.Linear with integer weights (buffers `weight_q`, `weight_scale`, `weight_zero`) and a float bias."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        spec: QuantSpec,
        device: torch.device | str | None = None,
    ) -> None:
        check_spec(spec, in_features, "model.weight_quant")
        nn.Module.__init__(self)  # not nn.Linear's: there is no float weight Parameter
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups = spec.groups(in_features)
        if spec.bits == 4:
            q = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        else:
            q = torch.zeros(out_features, in_features, dtype=torch.int8 if spec.sym else torch.uint8, device=device)
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        if not spec.sym:
            self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("weight_zero", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        """`linear` rounded to nearest on the grid of `spec` (on linear's device; "meta" gives shapes only)."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, spec, device=w.device)
        with torch.no_grad():
            if not w.is_meta:
                scale, zero = group_params(w, spec)
                new.set_quantized(quantize(w, scale, zero, spec), scale, zero)
            if linear.bias is not None:
                new.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=linear.bias.requires_grad)
        return new

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store integers `q` (out, in; grid.quantize's output) with their (out, groups) scales and zeros."""
        assert q.shape == (self.out_features, self.in_features), q.shape
        self.weight_q = (pack_int4(q) if self.spec.bits == 4 else q.to(self.weight_q.dtype)).to(self.weight_q.device)
        self.weight_scale = scale.detach().float().to(self.weight_scale.device)
        if self.weight_zero is not None:
            self.weight_zero = zero.detach().to(torch.uint8).to(self.weight_zero.device)

    def integers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q (out, in) unpacked integers, scale (out, groups), zero (out, groups) float) as grid.dequantize takes."""
        q = unpack_int4(self.weight_q) if self.spec.bits == 4 else self.weight_q
        zero = self.weight_zero.float() if self.weight_zero is not None else torch.zeros_like(self.weight_scale)
        return q, self.weight_scale, zero

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # the dequantised float32 weight, recomputed on each access
        q, scale, zero = self.integers()
        return dequantize(q, scale, zero, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantised weight (what `model.init_from` of a quantised model reads)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight_q.device)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.spec.bits}, group_size={self.spec.group_size}, symmetric={self.spec.sym}"
        )


def weight_quant_of(model_cfg: ModelConfig) -> WeightQuant:
    """`model.weight_quant` as a WeightQuant (a config.yaml read by model_config_from_dict gives a dict)."""
    import dataclasses

    from llmtrain.models.config import WeightQuant

    raw: Any = getattr(model_cfg, "weight_quant", None)
    if raw is None:
        raise ConfigError(
            f"model.converters lists {CONVERTER} but model.weight_quant is not set; give "
            f"model.weight_quant.bits / group_size (or write the model with `llmtrain quantize`)"
        )
    if isinstance(raw, dict):
        known = {f.name for f in dataclasses.fields(WeightQuant)}
        if set(raw) - known:
            raise ConfigError(f"model.weight_quant keys {sorted(set(raw) - known)} are unknown; valid: {sorted(known)}")
        raw = WeightQuant(**raw)
    return raw


def spec_of(wq: WeightQuant) -> QuantSpec:
    spec = QuantSpec(bits=wq.bits, group_size=wq.group_size, symmetric=wq.symmetric)
    check_spec(spec, what="model.weight_quant")
    return spec


def tied_to_embedding(model: nn.Module) -> set[str]:
    """Names of the linear layers whose weight is an embedding's (a tied output head): they stay float."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n for n, m in model.named_modules() if type(m) is nn.Linear and id(m.weight) in embedded}


def quantizable_linears(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """{name: nn.Linear} the converter replaces: every plain linear but tied heads and `skip`."""
    keep = tied_to_embedding(model) | set(skip)
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n not in keep}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantized_weights(model_cfg: ModelConfig) -> Callable[[nn.Module], None]:
    """The converter factory: every quantizable nn.Linear becomes a QuantLinear (RTN of its weights)."""
    wq = weight_quant_of(model_cfg)
    spec = spec_of(wq)

    def convert(model: nn.Module) -> None:
        for name, linear in quantizable_linears(model, wq.skip).items():
            check_spec(spec, linear.in_features, f"model.weight_quant (layer {name})")
            replace_module(model, name, QuantLinear.from_linear(linear, spec))

    return convert


def dequantized(model: nn.Module) -> None:
    """In place: every QuantLinear back to a plain nn.Linear holding its dequantised weight."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            replace_module(model, name, m.to_linear())


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as stored: parameters (tied once) and persistent buffers."""
    sd = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    total = 0
    for t in sd.values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


register_converter(CONVERTER, quantized_weights, unconvert=dequantized)
