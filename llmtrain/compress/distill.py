"""Knowledge distillation as an Objective: the trainer runs it like any loss, so checkpoints, exact resume,
metrics.jsonl, wandb and preemption work unchanged.

    loss = alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * CE
           + hidden_weight * MSE(proj(student block outputs), teacher block outputs)
           + attention_weight * MiniLM-v2 relation KL (last block's q-q, k-k, v-v self-attention relations)

(Hinton et al. 2015 for the tau^2 factor, which keeps the soft-target gradients on the scale of CE's;
DistilBERT for the loss mix; Wang et al. 2021, MiniLMv2, for relations that need no equal head counts.)

The teacher is a frozen plain module (fp32 or bf16), in eval mode, never in the student's engine: whole on
every rank (`distill.teacher_zero_stage=0`, whatever the student's ZeRO stage), or with
`distill.teacher_zero_stage=3` built inside `deepspeed.zero.Init` and wrapped in its own optimizer-less
ZeRO-3 engine (ZeRO-Inference), so each rank holds 1/dp of it and its forward gathers block by block;
every rank then runs every teacher forward (they are collectives). The student may be tensor parallel
(`parallel.tp`, the teacher whole on every rank): its logits stay split by vocabulary and the KD terms are
computed vocabulary-parallel (`sharded_kd_kl`, `sharded_topk_kd_kl`); block outputs are replicated, so
hidden-state MSE is unchanged; attention relations (local heads only) are refused. With `distill.cache_dir`
the teacher's top-k logits of every training sample are computed once (rank 0) and later looked up by a
hash of the sample's tokens, so the student run pays no teacher forward and any layout reads the cache.
Held-out evaluation is the student's plain CE (so its perplexity compares with a run without teacher).

Shape legend:  B batch  T sequence  V vocabulary  N scored positions  k cached logits per position
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import UserError
from llmtrain.compress.config import DistillConfig
from llmtrain.models.objective import MetricSums, local_loss
from llmtrain.models.registry import family_of

# ---------------------------------------------------------------------------------------------
# Losses


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over rows (N, V) of KL(softmax(teacher/tau) || softmax(student/tau))."""
    t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    s = F.log_softmax(student_logits.float() / tau, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def topk_kd_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, indices: torch.Tensor,
               tau: float) -> torch.Tensor:
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


def sharded_kd_kl(student_local: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor, tau: float,
                  group: Any) -> torch.Tensor:
    """kd_kl of the scored rows from this rank's student columns (N, V/tp) and the teacher's full logits (N, V)."""
    import torch.distributed as dist

    from llmtrain.parallel.tensor_parallel import reduce_from_tp, vocab_parallel_log_softmax

    width = student_local.shape[-1]
    start = dist.get_rank(group) * width
    s = vocab_parallel_log_softmax(student_local.float() / tau, group)  # (N, V/tp)
    t = F.log_softmax(teacher_logits.float() / tau, dim=-1)[:, start:start + width]  # normalised over all of V
    rows = reduce_from_tp((t.exp() * (t - s)).sum(-1), group)  # (N,)
    return (rows * weights).sum() / weights.sum()


def sharded_topk_kd_kl(student_local: torch.Tensor, teacher_logprobs: torch.Tensor, indices: torch.Tensor,
                       weights: torch.Tensor, tau: float, group: Any) -> torch.Tensor:
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


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 alpha: float, tau: float) -> torch.Tensor:
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
            raise ValueError(f"distill.relation_heads={heads} must divide the attention width {W}")
        x = x.float().view(B, T, heads, W // heads).transpose(1, 2)  # (B, r, T, W/r)
        scores = x @ x.transpose(-1, -2) / math.sqrt(W // heads)  # (B, r, T, T)
        if causal:
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        return F.log_softmax(scores, dim=-1)

    t, s = relations(teacher), relations(student)
    p = t.exp()
    return (p * (t - s)).nan_to_num(0.0).sum(-1).mean()  # masked entries: 0 * (-inf - -inf)


# ---------------------------------------------------------------------------------------------
# Features: block outputs and the last block's q/k/v, read with forward hooks


@contextmanager
def capture(model: nn.Module, blocks: bool, qkv: bool) -> Iterator[dict[str, Any]]:
    feats: dict[str, Any] = {"blocks": []}
    handles = []
    layers = list(model.blocks)
    if blocks:
        for b in layers:
            handles.append(b.register_forward_hook(lambda _m, _a, out: feats["blocks"].append(out)))
    if qkv:
        handles.append(layers[-1].attn.qkv.register_forward_hook(lambda _m, _a, out: feats.__setitem__("qkv", out)))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def split_qkv(qkv: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, ...]:
    """The fused projection's rows are [q (nh*hs); k (nkv*hs); v (nkv*hs)] in every llmtrain model."""
    hs = getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head
    nkv = getattr(cfg, "n_kv_head", None) or cfg.n_head
    return qkv.split([cfg.n_head * hs, nkv * hs, nkv * hs], dim=-1)


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher block matched to each student block: uniform, last to last (student i -> teacher
    round((i+1) * Lt / Ls) - 1)."""
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


# ---------------------------------------------------------------------------------------------
# Teacher-logit cache


def row_keys(input_ids: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash per row of (B, T) token ids (wrapping integer arithmetic, the same on any device)."""
    g = torch.Generator().manual_seed(0x5EED)
    mult = torch.randint(1, 2**62, (input_ids.shape[-1],), generator=g, dtype=torch.int64)
    return (input_ids.long().cpu() * mult).sum(-1) ^ input_ids.shape[-1]


class TeacherCache:
    """Top-k teacher logits of every training sample of a run, found by the hash of its tokens."""

    META = "meta.json"

    def __init__(self, directory: str | Path):
        from safetensors.torch import load_file

        self.dir = Path(directory)
        self.meta = json.loads((self.dir / self.META).read_text())
        parts = [load_file(str(self.dir / f)) for f in self.meta["files"]]
        self.values = torch.cat([p["values"] for p in parts])  # (rows, T, k) teacher log-probs at meta's tau
        self.indices = torch.cat([p["indices"] for p in parts])  # (rows, T, k) int32
        keys = torch.cat([p["keys"] for p in parts]).tolist()
        self.row = {k: i for i, k in enumerate(keys)}

    @staticmethod
    def complete(directory: str | Path) -> bool:
        return (Path(directory) / TeacherCache.META).is_file()

    def lookup(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher log-probs, token indices), each (B, T, k), on input_ids' device."""
        try:
            rows = torch.tensor([self.row[k] for k in row_keys(input_ids).tolist()])
        except KeyError:
            raise ValueError(f"a training sample is not in the teacher cache {self.dir} (built for "
                             f"{self.meta['describe']}); delete the directory to rebuild it for this run, or "
                             f"point distill.cache_dir at a new one") from None
        dev = input_ids.device
        return self.values[rows].to(dev), self.indices[rows].to(dev)


def _all_position_logits(teacher: nn.Module, mb: dict[str, torch.Tensor], rows: torch.Tensor,
                         device: torch.device) -> torch.Tensor:
    """The teacher's vocabulary logits at every position of the chosen rows, (b, T, V). A BERT teacher's
    masked-LM head runs on all positions: which ones a student is scored on is read from its batch later
    (the input ids, which the cache is keyed by, fix the teacher's output but not the chosen positions)."""
    ids = mb["input_ids"][rows].to(device)
    if "mlm_labels" in mb:
        return teacher(ids, mb["token_type_ids"][rows].to(device), mb["attention_mask"][rows].to(device))[0]
    return teacher(ids)


@torch.no_grad()
def build_cache(directory: str | Path, teacher: nn.Module, batches: Iterator[dict[str, torch.Tensor]], top_k: int,
                tau: float, describe: str, total: int, device: torch.device, rows_per_file: int = 4096) -> None:
    """Run the teacher over `batches` once and write its top-k log-probs at temperature `tau`; meta.json
    last (its presence = complete)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files, buf, n_rows = [], {"keys": [], "values": [], "indices": []}, 0

    def flush() -> None:
        if buf["keys"]:
            name = f"part_{len(files):05d}.safetensors"
            save_file({k: torch.cat(v).contiguous() for k, v in buf.items()}, str(directory / name))
            files.append(name)
            for v in buf.values():
                v.clear()

    seen: set[int] = set()
    for mb in tqdm(batches, total=total, desc="teacher cache", unit="batch", disable=None):
        ids = mb["input_ids"]
        keys = row_keys(ids)
        new = torch.tensor([k not in seen for k in keys.tolist()])
        if not new.any():
            continue
        seen.update(keys[new].tolist())
        logprobs = F.log_softmax(_all_position_logits(teacher, mb, new, device).float() / tau, dim=-1)  # (b, T, V)
        vals, idx = logprobs.topk(top_k, dim=-1)  # (b, T, k)
        buf["keys"].append(keys[new])
        buf["values"].append(vals.cpu())
        buf["indices"].append(idx.int().cpu())
        n_rows += int(new.sum())
        if sum(len(k) for k in buf["keys"]) >= rows_per_file:
            flush()
    flush()
    meta = {"files": files, "rows": n_rows, "top_k": top_k, "temperature": tau, "describe": describe}
    tmp = directory / (TeacherCache.META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(directory / TeacherCache.META)


# ---------------------------------------------------------------------------------------------
# The objective


class Distill:
    """Student loss against a frozen teacher (or its cached top-k logits); see the module docstring."""

    def __init__(self, cfg: DistillConfig, student_cfg: Any, teacher: nn.Module | None = None,
                 teacher_cfg: Any = None, cache: TeacherCache | None = None):
        if teacher is None and cache is None:
            raise UserError("distillation needs a teacher (distill.teacher) or a teacher cache (distill.cache_dir)")
        if cache is not None and (cfg.hidden_weight or cfg.attention_weight):
            raise UserError("distill.cache_dir holds logits only; hidden-state and attention transfer need the "
                             "teacher's forward: set distill.hidden_weight=0 and distill.attention_weight=0, or "
                             "distill.cache_dir=''")
        self.cfg, self.student_cfg, self.teacher, self.teacher_cfg, self.cache = cfg, student_cfg, teacher, teacher_cfg, cache
        self.bert = not family_of(student_cfg).generative
        self.generative = not self.bert
        self.sums = MetricSums()

    def attach(self, model: nn.Module) -> None:
        """Give the student the learned projections of hidden-state transfer when widths differ (they are
        trained, checkpointed and resumed with it; plain-model loaders ignore them)."""
        if not self.cfg.hidden_weight or self.teacher_cfg.n_embd == self.student_cfg.n_embd:
            return
        proj = nn.ModuleList(nn.Linear(self.student_cfg.n_embd, self.teacher_cfg.n_embd, bias=False)
                             for _ in range(self.student_cfg.n_layer))
        for p in proj:
            nn.init.eye_(p.weight)  # a pruned student's kept channels come first in the teacher's order
        model.distill_proj = proj.to(next(model.parameters()).device)

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scored logits (N, V), their labels (N,), the student's own loss). Under tensor parallel the logits
        are a DTensor split by vocabulary and the loss its vocabulary-parallel cross-entropy's local value."""
        if self.bert:
            labels = batch["mlm_labels"]
            chosen = labels != -100
            mlm, nsp = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], chosen)
            own = (local_loss(F.cross_entropy(mlm.float(), labels[chosen]))
                   + F.cross_entropy(nsp.float(), batch["nsp_labels"]))
            return mlm, labels[chosen], own
        logits = model(batch["input_ids"]).flatten(0, 1)  # (B*T, V)
        labels = batch["labels"].flatten()
        return logits, labels, local_loss(F.cross_entropy(logits.float(), labels, ignore_index=-100))

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        plain = getattr(model, "module", model)  # DeepSpeed's engine.eval() flags only the module it wraps
        if not plain.training:
            return self._forward(model, batch)[2]  # held-out: the student's own loss
        c = self.cfg
        with capture(plain, c.hidden_weight > 0, c.attention_weight > 0) as s_feats:
            logits, labels, own = self._forward(model, batch)
        keep = labels != -100
        shard = _vocab_shard(logits)  # tensor parallel: (this rank's columns, the TP group)
        if self.cache is not None:
            logprobs, indices = self.cache.lookup(batch["input_ids"])  # (B, T, k) each
            scored = batch["mlm_labels"] != -100 if self.bert else slice(None)  # BERT: the masked positions
            logprobs, indices = logprobs[scored].flatten(0, -2), indices[scored].flatten(0, -2)  # (N, k)
            if shard is not None:
                kd = sharded_topk_kd_kl(shard[0], logprobs, indices, keep.float(), c.temperature, shard[1])
            else:
                kd = topk_kd_kl(logits[keep], logprobs[keep], indices[keep], c.temperature)
            t_feats: dict[str, Any] = {}
        else:
            t_plain = getattr(self.teacher, "module", self.teacher)  # a ZeRO-3 teacher is an inference engine
            with torch.no_grad(), capture(t_plain, c.hidden_weight > 0, c.attention_weight > 0) as t_feats:
                t_logits = self._forward(self.teacher, batch)[0]
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
        total = 0.0
        for i, j in enumerate(layer_map(len(student), len(teacher))):
            h = proj[i](student[i]) if proj is not None else student[i]
            total = total + F.mse_loss(h.float(), teacher[j].float())
        return total / len(student)

    def _relations(self, student_qkv: torch.Tensor, teacher_qkv: torch.Tensor) -> torch.Tensor:
        s = split_qkv(student_qkv, self.student_cfg)
        t = split_qkv(teacher_qkv, self.teacher_cfg)
        return sum(relation_kl(a, b, self.cfg.relation_heads, causal=not self.bert) for a, b in zip(s, t)) / 3

    def pop_metrics(self, training: bool) -> dict[str, torch.Tensor]:
        return self.sums.pop(training)


# ---------------------------------------------------------------------------------------------
# Entry: teacher, cache, then the ordinary trainer


def validate_distill(cfg: Any) -> None:
    d = cfg.distill
    if not d.teacher and not d.cache_dir:
        raise ValueError("distillation needs distill.teacher=<checkpoint, run or HF directory> (or a complete "
                         "distill.cache_dir)")
    if not 0.0 <= d.alpha <= 1.0:
        raise ValueError(f"distill.alpha must be in [0, 1]; got {d.alpha}")
    if d.temperature <= 0:
        raise ValueError(f"distill.temperature must be > 0; got {d.temperature}")
    if d.top_k < 1:
        raise ValueError(f"distill.top_k must be >= 1; got {d.top_k}")
    if d.teacher_zero_stage not in (0, 3):
        raise ValueError(f"distill.teacher_zero_stage must be 0 (whole teacher on every rank) or 3 (teacher "
                         f"partitioned over the data-parallel ranks); got {d.teacher_zero_stage}")
    if d.teacher_zero_stage == 3 and d.cache_dir:
        raise ValueError("distill.cache_dir is built by rank 0 alone with the whole teacher; set "
                         "distill.teacher_zero_stage=0 (or distill.cache_dir='')")
    if cfg.parallel.pp > 1:
        raise ValueError("distillation runs on data parallel with ZeRO 0-3 and tensor parallel (the teacher whole "
                         "on every rank), not on a pipeline; set parallel.pp=1")
    if cfg.parallel.tp > 1 and d.attention_weight:
        raise ValueError("distill.attention_weight reads the student's whole q/k/v, which parallel.tp > 1 splits "
                         "by head over the ranks; set distill.attention_weight=0 or parallel.tp=1")
    if cfg.parallel.tp > 1 and d.teacher_zero_stage == 3:
        raise ValueError("distill.teacher_zero_stage=3 is not supported with parallel.tp > 1; set "
                         "distill.teacher_zero_stage=0 (the teacher whole on every rank) or parallel.tp=1")


def load_teacher(path: str, precision: str, device: torch.device, zero_stage: int = 0) -> tuple[nn.Module, Any]:
    """A frozen, eval-mode module of the teacher: an llmtrain checkpoint, run or consolidated directory, or a
    Hugging Face directory / GGUF file, imported on the fly through llmtrain's HF interop. zero_stage=3
    (collective: every rank calls it) returns a ZeRO-3 inference engine around it instead of a whole module."""
    import tempfile

    from llmtrain.models import build_model
    from llmtrain.parallel.consolidate import iter_model_weights, load_model_weights

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        with tempfile.TemporaryDirectory(prefix="llmtrain-teacher-") as tmp:
            if (Path(path) / "config.json").is_file() or Path(path).suffix == ".gguf":
                from llmtrain.interop.cli import import_hf

                path = import_hf(path, Path(tmp) / "teacher")
            if zero_stage == 3:
                cfg, weights = iter_model_weights(path)
                return _zero3_teacher(path, cfg, weights, dtype), cfg
            cfg, state = load_model_weights(path)
    except ValueError as exc:
        raise ValueError(f"distill.teacher: {exc}") from None
    teacher = build_model(cfg)
    teacher.load_state_dict(state)
    return teacher.to(device=device, dtype=dtype).eval().requires_grad_(False), cfg


def _zero3_teacher(path: Any, cfg: Any, weights: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype) -> nn.Module:
    """Build the teacher inside deepspeed.zero.Init (each rank allocates only its partition of every parameter),
    copy the checkpoint in one parameter at a time (gathered, written by rank 0, re-partitioned), and wrap it
    in an optimizer-less ZeRO-3 engine whose hooks gather each module's parameters for its forward."""
    import dataclasses

    import deepspeed

    from llmtrain.models import build_model
    from llmtrain.utils import rank

    # Every parameter partitioned, however small (the default keeps those under 1e5 elements whole). No
    # memory-efficient linear: zero.Init would swap torch.nn.functional.linear for the whole process (the
    # student's layers too) to save activations for a backward the teacher never runs.
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "memory_efficient_linear": False}
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
          "bf16": {"enabled": dtype == torch.bfloat16}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    # the dtype comes from the config: zero.Init's own dtype argument is ignored on devices without fp16
    # (DeepSpeed 0.19 makes such parameters bf16 whatever is asked)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        teacher = build_model(dataclasses.replace(cfg, init_from=None))
    params = dict(teacher.named_parameters())  # tied weights once, as the checkpoint yields them
    seen = set()
    with torch.no_grad():
        for name, tensor in weights:
            p = params.get(name)
            if p is None or tuple(p.ds_shape) != tuple(tensor.shape):
                raise ValueError(f"{path}: parameter '{name}' {tuple(tensor.shape)} does not fit the teacher "
                                 f"built from its own config; the checkpoint is inconsistent")
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank() == 0:
                    p.data.copy_(tensor)
            seen.add(name)
    missing = [n for n in params if n not in seen]
    if missing:
        raise ValueError(f"{path} has no weight for '{missing[0]}'; it is incomplete")
    teacher.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    engine.eval()
    local = sum(p.ds_tensor.numel() for p in teacher.parameters())
    total = sum(p.ds_numel for p in teacher.parameters())
    kind = next(teacher.parameters()).ds_tensor.dtype
    print(f"teacher ZeRO-3: rank {rank()} holds {local} of {total} teacher parameter elements ({kind})", flush=True)
    return engine


def check_pair(student: Any, teacher: Any) -> None:
    s_family, t_family = family_of(student).name, family_of(teacher).name
    if student.vocab_size != teacher.vocab_size or s_family != t_family:
        raise ValueError(f"student and teacher must share the tokenizer and family: student model.arch="
                         f"{s_family} vocab_size={student.vocab_size}, teacher arch={t_family} vocab_size="
                         f"{teacher.vocab_size}; set model.vocab_size={teacher.vocab_size} (and the same data.tokenizer)")


def ensure_cache(cfg: Any, teacher: nn.Module | None, device: torch.device) -> TeacherCache:
    """Build distill.cache_dir on rank 0 when it is not complete (every training sample of the run), then
    every rank loads it."""
    from llmtrain.data import build_data
    from llmtrain.utils import barrier, print0, rank

    d, t = cfg.distill, cfg.train
    if not TeacherCache.complete(d.cache_dir):
        if teacher is None:
            raise ValueError(f"distill.cache_dir={d.cache_dir} is not complete and there is no distill.teacher to build it")
        if rank() == 0:
            data = build_data(cfg.data, seq_len=t.seq_len, seed=t.seed, micro_batch_size=t.micro_batch_size,
                              grad_accum=t.global_batch_size // t.micro_batch_size, dp_rank=0, dp_size=1)
            batches = (mb for s in range(t.max_steps) for mb in data.train_batches(s))
            describe = f"teacher {d.teacher}, seed {t.seed}, {t.max_steps} steps of {t.global_batch_size} x {t.seq_len}"
            print0(f"building the teacher cache {d.cache_dir}: {describe}, top-{d.top_k}")
            build_cache(d.cache_dir, teacher, batches, d.top_k, d.temperature, describe,
                        t.max_steps * (t.global_batch_size // t.micro_batch_size), device)
        barrier()
    cache = TeacherCache(d.cache_dir)
    for key in ("top_k", "temperature"):
        if cache.meta.get(key) != getattr(d, key):
            raise ValueError(f"distill.cache_dir={d.cache_dir} was built with {key}={cache.meta.get(key)} but "
                             f"distill.{key}={getattr(d, key)}; set distill.{key}={cache.meta.get(key)} or use a new "
                             f"cache_dir")
    return cache


def run_distill(cfg: Any) -> dict[str, Any]:
    """Every rank calls this: load the teacher (and its cache), then train the student with the Distill objective."""
    import os

    from llmtrain.config import derive
    from llmtrain.parallel.engine import init_distributed
    from llmtrain.train.trainer import train

    validate_distill(cfg)
    derive(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # a bad layout fails before the teacher loads
    info = init_distributed(cfg.parallel.collective_timeout_s)
    d = cfg.distill
    teacher, teacher_cfg, cache = None, None, None
    if d.teacher:
        teacher, teacher_cfg = load_teacher(d.teacher, d.teacher_precision, info.device, d.teacher_zero_stage)
        check_pair(cfg.model, teacher_cfg)
    if d.cache_dir:
        cache = ensure_cache(cfg, teacher, info.device)
        teacher = None  # logits come from the cache: free the teacher's memory
    return train(cfg, Distill(d, cfg.model, teacher, teacher_cfg, cache))
