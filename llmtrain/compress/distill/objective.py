"""`Distill`: the student's loss against a frozen teacher (or its cached top-k logits), wrapped around the
student family's own objective, so the student's forward (packed-document masks included) and its loss
are the family's, and only the teacher terms are added here.

Shape legend:  B batch  T sequence  V vocabulary  N scored positions  k cached logits per position
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.compress.config import DistillConfig
from llmtrain.compress.distill.cache import TeacherCache
from llmtrain.compress.distill.losses import (
    _vocab_shard,
    capture,
    kd_kl,
    layer_map,
    relation_kl,
    sharded_kd_kl,
    sharded_topk_kd_kl,
    split_qkv,
    topk_kd_kl,
)
from llmtrain.config import ConfigError
from llmtrain.models.objective import MetricSums
from llmtrain.models.registry import family_of

if TYPE_CHECKING:
    from llmtrain.models.config import ModelConfig


class ScoringObjective(Protocol):
    """A family's objective as distillation uses it: the scored positions' logits, labels and own loss."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def scored(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def positions(self, batch: dict[str, torch.Tensor]) -> slice | torch.Tensor: ...


class Distill:
    """Student loss against a frozen teacher (or its cached top-k logits); see the module docstring."""

    def __init__(
        self,
        cfg: DistillConfig,
        student_cfg: ModelConfig,
        teacher: nn.Module | None = None,
        teacher_cfg: ModelConfig | None = None,
        cache: TeacherCache | None = None,
    ):
        if teacher is None and cache is None:
            raise ConfigError("distillation needs a teacher (distill.teacher) or a teacher cache (distill.cache_dir)")
        if cache is not None and (cfg.hidden_weight or cfg.attention_weight):
            raise ConfigError(
                "distill.cache_dir holds logits only; hidden-state and attention transfer need the "
                "teacher's forward: set distill.hidden_weight=0 and distill.attention_weight=0, or "
                "distill.cache_dir=''"
            )
        if cache is not None and getattr(student_cfg, "num_labels", None):
            raise ConfigError(
                "distill.cache_dir holds per-token logits; a classifier student (model.num_labels > 0) "
                "distils from its teacher's class logits: set distill.cache_dir='' (the teacher runs live)"
            )
        if teacher is not None and teacher_cfg is None:
            raise TypeError("Distill: a teacher needs its model config (teacher_cfg)")
        self.cfg, self.student_cfg, self.teacher, self.cache = cfg, student_cfg, teacher, cache
        # a cache alone needs no teacher shape (its logits only: no hidden-state or attention transfer)
        self.teacher_cfg: ModelConfig = teacher_cfg if teacher_cfg is not None else student_cfg
        family = family_of(student_cfg)
        # the student's own objective: its forward and its loss (every family's objective scores positions)
        self.base = cast(ScoringObjective, family.objective())
        self.teacher_base = (
            cast(ScoringObjective, family_of(teacher_cfg).objective()) if teacher_cfg is not None else self.base
        )
        self.generative = family.generative  # a decoder: causal attention relations, text samples make sense
        self.sums = MetricSums()

    def attach(self, model: nn.Module) -> None:
        """Give the student the learned projections of hidden-state transfer when widths differ (they are
        trained, checkpointed and resumed with it; plain-model loaders ignore them)."""
        if not self.cfg.hidden_weight or self.teacher_cfg.n_embd == self.student_cfg.n_embd:
            return
        proj = nn.ModuleList(
            nn.Linear(self.student_cfg.n_embd, self.teacher_cfg.n_embd, bias=False)
            for _ in range(self.student_cfg.n_layer)
        )
        for p in proj:
            # a pruned student's kept channels come first in the teacher's order
            nn.init.eye_(cast(nn.Linear, p).weight)
        model.distill_proj = proj.to(next(model.parameters()).device)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        plain = getattr(model, "module", model)  # DeepSpeed's engine.eval() flags only the module it wraps
        if not plain.training:
            return self.base.scored(model, batch)[2]  # held-out: the student's own loss
        c = self.cfg
        with capture(plain, c.hidden_weight > 0, c.attention_weight > 0) as s_feats:
            logits, labels, own = self.base.scored(model, batch)  # (N, V), (N,), the family's loss
        keep = labels != -100
        shard = _vocab_shard(logits)  # tensor parallel: (this rank's columns, the TP group)
        if self.cache is not None:
            logprobs, indices = self.cache.lookup(batch["input_ids"])  # (B, T, k) each
            scored = self.base.positions(batch)  # the positions the family scores (BERT: the masked ones)
            logprobs, indices = logprobs[scored].flatten(0, -2), indices[scored].flatten(0, -2)  # (N, k)
            if shard is not None:
                kd = sharded_topk_kd_kl(shard[0], logprobs, indices, keep.float(), c.temperature, shard[1])
            else:
                kd = topk_kd_kl(logits[keep], logprobs[keep], indices[keep], c.temperature)
            t_feats: dict[str, Any] = {}
        else:
            assert self.teacher is not None  # __init__: a teacher or a cache
            t_plain = getattr(self.teacher, "module", self.teacher)  # a ZeRO-3 teacher is an inference engine
            with torch.no_grad(), capture(t_plain, c.hidden_weight > 0, c.attention_weight > 0) as t_feats:
                t_logits = self.teacher_base.scored(self.teacher, batch)[0]
            if shard is not None:
                kd = sharded_kd_kl(shard[0], t_logits, keep.float(), c.temperature, shard[1])
            else:
                kd = kd_kl(logits[keep], t_logits[keep], c.temperature)
        loss = c.alpha * c.temperature**2 * kd + (1 - c.alpha) * own
        parts = {"kd_loss": kd, "ce_loss": own}
        if c.hidden_weight:
            parts["hidden_loss"] = self._hidden(plain, s_feats["blocks"], t_feats["blocks"])
            loss = loss + c.hidden_weight * parts["hidden_loss"]
        if c.attention_weight:
            parts["attention_loss"] = self._relations(s_feats["qkv"], t_feats["qkv"])
            loss = loss + c.attention_weight * parts["attention_loss"]
        self.sums.add(**parts)
        return loss

    def _hidden(self, plain: nn.Module, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        proj = getattr(plain, "distill_proj", None)
        total: torch.Tensor | float = 0.0
        for i, j in enumerate(layer_map(len(student), len(teacher))):
            h = proj[i](student[i]) if proj is not None else student[i]
            total = total + F.mse_loss(h.float(), teacher[j].float())
        assert isinstance(total, torch.Tensor)  # a model has at least one block
        return total / len(student)

    def _relations(self, student_qkv: torch.Tensor, teacher_qkv: torch.Tensor) -> torch.Tensor:
        s = split_qkv(student_qkv, self.student_cfg)
        t = split_qkv(teacher_qkv, self.teacher_cfg)
        q, k, v = (relation_kl(a, b, self.cfg.relation_heads, causal=self.generative) for a, b in zip(s, t))
        return (q + k + v) / 3

    def pop_metrics(self, training: bool) -> dict[str, torch.Tensor]:
        # a mixture-of-experts student's router statistics (moe_*) from its own objective, too
        own = self.base.pop_metrics(training) if hasattr(self.base, "pop_metrics") else {}
        if self.teacher_base is not self.base and hasattr(self.teacher_base, "pop_metrics"):
            self.teacher_base.pop_metrics(training)  # an MoE teacher's: not the student's
        return {**{k: v for k, v in own.items() if k.startswith("moe_")}, **self.sums.pop(training)}
