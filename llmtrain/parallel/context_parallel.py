"""Context parallel (`parallel.cp`): each sequence split over cp ranks; attention by ring attention.

Shape legend (one rank):
    B  batch    T  whole sequence    P  cp ranks    Tc = T / (2P) one chunk    Tl = 2 Tc this rank's tokens
    nh query heads    nkv key/value heads    hs head size

Causal load balance: the sequence is cut into 2P chunks and rank r holds chunks r and 2P-1-r (a front and
a back one), so every rank has the same share of the causal triangle's work.

Ring attention: each rank keeps its queries; the keys and values of its two chunks travel around the ring
(send to the next rank, receive from the previous one, P-1 times, each shift in flight while the block at
hand is computed), and each arriving block is merged into the output with an online softmax (running
log-sum-exp per query row). The backward is written out
(`_RingAttention.backward`): the keys and values travel the same way again while the gradients of each
block's keys and values travel with it, collecting every rank's share, and reach their owner after the
P-th shift. Exact: the same sums as full attention in another order (the tests compare both on one
process, simulating the ring with threads).

Ulysses (`parallel.cp_method=ulysses`, Jacobs et al. 2023, DeepSpeed-Ulysses): an all-to-all turns this
rank's chunks of every head into the whole sequence of nh/P heads; the model's own attention core runs on
them (the same kernel, causal or packed-document mask, as on one rank), and a second all-to-all returns
the output to the chunks. Its backward is the same two all-to-alls reversed (`_AllToAll`). It needs the
query heads (and key/value heads, else they are repeated to nh first) divisible by P.

The model is not changed structurally: `apply_context_parallel` replaces each block's attention core
(`attn.attend`) and the model's forward on the instance, as activation checkpointing does. The runner
(`ContextParallelRunner`) keeps the loader's whole micro-batch (every cp rank of a data-parallel replica
loads the same samples), gives the model this rank's chunks, and scales the loss so that the mean over cp
ranks is the mean over every token of the sequence: loss_r = P * (sum of rank r's token losses) / (valid
tokens of the whole micro-batch). DeepSpeed sees the cp ranks as extra data-parallel ranks (its gradient
average runs over dp x cp ranks), which turns the P-scaled per-rank gradients into the gradient of the
sequence mean.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmtrain.errors import UserError
from llmtrain.models.objective import local_loss
from llmtrain.parallel.runner import EngineRunner

# Start sending a tensor to the next ring rank (on a channel: 0 keys/values, 1 their gradients) and receiving
# the previous rank's; the returned call waits for both and gives the received tensor.
Shift = Callable[[torch.Tensor, int], Callable[[], torch.Tensor]]

# A finite floor for the running log-sum-exp: a query row that has seen no visible key yet (its document
# starts in a later chunk) stays at it, and exp(floor - lse) is exactly 0 once a visible key arrives.
_LSE_FLOOR = -1e30


def chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two chunks (of 2*cp) that context-parallel rank `rank` holds: a front and a back one."""
    return rank, 2 * cp - 1 - rank


def local_index(seq_len: int, rank: int, cp: int) -> torch.Tensor:
    """(Tl,) positions in the whole sequence of the tokens rank `rank` holds, in its order."""
    tc = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * tc, (c + 1) * tc) for c in chunk_ids(rank, cp)])


# ---------------------------------------------------------------------------------------------
# Ring attention


@dataclass
class RingPlan:
    """What one ring-attention call needs besides q, k, v: this rank's place, the shift, the documents."""

    rank: int
    size: int
    shift: Shift
    doc_ids: torch.Tensor | None = None  # (B, T) of the whole sequence (data.doc_mask), else None


def _rep(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, nkv, t, hs) -> (B, nh, t, hs): kv head j serves query heads j*rep .. (j+1)*rep-1."""
    rep = n_head // x.size(1)
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _unrep(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """The gradient of `_rep`: (B, nh, t, hs) summed back onto (B, nkv, t, hs)."""
    B, nh, t, hs = x.shape
    return x if nh == n_kv else x.view(B, n_kv, nh // n_kv, t, hs).sum(2)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (scores and softmax sums never in half precision), fp64 for fp64."""
    return torch.promote_types(q.dtype, torch.float32)


def _pair_scores(
    q: torch.Tensor, k: torch.Tensor, cq: int, ck: int, tc: int, docs: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Masked scores (B, nh, Tc, Tc) of query chunk `cq` against key chunk `ck` (chunk numbers in the
    whole sequence; the caller skips cq < ck, which causality hides entirely)."""
    s = (q @ k.transpose(-1, -2)) * scale
    mask: torch.Tensor | None = None
    if cq == ck:
        mask = torch.ones(tc, tc, dtype=torch.bool, device=q.device).tril()
    if docs is not None:
        dq, dk = docs[:, cq * tc : (cq + 1) * tc], docs[:, ck * tc : (ck + 1) * tc]
        same = (dq[:, :, None] == dk[:, None, :])[:, None]  # (B, 1, Tc, Tc)
        mask = same if mask is None else same & mask
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _pairs(plan: RingPlan, src: int) -> Iterator[tuple[int, int, int, int]]:
    """(query chunk slot, key chunk slot, query chunk, key chunk) that causality lets interact, for the
    block of ring rank `src` on this rank."""
    cqs, cks = chunk_ids(plan.rank, plan.size), chunk_ids(src, plan.size)
    for i, cq in enumerate(cqs):
        for j, ck in enumerate(cks):
            if cq >= ck:
                yield i, j, cq, ck


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, nh, Tl, hs) in q's dtype and the log-sum-exp (B, nh, Tl) in fp32 (or fp64); no autograd."""
    nh, hs = q.size(1), q.size(3)
    tc = q.size(2) // 2
    scale = 1.0 / math.sqrt(hs)
    f = _compute_dtype(q)
    qs = q.to(f).split(tc, dim=2)
    out = [torch.zeros_like(x) for x in qs]
    lse = [torch.full(x.shape[:-1], _LSE_FLOOR, dtype=f, device=q.device) for x in qs]
    kv = torch.stack([k, v])  # travels in the model's dtype
    for step in range(plan.size):
        src = (plan.rank - step) % plan.size
        incoming = plan.shift(kv, 0) if step < plan.size - 1 else None  # in flight while this block computes
        ks, vs = _rep(kv[0].to(f), nh).split(tc, dim=2), _rep(kv[1].to(f), nh).split(tc, dim=2)
        for i, j, cq, ck in _pairs(plan, src):
            s = _pair_scores(qs[i], ks[j], cq, ck, tc, plan.doc_ids, scale)
            new = torch.logaddexp(lse[i], s.logsumexp(-1))
            out[i] = out[i] * (lse[i] - new).exp()[..., None] + (s - new[..., None]).exp() @ vs[j]
            lse[i] = new
        if incoming is not None:
            kv = incoming()
    return torch.cat(out, dim=2).to(q.dtype), torch.cat(lse, dim=2)


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: RingPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v (their dtypes): the softmax backward block by block, with each key/value block's
    gradient travelling around the ring behind it to collect every rank's share."""
    nh, n_kv, hs = q.size(1), k.size(1), q.size(3)
    tc = q.size(2) // 2
    scale = 1.0 / math.sqrt(hs)
    f = _compute_dtype(q)
    qs, dos = q.to(f).split(tc, dim=2), dout.to(f).split(tc, dim=2)
    lses = lse.split(tc, dim=2)
    delta = (dout.to(f) * out.to(f)).sum(-1).split(tc, dim=2)  # (B, nh, Tc): rowsum(dO * O)
    dq = [torch.zeros_like(x) for x in qs]
    kv = torch.stack([k, v])
    arriving = None  # the gradient of the block being computed, summed by the ranks it visited before
    for step in range(plan.size):
        src = (plan.rank - step) % plan.size
        incoming = plan.shift(kv, 0) if step < plan.size - 1 else None  # in flight while this block computes
        kf, vf = _rep(kv[0].to(f), nh), _rep(kv[1].to(f), nh)
        ks, vs = kf.split(tc, dim=2), vf.split(tc, dim=2)
        dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
        dks, dvs = dk.split(tc, dim=2), dv.split(tc, dim=2)
        for i, j, cq, ck in _pairs(plan, src):
            p = (_pair_scores(qs[i], ks[j], cq, ck, tc, plan.doc_ids, scale) - lses[i][..., None]).exp()
            dvs[j].add_(p.transpose(-1, -2) @ dos[i])
            ds = p * (dos[i] @ vs[j].transpose(-1, -2) - delta[i][..., None])
            dq[i].add_((ds @ ks[j]) * scale)
            dks[j].add_((ds.transpose(-1, -2) @ qs[i]) * scale)
        dkv = torch.stack([_unrep(dk, n_kv), _unrep(dv, n_kv)])
        if arriving is not None:
            dkv += arriving()
        if plan.size > 1:  # on to the next rank; after the P-th shift the block's gradient is at its owner
            arriving = plan.shift(dkv, 1)
        if incoming is not None:
            kv = incoming()
    if arriving is not None:
        dkv = arriving()
    return torch.cat(dq, dim=2).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse = ring_forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*ring_backward(dout, q, k, v, out, lse, ctx.plan), None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> torch.Tensor:
    """Causal attention of this rank's queries (B, nh, Tl, hs) over the whole sequence, whose keys and
    values (B, nkv, Tl, hs) are spread over the ring; differentiable (q, k and v)."""
    if q.size(2) % 2:
        raise ValueError(f"ring attention needs an even number of local tokens (two chunks); got {q.size(2)}")
    return _RingAttention.apply(q, k, v, plan)


def process_group_shift(group: Any, ranks: list[int], me: int) -> Shift:
    """The ring's shift over a torch.distributed group (global `ranks` in ring order, this rank at index
    `me`): isend to the next rank and irecv from the previous one, in flight until the returned call (gloo and
    NCCL). Each channel has its own tag; a channel's next shift starts only after its last one was waited for."""
    import torch.distributed as dist

    nxt, prv = ranks[(me + 1) % len(ranks)], ranks[(me - 1) % len(ranks)]

    def shift(t: torch.Tensor, channel: int) -> Callable[[], torch.Tensor]:
        t = t.contiguous()
        got = torch.empty_like(t)
        reqs = [dist.isend(t, nxt, group=group, tag=channel), dist.irecv(got, prv, group=group, tag=channel)]

        def wait() -> torch.Tensor:
            for req in reqs:
                if req is not None:  # None only on a rank outside `group`, which never calls this
                    req.wait()
            return got

        return wait

    return shift


# ---------------------------------------------------------------------------------------------
# Ulysses: all-to-all over heads

Exchange = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # all-to-all: piece j to rank j, one from each


def _all_to_all(x: torch.Tensor, exchange: Exchange, n: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    pieces = [piece.contiguous() for piece in x.chunk(n, dim=scatter_dim)]
    return torch.cat(exchange(pieces), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Split `x` along scatter_dim over the ranks, gather what they send along gather_dim; the backward sends
    each gradient piece back where its value came from (the same all-to-all with the dims swapped)."""

    @staticmethod
    def forward(ctx, x, exchange, n, scatter_dim, gather_dim):
        ctx.args = (exchange, n, gather_dim, scatter_dim)
        return _all_to_all(x, exchange, n, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, *ctx.args), None, None, None, None


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rank: int,
    size: int,
    exchange: Exchange,
    attend: Callable[..., torch.Tensor],
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's chunks (B, nh, Tl, hs) / (B, nkv, Tl, hs) through the whole sequence of
    nh/P heads: `attend(q, k, v, mask)` is the model's attention core, run on the natural token order."""
    nh = q.size(1)
    if k.size(1) % size:  # kv heads that do not split over the ranks: give every query head its own copy
        k, v = _rep(k, nh), _rep(v, nh)
    T = q.size(2) * size
    order = torch.cat([local_index(T, r, size) for r in range(size)]).to(q.device)  # gathered -> whole position
    natural = torch.empty_like(order)
    natural[order] = torch.arange(T, device=q.device)  # whole position -> gathered

    def gather(x: torch.Tensor) -> torch.Tensor:  # (B, n, Tl, hs) -> (B, n/P, T, hs) in sequence order
        return _AllToAll.apply(x, exchange, size, 1, 2)[:, :, natural]

    mask = None
    if doc_ids is not None:
        from llmtrain.models.gpt.model import document_causal_mask

        mask = document_causal_mask(doc_ids)
    y = attend(gather(q), gather(k), gather(v), mask)  # (B, nh/P, T, hs)
    return _AllToAll.apply(y[:, :, order], exchange, size, 2, 1)  # (B, nh, Tl, hs)


def process_group_exchange(group: Any, size: int) -> Exchange:
    """The all-to-all over a torch.distributed group (gloo and NCCL)."""
    import torch.distributed as dist

    def exchange(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        got = [torch.empty_like(p) for p in pieces]
        dist.all_to_all(got, pieces, group=group)
        return got

    return exchange


# ---------------------------------------------------------------------------------------------
# Applying it to a model, and the runner


class ContextParallel:
    """This rank's place in its cp ring and the state of the current forward (the whole micro-batch's
    document ids), shared by the model's patched forward, its attention cores and the runner."""

    def __init__(self, rank: int, size: int, shift: Shift, method: str = "ring", exchange: Exchange | None = None):
        if method not in ("ring", "ulysses") or (method == "ulysses" and exchange is None):
            raise ValueError(f"context parallel method {method!r} (ulysses needs an exchange)")
        self.rank, self.size, self.shift, self.method, self.exchange = rank, size, shift, method, exchange
        self.doc_ids: torch.Tensor | None = None  # (B, T) of the micro-batch being run, or None
        self.seq_len = 0
        self.active = True  # False: whole sequences on every rank (generation, eval tasks)

    def split(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's chunks of each (B, T) tensor of `batch` (doc_ids stay whole: the ring needs every
        chunk's), and the ring's state for the forward that follows."""
        T = batch["input_ids"].size(1)
        if T % (2 * self.size):
            raise UserError(
                f"a sequence of {T} tokens cannot be cut into 2*parallel.cp = {2 * self.size} equal chunks; "
                f"make train.seq_len a multiple of {2 * self.size}"
            )
        idx = local_index(T, self.rank, self.size).to(batch["input_ids"].device)
        self.seq_len, self.doc_ids = T, batch.get("doc_ids")
        return {k: v[:, idx] if v.dim() == 2 and v.size(1) == T else v for k, v in batch.items() if k != "doc_ids"}

    @contextlib.contextmanager
    def whole(self) -> Iterator[None]:
        """Run whole sequences on every rank (no ring) inside the block."""
        self.active = False
        try:
            yield
        finally:
            self.active = True


def apply_context_parallel(model: torch.nn.Module, cp: ContextParallel) -> None:
    """Give `model`'s blocks ring attention and its forward the positions of this rank's chunks, in place
    (parameter names and state dicts unchanged). The model must be the decoder family's: `blocks[i].attn
    .attend(q, k, v, mask)` and `forward(input_ids, cache, position_ids, doc_ids, token_index)`."""
    blocks: Iterable[torch.nn.Module] = model.blocks  # type: ignore[assignment]
    for block in blocks:
        attn: Any = block.attn
        attn.attend = functools.partial(_cp_attend, cp, attn.attend)
    model.forward = functools.partial(_cp_forward, cp, model.forward)


def _cp_attend(
    cp: ContextParallel,
    original: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    if not cp.active:
        return original(q, k, v, mask)
    if cp.method == "ulysses":
        assert cp.exchange is not None
        return ulysses_attention(q, k, v, cp.rank, cp.size, cp.exchange, original, cp.doc_ids)
    return ring_attention(q, k, v, RingPlan(cp.rank, cp.size, cp.shift, cp.doc_ids))


def _cp_forward(
    cp: ContextParallel,
    original: Callable,
    input_ids: torch.Tensor,
    cache: Any = None,
    position_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    if not cp.active:
        return original(input_ids, cache, position_ids=position_ids, doc_ids=doc_ids)
    if cache is not None or doc_ids is not None:
        raise RuntimeError("context parallel: a forward with a cache or local doc_ids (the runner passes neither)")
    index = local_index(cp.seq_len, cp.rank, cp.size).to(input_ids.device)
    return original(input_ids, position_ids=position_ids, token_index=index)


class ContextParallelObjective:
    """The causal LM loss of this rank's chunks, scaled so its mean over the cp ranks is the whole sequence's
    mean: P * (sum of this rank's token losses) / (scored tokens of the whole micro-batch)."""

    def __init__(self, objective: Any, cp: ContextParallel):
        # config.py lets only a family that declares `context_parallel` (spec.py) reach here, with its own
        # objective; anything else in its place has no per-token logits to split
        if not callable(getattr(objective, "logits", None)):
            raise UserError(
                f"parallel.cp > 1 splits the next-token logits of a family's own objective (its logits(model, "
                f"batch)); {type(objective).__name__} has none; set parallel.cp=1"
            )
        self.objective, self.cp = objective, cp
        self.generative = getattr(objective, "generative", False)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`batch` is the whole micro-batch (B, T), as the loader gave it to every cp rank of the replica."""
        n_scored = (batch["labels"] != -100).sum()
        local = self.cp.split(batch)
        logits = self.objective.logits(model, local)  # (B, Tl, V)
        total = F.cross_entropy(
            logits.float().flatten(0, 1), local["labels"].flatten(), ignore_index=-100, reduction="sum"
        )  # with tp > 1 (vocabulary-parallel logits, under loss_parallel) a replicated DTensor
        return local_loss(total) * (self.cp.size / n_scored.clamp(min=1))


class ContextParallelRunner(EngineRunner):
    """Data parallel with ZeRO 0-3 over dp x cp ranks (tensor parallel inside), each sequence split over the
    cp ranks of a replica."""

    def __init__(self, *args: Any, cp: ContextParallel, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cp = cp

    def train_step(self, objective, micro_batches, measure_norm, stop_requested=False):
        return super().train_step(
            ContextParallelObjective(objective, self.cp), micro_batches, measure_norm, stop_requested
        )

    def eval_loss(self, objective, batch):
        return super().eval_loss(ContextParallelObjective(objective, self.cp), batch)

    def logits(self, input_ids):
        with self.cp.whole():
            return super().logits(input_ids)
