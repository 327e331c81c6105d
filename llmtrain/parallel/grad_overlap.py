"""ZeRO-0 data parallel: gradients all-reduced in buckets while backward still runs (DDP's way).

DeepSpeed at ZeRO-0 reduces gradients after backward has finished: it flattens every gradient into one
buffer, all-reduces it and copies it back, so the whole all-reduce waits on the last gradient and the
ranks sit idle during it. torch DDP instead starts an asynchronous all-reduce of a bucket of gradients as
soon as backward has produced all of them, and waits only at the end. `GradOverlap` does the same under
DeepSpeed's engine:

- buckets of about `bucket_mb` MiB in reverse parameter order (the order backward produces gradients);
- a post-accumulate-grad hook on every parameter copies its gradient into its bucket's flat buffer on the
  accumulation-boundary micro-step only (earlier micro-steps accumulate locally, as DeepSpeed does);
- buckets are launched strictly in index order, so every rank issues the same collectives in the same
  order even when backward finishes parameters in another order;
- DeepSpeed's `allreduce_gradients` (called at the end of each backward) is replaced by `finish`, which
  launches what is left (a parameter that got no gradient contributes zeros, as in DeepSpeed), waits,
  averages (sum, then times 1/dp: DeepSpeed's post-scaling) and points each `.grad` at its slice of the
  reduced buffer (no copy back).

Sums of two ranks' values are the same whatever the bucketing, so at dp 2 the gradients are bit for bit
DeepSpeed's; with more ranks the ring's summation order may differ (~1e-7 relative, as with DDP).

`install` applies it only where it is this computation: ZeRO-0, fp32 (no bf16/fp16/autocast), default
averaging, one data-parallel group that is the whole world (no tp, pp, cp, ep), no MoE model. Elsewhere
DeepSpeed's own reduction runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from llmtrain.config import Config, Derived
from llmtrain.parallel import ds_compat
from llmtrain.utils import print0


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter], dtype: torch.dtype, device: torch.device) -> None:
        self.params = params
        self.offsets: list[int] = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.flat = torch.zeros(n, dtype=dtype, device=device)
        self.filled: set[int] = set()  # indices into params whose gradient is in `flat`
        self.work: Any = None  # the async all-reduce, once launched

    def slot(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.flat[self.offsets[i] : self.offsets[i] + p.numel()].view_as(p)

    def fill(self, i: int) -> None:
        grad, slot = self.params[i].grad, self.slot(i)
        if grad is None:
            slot.zero_()  # DeepSpeed reduces zeros for a parameter backward did not reach
        elif grad.data_ptr() != slot.data_ptr():  # else: already accumulated into its slot
            slot.copy_(grad)
        self.filled.add(i)


class GradOverlap:
    """Bucketed asynchronous gradient all-reduce driven by backward hooks; `finish` ends a step's reduction."""

    def __init__(self, engine: Any, params: list[torch.nn.Parameter], world: int, bucket_mb: float) -> None:
        self.engine, self.world = engine, world
        self.buckets: list[_Bucket] = []
        self.where: dict[torch.nn.Parameter, tuple[int, int]] = {}
        limit = max(1, int(bucket_mb * 2**20))
        group: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params):
            if group and (size + p.numel() * p.element_size() > limit or p.dtype != group[0].dtype):
                self._add_bucket(group)
                group, size = [], 0
            group.append(p)
            size += p.numel() * p.element_size()
        if group:
            self._add_bucket(group)
        self.next = 0  # index of the next bucket to launch
        self.active: bool | None = None  # this backward reduces (the boundary micro-step); None: not yet known
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _add_bucket(self, group: list[torch.nn.Parameter]) -> None:
        for i, p in enumerate(group):
            self.where[p] = (len(self.buckets), i)
        self.buckets.append(_Bucket(group, group[0].dtype, group[0].device))

    def _reducing_now(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary() and not ds_compat.inside_no_sync(self.engine)

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        if self.active is None:
            self.active = self._reducing_now()
        if not self.active:
            return
        b, i = self.where[param]
        bucket = self.buckets[b]
        if bucket.work is not None:
            # a second gradient for this parameter in one backward (reentrant recomputation sharing it)
            # after its bucket was sent: the reduced value would miss it
            raise RuntimeError(
                "gradient overlap: a parameter received a gradient after its bucket was all-reduced; "
                "set parallel.grad_overlap_mb=0 to reduce after backward instead"
            )
        bucket.fill(i)
        while self.next < len(self.buckets) and len(self.buckets[self.next].filled) == len(
            self.buckets[self.next].params
        ):
            self._launch(self.next)

    def _launch(self, b: int) -> None:
        assert b == self.next, (b, self.next)  # in order on every rank
        self.buckets[b].work = dist.all_reduce(self.buckets[b].flat, async_op=True)
        self.next += 1

    def finish(self, *args: Any, **kwargs: Any) -> None:
        """In place of DeepSpeed's `allreduce_gradients`: at the accumulation boundary, reduce what is left,
        wait, average and point every `.grad` at its reduced slice; otherwise nothing."""
        try:
            if self.active or (self.active is None and self._reducing_now()):
                for b in range(self.next, len(self.buckets)):
                    bucket = self.buckets[b]
                    for i in range(len(bucket.params)):
                        if i not in bucket.filled:
                            bucket.fill(i)
                    self._launch(b)
                for bucket in self.buckets:
                    bucket.work.wait()
                    bucket.flat.mul_(1.0 / self.world)  # DeepSpeed's post-scaling: sum, then 1/dp
                    for i, p in enumerate(bucket.params):
                        p.grad = bucket.slot(i)
        finally:
            self.active, self.next = None, 0
            for bucket in self.buckets:
                bucket.filled.clear()
                bucket.work = None


def why_not(engine: Any, cfg: Config, derived: Derived) -> str | None:
    """Why the overlapped reduction does not apply to this engine, or None when it does."""
    dims, p = derived.dims, cfg.parallel
    if p.grad_overlap_mb <= 0:
        return "parallel.grad_overlap_mb=0"
    if engine.zero_optimization_stage() != 0:
        return f"ZeRO-{engine.zero_optimization_stage()} reduces gradients itself"
    if dims.dp < 2:
        return "one data-parallel replica"
    if dims.tp > 1 or dims.pp > 1 or dims.cp > 1 or dims.ep > 1 or getattr(cfg.model, "moe", None) is not None:
        return "tp, pp, cp, ep or MoE layout"
    if engine.fp16_enabled() or engine.bfloat16_enabled() or engine.torch_autocast_enabled():
        return "not fp32"
    if not ds_compat.default_grad_averaging(engine) or engine.communication_data_type != torch.float32:
        return "non-default DeepSpeed gradient averaging"
    if dist.get_world_size() != dims.dp:
        return "data-parallel group is not the world"
    return None


def install(engine: Any, cfg: Config, derived: Derived) -> GradOverlap | None:
    """Reduce this engine's gradients with `GradOverlap` where it applies (see `why_not`); returns it or None."""
    if why_not(engine, cfg, derived) is not None:
        return None
    params = [p for p in engine.module.parameters() if p.requires_grad and p.numel() > 0]
    if any(p.dtype != torch.float32 or p.is_sparse for p in params):
        return None
    overlap = GradOverlap(engine, params, dist.get_world_size(), cfg.parallel.grad_overlap_mb)
    ds_compat.replace_allreduce_gradients(engine, overlap.finish)
    print0(
        f"gradient all-reduce overlapped with backward: {len(overlap.buckets)} buckets of <= "
        f"{cfg.parallel.grad_overlap_mb:g} MiB (parallel.grad_overlap_mb)"
    )
    return overlap
