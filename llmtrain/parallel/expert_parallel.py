"""Expert parallel (`parallel.ep`): each MoE block's experts computed on ep data-parallel ranks, tokens all-to-all.

An ep group is ep consecutive data-parallel replicas (`ParallelDims.ep_group`). Rank i of a group computes
experts [i*E/ep, (i+1)*E/ep) of every MoE block for the tokens of all ep ranks:

    route locally (router, top-k, capacity drop: the same decisions as ep = 1, on this rank's tokens)
    -> all-to-all the kept assignments' hidden states to the ranks that own their experts (counts first)
    -> each rank runs its experts on what it received -> all-to-all the results back -> weight and sum

Both all-to-alls are `torch.distributed.nn.functional.all_to_all_single` (differentiable: its backward is the
reverse all-to-all), which gloo implements with uneven splits, so it runs on CPU.

Parameters, gradients and optimizer state (ZeRO 0-2). Each rank keeps only its E/ep experts: every stacked
expert parameter is sliced on dim 0 to [i*E/ep, (i+1)*E/ep) after the (seeded, whole) initialisation, so the
values are those of ep = 1. DeepSpeed's MoE machinery does the rest (`engine.expert_data_parallel`): the slices
are tagged as its expert parameters (`allreduce=False`, `group_name`), put in their own optimizer groups, and
their gradients averaged over the expert-data-parallel group (the dp/ep ranks holding the same experts: i,
i+ep, ...) divided by the whole dp size, while dense parameters keep the ordinary dp average; ZeRO-1/2 partition
an expert group's optimizer state over its expert-data-parallel ranks. That is exactly the ep = 1 gradient: the
gradient of a rank's expert slice already holds the contributions of all ep ranks' tokens (the reverse
all-to-all), so summing it over the ranks holding the same experts sums over every data-parallel rank once.
ZeRO-3 partitions every parameter over the whole dp group, which sliced experts cannot join: ep > 1 refuses it
(config.py:_check_moe). Checkpoints stay ep-free: universal.py gathers the slices over the ep group on save and
keeps this rank's slice on load (`llmtrain_ep_shard`), so a run resumes on any ep.
What ep buys: expert parameters, gradients and optimizer state / ep per rank, and each rank runs E/ep experts.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from llmtrain.models.gpt.moe import MoE, moe_layers


class ExpertParallel:
    """The dispatch of one rank of an ep group (`group`, `size` ranks, this one `index`)."""

    def __init__(self, group: Any, size: int, index: int):
        self.group, self.size, self.index = group, size, index

    def experts_of(self, moe: MoE) -> range:
        """The expert ids this rank holds and computes."""
        per_rank = moe.num_experts // self.size
        return range(self.index * per_rank, (self.index + 1) * per_rank)

    def _exchange(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        from torch.distributed.nn.functional import all_to_all_single

        out = x.new_empty((sum(recv), *x.shape[1:]))
        return all_to_all_single(out, x.contiguous(), recv, send, group=self.group)

    def dispatch(
        self, moe: MoE, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """What `MoE.dispatch` computes, with expert e run on rank e // (E/ep) of the group."""
        import torch.distributed as dist

        per_rank = moe.num_experts // self.size
        tok, slot = torch.where(keep)  # kept assignments, token-major
        experts = top_i[tok, slot]
        order = torch.sort(experts, stable=True).indices  # by expert (hence by owner rank), tokens in order
        tok, slot, experts = tok[order], slot[order], experts[order]
        send_counts = torch.bincount(experts // per_rank, minlength=self.size)  # (ep,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        recv_experts = torch.empty(sum(recv), dtype=experts.dtype, device=experts.device)
        dist.all_to_all_single(recv_experts, experts, recv, send, group=self.group)
        rows = self._exchange(x[tok], send, recv)  # (received, C): tokens of every rank for my experts
        # my experts on what arrived, expert by expert (rows of one source rank are sorted by expert)
        done = torch.zeros_like(rows)
        parts = []
        mine = self.experts_of(moe)
        for e in mine:
            idx = torch.where(recv_experts == e)[0]
            if idx.numel():
                parts.append((idx, moe.experts.expert(e - mine.start, rows[idx])))  # local slice index
        if parts:
            done = done.index_put((torch.cat([i for i, _ in parts]),), torch.cat([y for _, y in parts]))
        else:  # no token for my experts: keep the expert weights in the graph (zero gradient, not None)
            done = done + 0.0 * sum(p.sum() for p in moe.experts.parameters())
        back = self._exchange(done, recv, send)  # (kept assignments, C) in `order`
        out = torch.zeros_like(x)
        return out.index_add(0, tok, back * top_w[tok, slot, None])


def apply_expert_parallel(model: torch.nn.Module, ep: ExpertParallel) -> list[torch.nn.Parameter]:
    """Route every MoE block of the plain model through `ep` (replaces `dispatch` on the instance) and keep only
    this rank's experts of each: the stacked parameters sliced in place on dim 0 (the Parameter objects, hence
    their names, stay), each tagged `llmtrain_ep_shard` = (index, size). Returns the sliced parameters."""
    sliced = []
    for layer in moe_layers(model):
        layer.dispatch = functools.partial(ep.dispatch, layer)  # type: ignore[method-assign]
        mine = ep.experts_of(layer)
        for p in layer.experts.parameters():
            with torch.no_grad():
                p.data = p.data[mine.start : mine.stop].clone()  # (E/ep, ...)
            p.llmtrain_ep_shard = (ep.index, ep.size)  # type: ignore[attr-defined]
            sliced.append(p)
    return sliced


def gather_experts(t: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """The whole (E, ...) stack from every ep rank's (E/ep, ...) slice of it (collective over the ep group)."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def local_experts(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's slice of a whole (E, ...) expert stack (`param` tagged by apply_expert_parallel)."""
    index, size = param.llmtrain_ep_shard  # type: ignore[attr-defined]
    return full.chunk(size, dim=0)[index]


def expert_parallel_grad_norm(params: list[torch.nn.Parameter], group: Any) -> float:
    """Global L2 gradient norm when the expert slices differ between the ranks of the ep `group` and the rest
    is replicated (after the data-parallel reduction): dense squares here, expert squares summed over the group.
    The sum of squares as layout.model_parallel_grad_norm takes it (the same figure as every other layout)."""
    import torch.distributed as dist

    dense = torch.zeros((), dtype=torch.float32)
    expert = torch.zeros((), dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum().cpu()
        if hasattr(p, "llmtrain_ep_shard"):
            expert += sq
        else:
            dense += sq
    dist.all_reduce(expert, op=dist.ReduceOp.SUM, group=group)
    return (dense + expert).sqrt().item()
