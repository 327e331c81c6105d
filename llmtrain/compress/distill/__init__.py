"""Knowledge distillation as an Objective: the trainer runs it like any loss, so checkpoints, exact resume,
metrics.jsonl, wandb and preemption work unchanged.

    loss = alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * CE
           + hidden_weight * MSE(proj(student block outputs), teacher block outputs)
           + attention_weight * MiniLM-v2 relation KL (last block's q-q, k-k, v-v self-attention relations)

(Hinton et al. 2015 for the tau^2 factor, which keeps the soft-target gradients on the scale of CE's;
DistilBERT for the loss mix; Wang et al. 2021, MiniLMv2, for relations that need no equal head counts.)

The teacher is a frozen plain module (fp32 or bf16), in eval mode, never in the student's engine: whole on
every rank (`distill.teacher_zero_stage=0`, whatever the student's ZeRO stage), or with
`distill.teacher_zero_stage=3` built partitioned and wrapped in its own optimizer-less ZeRO-3 engine
(ZeRO-Inference, from the DeepSpeed door, with parallel.deepspeed_overrides), so each rank holds 1/dp of it and its forward gathers block by block;
every rank then runs every teacher forward (they are collectives). The student may be tensor parallel
(`parallel.tp`, the teacher whole on every rank): its logits stay split by vocabulary and the KD terms are
computed vocabulary-parallel (`sharded_kd_kl`, `sharded_topk_kd_kl`); block outputs are replicated, so
hidden-state MSE is unchanged; attention relations (local heads only) are refused. With `distill.cache_dir`
the teacher's top-k logits of every training sample are computed once (rank 0) and later looked up by a
hash of the sample's tokens, so the student run pays no teacher forward and any layout reads the cache.
Held-out evaluation is the student's plain CE (so its perplexity compares with a run without teacher).

The package is split by concern: `losses` (KD terms and the features they read), `teacher` (loading it,
whole or ZeRO-3 through the DeepSpeed door), `cache` (the teacher-logit cache), `objective` (`Distill`,
wrapped around the student family's own objective). This module validates and runs; every name is
importable from `llmtrain.compress.distill`.

Shape legend:  B batch  T sequence  V vocabulary  N scored positions  k cached logits per position
"""

from __future__ import annotations

from typing import Any

from llmtrain.compress.distill.cache import TeacherCache, build_cache, ensure_cache, row_keys
from llmtrain.compress.distill.losses import (
    capture,
    distill_loss,
    kd_kl,
    layer_map,
    relation_kl,
    sharded_kd_kl,
    sharded_topk_kd_kl,
    split_qkv,
    topk_kd_kl,
)
from llmtrain.compress.distill.objective import Distill
from llmtrain.compress.distill.teacher import check_pair, load_teacher
from llmtrain.config import Config, ConfigError

__all__ = [
    "Distill",
    "TeacherCache",
    "build_cache",
    "capture",
    "check_pair",
    "distill_loss",
    "ensure_cache",
    "kd_kl",
    "layer_map",
    "load_teacher",
    "relation_kl",
    "row_keys",
    "run_distill",
    "sharded_kd_kl",
    "sharded_topk_kd_kl",
    "split_qkv",
    "topk_kd_kl",
    "validate_distill",
]


def validate_distill(cfg: Config) -> None:
    """The distill.* keys and the layouts distillation supports; ConfigError naming the key and the fix."""
    d = cfg.distill
    if cfg.train.objective != "family":
        raise ConfigError(
            f"train.objective={cfg.train.objective} is not a distillation objective (launchers/distill.py wraps "
            f"the student family's own loss); set train.objective=family, or run launchers/train.py for "
            f"{cfg.train.objective}"
        )
    if not d.teacher and not d.cache_dir:
        raise ConfigError(
            "distillation needs distill.teacher=<checkpoint, run or HF directory> (or a complete distill.cache_dir)"
        )
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be in [0, 1]; got {d.alpha}")
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature must be > 0; got {d.temperature}")
    if d.top_k < 1:
        raise ConfigError(f"distill.top_k must be >= 1; got {d.top_k}")
    if d.teacher_zero_stage not in (0, 3):
        raise ConfigError(
            f"distill.teacher_zero_stage must be 0 (whole teacher on every rank) or 3 (teacher "
            f"partitioned over the data-parallel ranks); got {d.teacher_zero_stage}"
        )
    if d.teacher_zero_stage == 3 and d.cache_dir:
        raise ConfigError(
            "distill.cache_dir is built by rank 0 alone with the whole teacher; set "
            "distill.teacher_zero_stage=0 (or distill.cache_dir='')"
        )
    if cfg.parallel.pp > 1:
        raise ConfigError(
            "distillation runs on data parallel with ZeRO 0-3 and tensor parallel (the teacher whole "
            "on every rank), not on a pipeline; set parallel.pp=1"
        )
    if cfg.parallel.tp > 1 and d.attention_weight:
        raise ConfigError(
            "distill.attention_weight reads the student's whole q/k/v, which parallel.tp > 1 splits "
            "by head over the ranks; set distill.attention_weight=0 or parallel.tp=1"
        )
    if cfg.parallel.tp > 1 and d.teacher_zero_stage == 3:
        raise ConfigError(
            "distill.teacher_zero_stage=3 is not supported with parallel.tp > 1; set "
            "distill.teacher_zero_stage=0 (the teacher whole on every rank) or parallel.tp=1"
        )


def run_distill(cfg: Config) -> dict[str, Any]:
    """Every rank calls this: load the teacher (and its cache), then train the student with the Distill objective."""
    import os

    from llmtrain.config import derive
    from llmtrain.parallel.engine import init_distributed
    from llmtrain.train.trainer import train

    validate_distill(cfg)
    derived = derive(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # a bad layout fails before the teacher loads
    info = init_distributed(cfg.parallel.collective_timeout_s)
    d = cfg.distill
    teacher, teacher_cfg, cache = None, None, None
    if d.teacher:
        teacher, teacher_cfg = load_teacher(
            d.teacher, d.teacher_precision, info.device, d.teacher_zero_stage, cfg.parallel.deepspeed_overrides
        )
        check_pair(cfg.model, teacher_cfg)
    if d.cache_dir:
        cache = ensure_cache(cfg, teacher, info.device, derived)
        teacher = None  # logits come from the cache: free the teacher's memory
    return train(cfg, Distill(d, cfg.model, teacher, teacher_cfg, cache))
