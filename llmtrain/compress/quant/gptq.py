"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantise a linear layer's weight one input column at a time, and after each column spread
its rounding error over the columns not yet quantised, weighted by the inverse Hessian of the layer's
squared output error, H = 2 X^T X over calibration inputs X (tokens, in).

    for each column j (in blocks of whole groups, updates to later blocks applied lazily):
        q_j   = round onto the grid of its group (scale/zero from the group's current, already
                error-compensated weights, when j starts a group)
        e     = (w_j - dequant(q_j)) / U[j, j]              # U = upper Cholesky factor of H^-1
        w_k  -= e * U[j, k]  for k > j

Dampening adds `damp` x mean(diag H) to the diagonal (H is often singular: dead inputs, few tokens);
inputs that never fire (diag 0) get weight 0. No activation reordering: with group-wise scales it would
need static groups, and the gain at these sizes is small. All integers and scales come from grid.py, so
the result is stored exactly like round-to-nearest's.

Calibration (`HessianCollector`): forward hooks on the float model add each linear's inputs to its H
over the calibration batches in one pass; every layer is then quantised from its float inputs (not
block by block through already-quantised layers, which costs a forward per block).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmtrain.compress.quant.grid import QuantSpec, group_params, quantize


class HessianCollector:
    """Forward hooks accumulating H = 2/n sum x x^T (float32, (in, in)) of each named linear's input."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.h = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
        self.count = dict.fromkeys(linears, 0)
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (tokens, in)
            n, seen = x.shape[0], self.count[name]
            # running mean of 2 x x^T, so H keeps its scale whatever the number of tokens
            self.h[name].mul_(seen / (seen + n)).addmm_(x.t(), x, alpha=2.0 / (seen + n))
            self.count[name] = seen + n

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q (out, in) integers, scale (out, groups), zero (out, groups)) of weight `w` (out, in) given the
    Hessian `h` (in, in) of its inputs; grid.dequantize(q, scale, zero, spec) is the quantised weight."""
    w = w.detach().float().clone()
    out_f, in_f = w.shape
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    u = _inverse_cholesky_upper(h)

    gs = spec.group_size or in_f
    groups = in_f // gs
    scale = torch.empty(out_f, groups)
    zero = torch.empty(out_f, groups)
    q = torch.empty(out_f, in_f, dtype=torch.int8 if spec.sym else torch.uint8)
    row = QuantSpec(spec.bits, 0, spec.sym)  # one group per row: the grid of one column slice
    if not spec.group_size:  # per-channel: scales from the whole (un-compensated) row, as usual
        scale[:, :1], zero[:, :1] = group_params(w, row)
    # blocks of whole groups, so a group's scale is taken from weights already compensated within the block
    block = max(gs, block // gs * gs) if spec.group_size else block
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            j = b0 + i
            g = j // gs
            if spec.group_size and j % gs == 0:
                scale[:, g : g + 1], zero[:, g : g + 1] = group_params(wb[:, i : i + gs], row)
            s, z = scale[:, g : g + 1], zero[:, g : g + 1]
            col = wb[:, i : i + 1]
            qc = quantize(col, s, z, row)
            q[:, j] = qc[:, 0]
            e = (col - (qc.float() - z) * s) / ub[i, i]
            wb[:, i:] -= e * ub[i : i + 1, i:]
            err[:, i : i + 1] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q, scale, zero


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of h^-1, adding dampening until h is positive definite."""
    eye = torch.eye(h.shape[0])
    extra = 1e-6 * float(torch.mean(torch.diag(h)))
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            up, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return up
        h = h + extra * eye
        extra *= 10
    raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even after dampening")
