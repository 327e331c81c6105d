"""Distillation losses (KD, top-k KD, their vocabulary-parallel forms, attention relations) and the
features they read (block outputs and the last block's q/k/v, captured with forward hooks).

Shape legend:  V vocabulary  N scored positions  k cached logits per position
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import UserError

if TYPE_CHECKING:
    from llmtrain.models.config import ModelConfig
    from llmtrain.models.spec import Transformer


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over rows (N, V) of KL(softmax(teacher/tau) || softmax(student/tau))."""
    t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    s = F.log_softmax(student_logits.float() / tau, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def topk_kd_kl(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, indices: torch.Tensor, tau: float
) -> torch.Tensor:
    """KL from the teacher's top-k log-probs at temperature tau (N, k), with all its other tokens as one
    bucket: sum_i p_i log(p_i / q_i) + p_rest log(p_rest / q_rest). The tail bucket keeps the student from
    being taught zero mass outside the top-k (renormalising over the top-k would). Equals kd_kl when k = V."""
    s = F.log_softmax(student_logits.float() / tau, dim=-1).gather(-1, indices.long())  # (N, k)
    return _topk_rows(teacher_logprobs.float(), s).mean()


def _topk_rows(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-row top-k KL (N,) from the teacher's and the student's log-probs at the same k tokens (N, k)."""
    p_rest = (1 - t.exp().sum(-1)).clamp_min(0.0)  # (N,)
    q_rest = (1 - s.exp().sum(-1)).clamp_min(1e-12)
    tail = p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log())
    return (t.exp() * (t - s)).sum(-1) + tail


# Tensor parallel: the student's logits are split by vocabulary over the TP ranks (rank r holds columns
# r*V/tp ..), so each rank computes its columns' share of every row and the shares are summed (Megatron's g);
# rows are weighted (1 scored, 0 not) rather than indexed, and the mean is over the scored rows, as above.


def sharded_kd_kl(
    student_local: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor, tau: float, group: Any
) -> torch.Tensor:
    """kd_kl of the scored rows from this rank's student columns (N, V/tp) and the teacher's full logits (N, V)."""
    import torch.distributed as dist

    from llmtrain.parallel.tensor_parallel import reduce_from_tp, vocab_parallel_log_softmax

    width = student_local.shape[-1]
    start = dist.get_rank(group) * width
    s = vocab_parallel_log_softmax(student_local.float() / tau, group)  # (N, V/tp)
    t = F.log_softmax(teacher_logits.float() / tau, dim=-1)[:, start : start + width]  # normalised over all of V
    rows = reduce_from_tp((t.exp() * (t - s)).sum(-1), group)  # (N,)
    return (rows * weights).sum() / weights.sum()


def sharded_topk_kd_kl(
    student_local: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    tau: float,
    group: Any,
) -> torch.Tensor:
    """topk_kd_kl of the scored rows from this rank's student columns (N, V/tp); `indices` (N, k) count in the
    whole vocabulary: each rank gathers those in its columns (0 elsewhere) and the gathers are summed."""
    import torch.distributed as dist

    from llmtrain.parallel.tensor_parallel import reduce_from_tp, vocab_parallel_log_softmax

    width = student_local.shape[-1]
    local = indices.long() - dist.get_rank(group) * width
    inside = (local >= 0) & (local < width)
    s = vocab_parallel_log_softmax(student_local.float() / tau, group)  # (N, V/tp)
    s = s.gather(-1, local.clamp(0, width - 1)).masked_fill(~inside, 0.0)  # (N, k), this rank's entries
    rows = _topk_rows(teacher_logprobs.float(), reduce_from_tp(s, group))  # (N,)
    return (rows * weights).sum() / weights.sum()


def _vocab_shard(logits: Any) -> tuple[torch.Tensor, Any] | None:
    """(this rank's vocabulary columns, the tensor-parallel group) of DTensor logits; None for plain ones."""
    from torch.distributed.tensor import DTensor

    if not isinstance(logits, DTensor):
        return None
    return logits.to_local(), logits.device_mesh.get_group()


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float, tau: float
) -> torch.Tensor:
    """alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * CE over rows whose label != -100."""
    keep = labels != -100
    ce = F.cross_entropy(student_logits.float()[keep], labels[keep])
    return alpha * tau**2 * kd_kl(student_logits[keep], teacher_logits[keep], tau) + (1 - alpha) * ce


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """MiniLM-v2 self-attention relations of (B, T, W) activations split into `heads` relation heads:
    KL(teacher relations || student relations), mean over (B, heads, T) rows."""

    def relations(x: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        if W % heads:
            raise UserError(f"distill.relation_heads={heads} must divide the attention width {W}")
        x = x.float().view(B, T, heads, W // heads).transpose(1, 2)  # (B, r, T, W/r)
        scores = x @ x.transpose(-1, -2) / math.sqrt(W // heads)  # (B, r, T, T)
        if causal:
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        return F.log_softmax(scores, dim=-1)

    t, s = relations(teacher), relations(student)
    p = t.exp()
    return (p * (t - s)).nan_to_num(0.0).sum(-1).mean()  # masked entries: 0 * (-inf - -inf)


@contextmanager
def capture(model: nn.Module, blocks: bool, qkv: bool) -> Iterator[dict[str, Any]]:
    feats: dict[str, Any] = {"blocks": []}
    handles = []
    layers = list(cast("Transformer", model).blocks)
    if blocks:
        for b in layers:
            handles.append(b.register_forward_hook(lambda _m, _a, out: feats["blocks"].append(out)))
    if qkv:
        qkv_layer = layers[-1].get_submodule("attn.qkv")
        handles.append(qkv_layer.register_forward_hook(lambda _m, _a, out: feats.__setitem__("qkv", out)))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """The fused projection's rows are [q (nh*hs); k (nkv*hs); v (nkv*hs)] in every llmtrain model."""
    hs = getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head
    nkv = getattr(cfg, "n_kv_head", None) or cfg.n_head
    return qkv.split([cfg.n_head * hs, nkv * hs, nkv * hs], dim=-1)


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher block matched to each student block: uniform, last to last (student i -> teacher
    round((i+1) * Lt / Ls) - 1)."""
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]
