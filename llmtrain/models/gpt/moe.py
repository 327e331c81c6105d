"""Mixture-of-experts feed-forward for the decoder (`model.moe`): Mixtral-style sparse blocks (imports only torch).

Shape legend (as model.py): N tokens of the block (B*T), C n_embd, H expert width, E experts, k top_k.

Router: logits = router(x) (N, E) with no bias; probabilities softmax(logits) in fp32; each token goes to its
top-k experts, weighted by their probabilities renormalised over the k (Mixtral's routing, so imported Mixtral
weights give transformers' logits). Experts are SwiGLU MLPs stored stacked, `experts.gate` / `experts.up`
(E, H, C) and `experts.down` (E, C, H) (transformers 5's MixtralExperts layout, split into gate and up).

Capacity (`capacity_factor` > 0): expert e keeps at most ceil(capacity_factor * N * k / E) of the assignments
routed to it, earlier tokens first (Switch Transformer's order); a dropped assignment contributes nothing (the
residual stream carries the token on). 0 = dropless.

Auxiliary losses, computed per MoE layer and kept on it for the objective (`moe_aux_losses(model)`):
  load balance (Switch, Mixtral's `load_balancing_loss_func` per layer): E * sum_e f_e * P_e, f_e the fraction of
    the N * k assignments routed to e and P_e the mean router probability of e (1 when balanced);
  z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.

Expert parallel (`parallel.ep`, llmtrain/parallel/expert_parallel.py) replaces `dispatch` on the instance: the
routing (and the capacity drop) stays local to the rank, only the expert computation moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import ConfigError


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward in every decoder block (Mixtral-style; llmtrain/models/gpt/moe.py)."""

    # Experts per block (each a SwiGLU MLP of width model.intermediate_size).
    num_experts: int = 8
    # Experts each token is routed to; their router probabilities are renormalised over these k (Mixtral).
    top_k: int = 2
    # Expert capacity = ceil(capacity_factor * tokens * top_k / num_experts) assignments; the rest are dropped
    # (earlier tokens first). 0 = dropless (every assignment computed).
    capacity_factor: float = 0.0
    # Weight of the load-balancing loss (Switch / Mixtral) added to the training loss; 0 = logged only.
    aux_loss_coef: float = 0.01
    # Weight of the router z-loss (ST-MoE: mean logsumexp(router logits)^2); 0 = logged only.
    z_loss_coef: float = 0.0
    # Add one always-on SwiGLU expert of the same width beside the routed ones (shared expert, Qwen-MoE/DeepSeek).
    shared_expert: bool = False

    def __post_init__(self) -> None:
        for key in ("num_experts", "top_k"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.moe.{key} must be an integer >= 1, got {v!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} exceeds model.moe.num_experts={self.num_experts}; lower top_k"
            )
        for key in ("capacity_factor", "aux_loss_coef", "z_loss_coef"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"model.moe.{key} must be a number >= 0, got {v!r}")


def moe_config(value: object) -> MoEConfig | None:
    """`model.moe` as read from YAML or a saved config.yaml (a mapping) or already built."""
    if value is None or isinstance(value, MoEConfig):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"model.moe must be a mapping (num_experts, top_k, ...), got {value!r}")
    import dataclasses

    known = {f.name for f in dataclasses.fields(MoEConfig)}
    if set(value) - known:
        raise ConfigError(f"model.moe keys {sorted(set(value) - known)} are unknown; valid: {', '.join(sorted(known))}")
    return MoEConfig(**value)


class Experts(nn.Module):
    """E SwiGLU experts, stacked: expert e maps x (n, C) to down[e] (silu(gate[e] x) * up[e] x).

    Each parameter carries `llmtrain_active_fraction` = top_k / E, the share of it one token runs through:
    FLOPs / MFU (llmtrain/train/flops.py) and `llmtrain plan` count active parameters with it."""

    def __init__(self, num_experts: int, n_embd: int, hidden: int, top_k: int | None = None):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(num_experts, hidden, n_embd))
        self.up = nn.Parameter(torch.empty(num_experts, hidden, n_embd))
        self.down = nn.Parameter(torch.empty(num_experts, n_embd, hidden))
        self.active_fraction = (top_k or num_experts) / num_experts
        self.tag()

    def tag(self) -> None:
        """Mark the parameters with the active fraction (again after `to_empty`, which makes new ones)."""
        for p in (self.gate, self.up, self.down):
            p.llmtrain_active_fraction = self.active_fraction  # type: ignore[attr-defined]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate[e])) * F.linear(x, self.up[e]), self.down[e])


class MoE(nn.Module):
    """Sparse feed-forward: router -> top-k experts (+ optional shared expert). Keeps its last auxiliary
    statistics (`aux`) for the objective."""

    def __init__(self, n_embd: int, hidden: int, moe: MoEConfig, dropout: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = moe.num_experts, moe.top_k, moe.capacity_factor
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.router = nn.Linear(n_embd, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, n_embd, hidden, moe.top_k)
        self.shared = Experts(1, n_embd, hidden) if moe.shared_expert else None  # always on, weight 1
        self.dropout = nn.Dropout(dropout)
        self.aux: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def init_weights(self, std: float, down_std: float) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        self.experts.tag()
        for experts in (self.experts, self.shared) if self.shared is not None else (self.experts,):
            nn.init.normal_(experts.gate, mean=0.0, std=std)
            nn.init.normal_(experts.up, mean=0.0, std=std)
            nn.init.normal_(experts.down, mean=0.0, std=down_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> (top-k expert ids (N, k), their renormalised weights (N, k) in x's dtype, keep mask
        (N, k) bool: False where capacity dropped the assignment); records the auxiliary statistics."""
        N = x.size(0)
        logits = self.router(x).float()  # (N, E)
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        counts = F.one_hot(top_i, self.num_experts).sum(dim=(0, 1))  # (E,) assignments per expert
        balance = self.num_experts * (counts.float() / (N * self.top_k) * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        keep = torch.ones_like(top_i, dtype=torch.bool)
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * N * self.top_k / self.num_experts)
            onehot = F.one_hot(top_i, self.num_experts)  # (N, k, E); token order first, then choice order
            rank = (onehot.flatten(0, 1).cumsum(dim=0).view_as(onehot) * onehot).sum(dim=-1)  # (N, k), 1-based
            keep = rank <= capacity
        dropped = 1.0 - keep.float().mean()
        self.aux = {"balance": balance, "z": z, "dropped": dropped.detach()}
        return top_i, top_p.to(x.dtype), keep

    def dispatch(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Sum over each token's kept assignments of weight * expert(x) (N, C); expert by expert, as Mixtral."""
        out = torch.zeros_like(x)
        w = top_w * keep.to(top_w.dtype)
        for e in range(self.num_experts):
            tok, slot = torch.where((top_i == e) & keep)
            if tok.numel() == 0:
                continue
            out.index_add_(0, tok, self.experts.expert(e, x[tok]) * w[tok, slot, None])
        if not keep.any():  # every assignment dropped: keep the expert weights in the graph (zero gradient)
            out = out + 0.0 * sum(p.sum() for p in self.experts.parameters())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        top_i, top_w, keep = self.route(flat)
        y = self.dispatch(flat, top_i, top_w, keep)
        if self.shared is not None:
            y = y + self.shared.expert(0, flat)
        return self.dropout(y.view(shape))


def active_numel(p: torch.Tensor) -> float:
    """The parameters of `p` one token runs through: all of them, or top_k / E of an expert stack."""
    return p.numel() * getattr(p, "llmtrain_active_fraction", 1.0)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_losses(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Mean over the model's MoE layers of their last forward's load-balance loss, z-loss and dropped
    fraction; None for a dense model."""
    layers = moe_layers(model)
    if not layers or not layers[0].aux:
        return None
    return {k: torch.stack([m.aux[k] for m in layers]).mean() for k in ("balance", "z", "dropped")}
