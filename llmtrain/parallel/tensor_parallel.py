"""Tensor parallel, Megatron-style, applied from outside to the plain model as a plan (module name -> style).

Styles:
    column       y_r = x W_r^T + b_r: the layer's output features split over the TP ranks (MLP up)
    column_qkv   column over a fused [q; k; v] projection: rank r holds heads r*nh/tp.. of q and
                 r*nkv/tp.. of k and v (grouped-query attention keeps each query head with its kv head)
    row          y = sum_r x_r W_r^T + b: input features split, partial outputs all-reduced (attn out, MLP down)
    vocab_embed  embedding rows split by vocabulary; each rank looks up its ids, the rest are summed in
    vocab_head   output head split by vocabulary (shares the embedding shard when tied; a bias, such
                 as BERT's output bias, is split on the same rows); returns the logits as a DTensor
                 sharded on the vocabulary dim, so the objective's F.cross_entropy runs as
                 vocabulary-parallel cross-entropy under `loss_parallel()`: the full (B, T, V) (or,
                 for BERT's masked positions, (N, V)) logits never exist on one rank in training
    heads        the attention module computes with its local heads (nh / tp, and nkv / tp where it has
                 kv heads); with dropout, each TP rank draws its own attention-dropout masks
                 (`rank_local_dropout`)

Plans (in each family's folder): GPT (`GPT_TP_PLAN`, `LLAMA_TP_PLAN` with the SwiGLU gate) and BERT (`BERT_TP_PLAN` for the
sequence classifier's trunk, `BERT_PRETRAIN_TP_PLAN` adds the masked-LM decoder). What a plan leaves out
stays whole on every rank: BERT's position and segment embeddings, LayerNorms, pooler, masked-LM
transform (`mlm_dense`), NSP head and classifier, which all read the replicated hidden states that a
row-parallel layer's all-reduce produces.

Why these layers hold plain local tensors rather than DTensor parameters (`parallelize_module`), and
why not DeepSpeed AutoTP: DeepSpeed's ZeRO-1/2 optimizers flatten parameters into contiguous buffers and
its engines all-reduce `.grad` over the data-parallel group; DTensor parameters go through neither (and
DeepSpeed's pipeline sends plain tensors between stages). AutoTP does shard for ZeRO, but picks layers by
name heuristics and its vocabulary-parallel loss is wired to Hugging Face's `loss_function`, and it
creates its own process groups that do not line up with a PipelineModule's grid. Local shards with two
autograd functions (Megatron's f and g) work with all three engines; DTensor is used only where it
fits: for the sharded logits and torch's vocabulary-parallel cross-entropy (`loss_parallel`).

Sharded parameters carry `tensor_model_parallel = True`, which DeepSpeed's gradient-norm code reads to
count each shard once and every replicated parameter once (on TP rank 0).
"""

from __future__ import annotations

import fnmatch
import functools
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import UserError

# The plans live in the families' folders (models/<family>/tp.py); kept importable here.
from llmtrain.models.bert.tp import BERT_PRETRAIN_TP_PLAN, BERT_TP_PLAN  # noqa: E402
from llmtrain.models.gpt.tp import GPT_TP_PLAN, LLAMA_TP_PLAN  # noqa: E402

if TYPE_CHECKING:
    from llmtrain.models.config import ModelConfig

__all__ = [
    "GPT_TP_PLAN",
    "LLAMA_TP_PLAN",
    "BERT_TP_PLAN",
    "BERT_PRETRAIN_TP_PLAN",
    "plan_for",
    "apply_tensor_parallel",
    "full_logits",
    "loss_context",
    "vocab_parallel_log_softmax",
]


class _CopyToTP(torch.autograd.Function):
    """Megatron's f: identity forward; backward sums the input-gradient over the TP ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's g: forward sums partial outputs over the TP ranks; backward is the identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_from_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum partial values over the TP ranks (Megatron's g: backward passes the gradient through unchanged)."""
    return _ReduceFromTP.apply(x, group)


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """log_softmax over a last dim split across the TP ranks: max and sum of exp are all-reduced in
    forward; backward is grad - softmax * (sum of grad over the whole vocabulary), that sum all-reduced."""

    @staticmethod
    def forward(ctx, x, group):
        top = x.max(dim=-1, keepdim=True).values  # (..., 1)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = x - top
        total = shifted.exp().sum(dim=-1, keepdim=True)
        dist.all_reduce(total, group=group)
        out = shifted - total.log()
        ctx.group = group
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        total = grad.sum(dim=-1, keepdim=True).contiguous()
        dist.all_reduce(total, group=ctx.group)
        return grad - out.exp() * total, None


def vocab_parallel_log_softmax(local: torch.Tensor, group: Any) -> torch.Tensor:
    """This rank's columns of log_softmax(x, dim=-1), from its columns `local` (..., V / tp) of x. (torch's
    F.log_softmax on a vocabulary-sharded DTensor under `loss_parallel` gives the right values but wrong
    gradients for losses other than its own cross-entropy.)"""
    return _VocabParallelLogSoftmax.apply(local.contiguous(), group)


class TPShard(Protocol):
    """The attributes a tensor-parallel shard's Parameter carries (DeepSpeed reads the first)."""

    tensor_model_parallel: bool
    llmtrain_tp_shard: tuple[int, torch.Tensor]  # (dim, the indices of the whole tensor along it)


def _shard_param(full: torch.Tensor, index: torch.Tensor | slice, dim: int) -> nn.Parameter:
    if isinstance(index, slice):
        index = torch.arange(index.start, index.stop)
    # a frozen weight (a LoRA base) stays frozen
    p = nn.Parameter(full.detach().index_select(dim, index.to(full.device)).clone(), requires_grad=full.requires_grad)
    shard = cast(TPShard, p)
    shard.tensor_model_parallel = True
    shard.llmtrain_tp_shard = (dim, index)  # which rows/columns of the whole tensor: for checkpoints
    return p


def _identity(weight: torch.Tensor) -> torch.Tensor:
    return weight


def weight_transform_of(linear: nn.Linear) -> Any:
    """What a converted linear does to its weight in forward (QAT's fake quantisation: the `weight_transform`
    of llmtrain/compress/quant/qat.py's FakeQuantLinear), applied by the sharded layer to its local shard;
    the identity for a plain nn.Linear. A transform that works per row, or per group of input columns that
    a shard holds whole, gives each shard exactly its slice of the whole weight's result."""
    return getattr(linear, "weight_transform", None) or _identity


def _lora_shards(
    module: nn.Module, linear: nn.Linear, b_rows: torch.Tensor | None = None, a_cols: slice | None = None
) -> bool:
    """Give the tensor-parallel `module` the adapters of a LoRA `linear` (llmtrain/models/lora.py) under their
    plain names (`lora_a`, `lora_b`): B sharded on its output rows (column parallel) or A on its input
    columns (row parallel), as the base weight is, the other one whole. False for a plain linear."""
    a, b = getattr(linear, "lora_a", None), getattr(linear, "lora_b", None)
    if a is None or b is None:
        return False
    module.register_parameter("lora_a", _shard_param(a, a_cols, 1) if a_cols is not None else a)
    module.register_parameter("lora_b", _shard_param(b, b_rows, 0) if b_rows is not None else b)
    setattr(module, "lora_scale", getattr(linear, "lora_scale"))
    setattr(module, "lora_dropout", getattr(linear, "lora_dropout"))
    return True


class ColumnParallelLinear(nn.Module):
    lora_a: nn.Parameter  # LoRA adapters, where the linear had them (`_lora_shards`)
    lora_b: nn.Parameter
    lora_scale: float
    lora_dropout: nn.Module

    def __init__(self, linear: nn.Linear, group: Any, rank: int, size: int, blocks: list[int] | None = None):
        super().__init__()
        blocks = blocks or [linear.out_features]
        if sum(blocks) != linear.out_features or any(b % size for b in blocks):
            raise UserError(
                f"output blocks {blocks} of {linear.out_features} features cannot each be split over {size} ranks"
            )
        # rows of each stacked block (q, k, v) that belong to this rank
        starts = [sum(blocks[:i]) for i in range(len(blocks))]
        rows = torch.cat(
            [torch.arange(s + rank * (b // size), s + (rank + 1) * (b // size)) for s, b in zip(starts, blocks)]
        )
        self.group = group
        self.weight = _shard_param(linear.weight, rows, 0)
        self.bias = _shard_param(linear.bias, rows, 0) if linear.bias is not None else None
        self.weight_transform = weight_transform_of(linear)
        self.lora = _lora_shards(self, linear, b_rows=rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_transform(self.weight)
        y = F.linear(_CopyToTP.apply(x, self.group), weight, self.bias)  # (..., out / tp)
        if not self.lora:
            return y
        # LoRA: A is whole on every rank and B split by output rows like W. Each rank's B rows see all of
        # h = A x, so h's gradient is summed over the TP ranks (f), which makes A's gradient whole everywhere.
        h = _CopyToTP.apply(F.linear(self.lora_dropout(x), self.lora_a), self.group)  # (..., r)
        return y + self.lora_scale * F.linear(h, self.lora_b)


class RowParallelLinear(nn.Module):
    lora_a: nn.Parameter  # LoRA adapters, where the linear had them (`_lora_shards`)
    lora_b: nn.Parameter
    lora_scale: float
    lora_dropout: nn.Module

    def __init__(self, linear: nn.Linear, group: Any, rank: int, size: int):
        super().__init__()
        local = linear.in_features // size
        self.group = group
        self.weight = _shard_param(linear.weight, slice(rank * local, (rank + 1) * local), 1)
        self.bias = linear.bias  # replicated: added once, after the sum
        self.weight_transform = weight_transform_of(linear)
        self.lora = _lora_shards(self, linear, a_cols=slice(rank * local, (rank + 1) * local))
        self.cols, self.in_features = slice(rank * local, (rank + 1) * local), linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ReduceFromTP.apply(F.linear(x, self.weight_transform(self.weight)), self.group)  # (..., out)
        if self.lora:
            # LoRA: A split by input columns like W (partial A x summed over the ranks), B whole on every rank
            h = _ReduceFromTP.apply(F.linear(self._lora_dropout(x), self.lora_a), self.group)  # (..., r)
            y = y + self.lora_scale * F.linear(h, self.lora_b)
        return y + self.bias if self.bias is not None else y

    def _lora_dropout(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's dropout on this rank's input columns: one mask over the whole width (the same draw on
        every TP rank, which share the RNG state), sliced, so the ranks' columns get independent masks."""
        p = getattr(self.lora_dropout, "p", 0.0)
        if not self.training or p == 0:
            return x
        keep = torch.empty(*x.shape[:-1], self.in_features, device=x.device, dtype=x.dtype).bernoulli_(1 - p)
        return x * keep[..., self.cols] / (1 - p)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding, group: Any, rank: int, size: int):
        super().__init__()
        local = embedding.num_embeddings // size
        self.start, self.stop, self.group = rank * local, (rank + 1) * local, group
        self.weight = _shard_param(embedding.weight, slice(self.start, self.stop), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        local = torch.where(outside, 0, ids - self.start)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, C) partial
        return _ReduceFromTP.apply(x, self.group)


class VocabParallelHead(nn.Module):
    """Logits for this rank's vocabulary rows (+ their bias, if any), returned as a DTensor sharded on
    the last dim."""

    def __init__(
        self, weight: nn.Parameter, group: Any, mesh: Any, bias: nn.Parameter | None = None, transform: Any = None
    ):
        super().__init__()
        self.weight, self.bias, self.group, self.mesh = weight, bias, group, mesh
        self.weight_transform = transform or _identity  # an untied head's (whole rows: per-row groups hold)

    def forward(self, x: torch.Tensor):
        from torch.distributed.tensor import DTensor, Shard

        weight = self.weight_transform(self.weight)
        local = F.linear(_CopyToTP.apply(x, self.group), weight, self.bias)  # (..., V / tp)
        return DTensor.from_local(local, self.mesh, [Shard(local.dim() - 1)], run_check=False)


def rank_local_dropout(attend: Any, module: nn.Module, tp_rank: int) -> Any:
    """Attention dropout that differs between tensor-parallel ranks.

    Every TP rank holds the same global RNG state (one seed, the same ops), which is what dropout on
    replicated activations needs. Attention probabilities are sharded by head, though: with the shared
    state, local head i of every rank would get the same mask (head i and head i + nh/tp correlated).
    Each call therefore draws one seed from the global CPU generator (the same draw on every TP rank, so
    the states stay in step) and runs the attention core in a forked RNG seeded with seed + tp_rank.
    Activation checkpointing restores the global state before recomputing, so the draw, and the masks,
    repeat exactly in backward. (Megatron keeps a separate model-parallel RNG state for this instead,
    and needs its own checkpoint function to restore it.) Only installed when dropout > 0: torch.compile
    runs this attention core eagerly.
    """

    @torch.compiler.disable
    @functools.wraps(attend)
    def wrapped(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not module.training:
            return attend(q, *args, **kwargs)
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # CPU generator: no device sync
        local = (seed + 1_000_003 * tp_rank) % (2**63)
        devices = [q.device] if q.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=q.device.type if devices else "cuda"):
            torch.default_generator.manual_seed(local)
            if devices:
                torch.get_device_module(q.device).manual_seed(local)  # this process's device only
            return attend(q, *args, **kwargs)

    return wrapped


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str], group: Any, mesh: Any) -> list[str]:
    """Shard `model` in place per `plan` over the TP process `group` (and its 1-D DeviceMesh `mesh`).

    Every rank must hold the same full, initialised weights before the call: each keeps its slice.
    Returns the names of the modules that were replaced or adapted.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    tied = (
        hasattr(model, "lm_head")
        and hasattr(model, "wte")
        and model.get_submodule("lm_head").weight is model.get_submodule("wte").weight
    )
    done = []
    for pattern, style in plan.items():
        names = [n for n, _ in model.named_modules() if fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise ValueError(f"tensor-parallel plan: no module of {type(model).__name__} matches {pattern!r}")
        for name in names:
            module = model.get_submodule(name)
            if style == "heads":  # the attention splits its fused projection by these local counts
                for count in ("n_head", "n_kv_head"):  # BERT's attention has no separate kv heads
                    if hasattr(module, count):
                        setattr(module, count, getattr(module, count) // size)
                if getattr(module, "dropout", 0.0) > 0 and hasattr(module, "attend"):
                    module.attend = rank_local_dropout(module.attend, module, rank)
                continue
            new = _build(style, module, model, tied, group, mesh, rank, size)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            done.append(name)
    return done


_M = TypeVar("_M", bound=nn.Module)


def _expect(module: nn.Module, cls: type[_M], style: str) -> _M:
    """`module` as the layer type that tensor-parallel `style` replaces (a family's plan names the wrong
    module otherwise)."""
    if not isinstance(module, cls):
        raise TypeError(f"tensor-parallel style {style!r} replaces an nn.{cls.__name__}, got {type(module).__name__}")
    return module


def _build(
    style: str, module: nn.Module, model: nn.Module, tied: bool, group: Any, mesh: Any, rank: int, size: int
) -> nn.Module:
    if style == "column":
        return ColumnParallelLinear(_expect(module, nn.Linear, style), group, rank, size)
    if style == "column_qkv":
        c = cast("ModelConfig", model.cfg)
        hs = getattr(c, "head_dim", None) or c.n_embd // c.n_head
        n_kv = getattr(c, "n_kv_head", None) or c.n_head
        return ColumnParallelLinear(
            _expect(module, nn.Linear, style), group, rank, size, blocks=[c.n_head * hs, n_kv * hs, n_kv * hs]
        )
    if style == "row":
        return RowParallelLinear(_expect(module, nn.Linear, style), group, rank, size)
    if style == "vocab_embed":
        return VocabParallelEmbedding(_expect(module, nn.Embedding, style), group, rank, size)
    if style == "vocab_head":
        head = _expect(module, nn.Linear, style)
        local = head.out_features // size
        rows = slice(rank * local, (rank + 1) * local)  # the rows of the vocab_embed shard on this rank
        weight = model.get_parameter("wte.weight") if tied else _shard_param(head.weight, rows, 0)
        bias = _shard_param(head.bias, rows, 0) if head.bias is not None else None
        return VocabParallelHead(weight, group, mesh, bias, weight_transform_of(head))
    raise ValueError(
        f"unknown tensor-parallel style {style!r}; known: column, column_qkv, row, vocab_embed, vocab_head, heads"
    )


def plan_for(model: nn.Module) -> dict[str, str]:
    """The tensor-parallel plan of `model` (plans are data, one per family: its spec's `tp_plan`)."""
    from llmtrain.models.registry import family_of

    return family_of(model.cfg).tp_plan(model)


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """Gather vocabulary-sharded logits (for generation); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def loss_context(tp: int):
    """The context in which objectives and their backward run: vocabulary-parallel cross-entropy when tp > 1."""
    import contextlib

    if tp == 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()
