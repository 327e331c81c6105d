"""Apply the configured parallelism to a plain model and return the runner for that layout.

The order is fixed (HOUSE_STYLE 2): tensor parallel -> activation checkpointing -> compile -> pipeline
split or ZeRO engine. Model converters (llmtrain/models/converters.py) have already run on the plain
model before this (the trainer calls them right after `model.init_from`), so their modules are sharded,
checkpointed and compiled like the model's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from llmtrain.config import Config, Derived
from llmtrain.parallel.layout import ParallelDims
from llmtrain.parallel.runner import EngineRunner, Runner

if TYPE_CHECKING:
    from llmtrain.parallel.context_parallel import ContextParallel


def build_runner(
    model: torch.nn.Module, cfg: Config, derived: Derived, device: torch.device, lr_lambda: Callable[[int], float]
) -> Runner:
    """Apply the configured parallelism to the plain model (TP -> activation checkpointing -> pipeline
    -> engine) and return the runner for that layout."""
    from llmtrain.parallel.checkpointing import apply_activation_checkpointing
    from llmtrain.parallel.engine import build_engine, deepspeed_config, param_groups, skippable_adamw
    from llmtrain.parallel.universal import UniversalCheckpoint, layout_of
    from llmtrain.utils import print0, rank

    p, dims = cfg.parallel, derived.dims
    tp_group = dims.tp_group(device.type)
    if dims.tp > 1:
        from llmtrain.parallel.tensor_parallel import apply_tensor_parallel, plan_for

        apply_tensor_parallel(model, plan_for(model), *tp_group)
    where = dims.coords(rank())
    ep_group = _expert_parallel(model, dims) if dims.ep > 1 else None
    universal = UniversalCheckpoint(
        model,
        layout_of(dims, p.zero_stage, cfg.precision),
        tp_group[0],
        writer=where.dp == 0 and where.tp == 0 and where.cp == 0,
        ep_group=ep_group,
    )
    cp = _context_parallel(model, dims, p.cp_method) if dims.cp > 1 else None
    apply_activation_checkpointing(model, p.activation_checkpointing, p.checkpoint_every_n)
    if cfg.train.compile:
        from llmtrain.parallel.compile import compile_blocks

        print0(f"train.compile: compiled {compile_blocks(model)} blocks (inductor)")
    if p.pp > 1:
        from llmtrain.models.registry import family_of
        from llmtrain.parallel.pipeline import build_pipeline_runner

        return build_pipeline_runner(
            model,
            deepspeed_config(cfg, derived),
            lambda module: skippable_adamw(
                cfg, param_groups(module, cfg.optim.weight_decay, family_of(model.cfg).no_decay)
            ),
            lr_lambda,
            dims,
            partition=p.pipeline_partition,
            device=device,
            universal=universal,
        )
    mpu = dims.ds_grid() if dims.tp > 1 else None
    # With cp > 1 the cp ranks reduce gradients (and hold ZeRO partitions) as extra data-parallel ranks:
    # DeepSpeed's data-parallel group is the world without tp, or the grid's dp x cp group with it.
    engine, optimizer = build_engine(model, cfg, derived, lr_lambda, mpu=mpu)
    if cp is not None:
        from llmtrain.parallel.context_parallel import ContextParallelRunner

        return ContextParallelRunner(
            engine, optimizer, device, where.dp, dims.dp, tp=dims.tp, mpu=mpu, universal=universal, cp=cp
        )
    return EngineRunner(
        engine,
        optimizer,
        device,
        dp_rank=where.dp,
        dp_size=dims.dp,
        tp=dims.tp,
        mpu=mpu,
        universal=universal,
        ep_group=ep_group,
    )


def _expert_parallel(model: torch.nn.Module, dims: ParallelDims) -> Any:
    """Every MoE block's experts held and computed over this rank's ep group (tokens all-to-all), applied to the
    plain model after tensor parallel and before activation checkpointing (so checkpointed blocks recompute
    it); the expert slices become DeepSpeed expert parameters. Returns the ep group."""
    import torch.distributed as dist

    from llmtrain.models.gpt.moe import moe_layers
    from llmtrain.parallel.engine import expert_data_parallel
    from llmtrain.parallel.expert_parallel import ExpertParallel, apply_expert_parallel
    from llmtrain.utils import print0

    group, ranks = dims.ep_group()
    ep = ExpertParallel(group, dims.ep, ranks.index(dist.get_rank()))
    layers = moe_layers(model)
    sliced = apply_expert_parallel(model, ep)
    expert_data_parallel(sliced, dims.ep)
    held = sum(p.numel() for p in sliced)
    local_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print0(
        f"expert parallel: {len(layers)} MoE blocks, experts split over ep groups of {dims.ep} ranks ({ranks}); "
        f"this rank holds experts {list(ep.experts_of(layers[0]))} of {layers[0].num_experts}: "
        f"{held:,} of {held * dims.ep:,} expert parameters, {local_bytes / 2**20:.2f} MiB of parameters in all"
    )
    return group


def _context_parallel(model: torch.nn.Module, dims: ParallelDims, method: str) -> ContextParallel:
    """Ring (or Ulysses) attention over this rank's cp group, applied to the plain model (after tensor
    parallel, before activation checkpointing, so `selective` recomputes it too)."""
    import torch.distributed as dist

    from llmtrain.parallel.context_parallel import (
        ContextParallel,
        apply_context_parallel,
        process_group_exchange,
        process_group_shift,
    )

    group, ranks = dims.cp_group()
    me = ranks.index(dist.get_rank())
    shift, exchange = process_group_shift(group, ranks, me), process_group_exchange(group, dims.cp)
    cp = ContextParallel(me, dims.cp, shift, method, exchange)
    apply_context_parallel(model, cp)
    return cp
