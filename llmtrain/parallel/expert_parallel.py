"""Expert parallel (`parallel.ep`): each MoE block's experts computed on ep data-parallel ranks, tokens all-to-all.

An ep group is ep consecutive data-parallel replicas (`ParallelDims.ep_group`). Rank i of a group computes
experts [i*E/ep, (i+1)*E/ep) of every MoE block for the tokens of all ep ranks:

    route locally (router, top-k, capacity drop: the same decisions as ep = 1, on this rank's tokens)
    -> all-to-all the kept assignments' hidden states to the ranks that own their experts (counts first)
    -> each rank runs its experts on what it received -> all-to-all the results back -> weight and sum

Both all-to-alls are `torch.distributed.nn.functional.all_to_all_single` (differentiable: its backward is the
reverse all-to-all), which gloo implements with uneven splits, so it runs on CPU.

Parameters and gradients. The expert weights stay whole on every rank (stacked (E, ...) tensors), so DeepSpeed,
ZeRO 0-3 and universal checkpoints see the same parameters as with ep = 1 (a checkpoint resumes on any ep).
On a rank only its own experts' slices get gradient (the others' are zero); that gradient already holds the
contributions of all ep ranks' tokens, through the reverse all-to-all. DeepSpeed's data-parallel average
(sum over dp ranks / dp) then gives exactly the ep = 1 gradient, so no separate expert-parallel reduction
group is needed (DeepSpeed's MoE instead keeps E/ep experts per rank and reduces them over its
expert-data-parallel group; that saves the replicated expert memory, which ZeRO-3 here saves instead).
What ep buys is expert compute and activation memory: each rank runs E/ep experts per block.
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
        for e in range(self.index * per_rank, (self.index + 1) * per_rank):
            idx = torch.where(recv_experts == e)[0]
            if idx.numel():
                parts.append((idx, moe.experts.expert(e, rows[idx])))
        if parts:
            done = done.index_put((torch.cat([i for i, _ in parts]),), torch.cat([y for _, y in parts]))
        else:  # no token for my experts: keep the expert weights in the graph (zero gradient, not None)
            done = done + 0.0 * sum(p.sum() for p in moe.experts.parameters())
        back = self._exchange(done, recv, send)  # (kept assignments, C) in `order`
        out = torch.zeros_like(x)
        return out.index_add(0, tok, back * top_w[tok, slot, None])


def apply_expert_parallel(model: torch.nn.Module, ep: ExpertParallel) -> int:
    """Route every MoE block of the plain model through `ep` (replaces `dispatch` on the instance); the count."""
    layers = moe_layers(model)
    for layer in layers:
        layer.dispatch = functools.partial(ep.dispatch, layer)  # type: ignore[method-assign]
    return len(layers)
