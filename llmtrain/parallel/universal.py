"""Checkpoints that resume on any layout: our own layout-independent format, written beside DeepSpeed's.

`<checkpoint>/universal/` holds, for every parameter of the plain model (by its plain name, e.g.
`blocks.0.attn.qkv.weight`), one safetensors file with the whole fp32 master weight and both Adam
moments, plus `meta.json` (the layout it was saved from, optimizer step, LR-schedule state).

Saving gathers one parameter at a time: its ZeRO partitions over the data-parallel group, then its
tensor-parallel shards, and the first replica of its pipeline stage writes it. No rank ever holds more
than one whole parameter beyond its own shards, so consolidation never needs a second copy of the model.
Loading on a layout that differs from the saved one (world size, tp, pp or ZeRO stage) reads each
local parameter's file, keeps this rank's tensor-parallel slice and hands it to the engine, which keeps
its own ZeRO partition. On the same layout DeepSpeed's own checkpoint is loaded instead (bit-exact,
and it also holds what our format does not need to move, such as loss-scaler state).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llmtrain.parallel.ds_compat import global_steps, is_pipe_replicated
from llmtrain.parallel.layout import ParallelDims

FOLDER = "universal"


def layout_of(dims: ParallelDims, zero_stage: int, precision: str) -> dict[str, Any]:
    return {**dims.as_dict(), "zero_stage": zero_stage, "precision": precision}


def _file(directory: Path, name: str) -> Path:
    return directory / FOLDER / f"{name}.safetensors"


def _gather_tp(t: torch.Tensor, param: torch.nn.Parameter, tp_group: Any) -> torch.Tensor:
    """Reassemble a tensor-parallel shard into the whole tensor (every TP rank gets it)."""
    dim, index = param.llmtrain_tp_shard
    size = dist.get_world_size(tp_group)
    shards = [torch.empty_like(t) for _ in range(size)]
    indices = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(shards, t.contiguous(), group=tp_group)
    dist.all_gather(indices, index, group=tp_group)
    full_shape = list(t.shape)
    full_shape[dim] = sum(i.numel() for i in indices)
    full = torch.empty(full_shape, dtype=t.dtype, device=t.device)
    for shard, idx in zip(shards, indices):
        full.index_copy_(dim, idx, shard)
    return full


def save_universal(engine: Any, names: dict[int, str], directory: Path, layout: dict[str, Any],
                   tp_group: Any, writer: bool, step_state: dict[str, Any]) -> None:
    """Collective. `names` maps id(parameter) -> plain-model name; `writer` is this rank's duty to write
    the parameters of its stage (first data-parallel replica, tensor-parallel rank 0)."""
    from safetensors.torch import save_file

    from llmtrain.parallel.engine import get_full_state, link_optimizer_state

    (directory / FOLDER).mkdir(parents=True, exist_ok=True)
    link_optimizer_state(engine)
    for param in _local_params(engine, names):
        state = get_full_state(engine, param)
        if hasattr(param, "llmtrain_tp_shard"):
            state = {k: _gather_tp(v, param, tp_group) for k, v in state.items()}
        if writer and not is_pipe_replicated(param):
            save_file({k: v.detach().cpu().float().contiguous() for k, v in state.items()},
                      str(_file(directory, names[id(param)])))
        del state
    if dist.get_rank() == 0:
        meta = {"layout": layout, **step_state}
        (directory / FOLDER / "meta.json").write_text(json.dumps(meta, indent=1, default=_jsonable))


def saved_layout(directory: Path) -> dict[str, Any] | None:
    meta = directory / FOLDER / "meta.json"
    return json.loads(meta.read_text())["layout"] if meta.is_file() else None


def load_universal(engine: Any, names: dict[int, str], directory: Path, load_optimizer: bool) -> dict[str, Any]:
    """Collective. Restore every local parameter (and, with `load_optimizer`, its Adam moments and the
    step count) from the layout-independent files; returns meta.json."""
    from safetensors import safe_open

    from llmtrain.parallel.engine import finish_set_state, prepare_set_state, set_full_state

    meta = json.loads((directory / FOLDER / "meta.json").read_text())
    prepare_set_state(engine)
    for param in _local_params(engine, names):
        path = _file(directory, names[id(param)])
        if not path.is_file():
            raise ValueError(f"{path} is missing: the checkpoint under {directory} is incomplete")
        with safe_open(str(path), framework="pt") as f:
            values = {k: _local_slice(f.get_tensor(k), param) for k in f.keys()}
        if not load_optimizer:
            values = {"fp32": values["fp32"], **{k: torch.zeros_like(values["fp32"]) for k in values if k != "fp32"}}
        set_full_state(engine, param, {k: v.to(param.device) for k, v in values.items()})
    finish_set_state(engine, meta["optimizer_step"] if load_optimizer else 0)
    if load_optimizer and engine.lr_scheduler is not None:
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict(meta["lr_scheduler"])
        # the schedule's position is restored, but the optimizer's current LR lives in its param groups
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    return meta


def _local_slice(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(param, "llmtrain_tp_shard"):
        dim, index = param.llmtrain_tp_shard
        return full.index_select(dim, index.cpu())
    return full


def _local_params(engine: Any, names: dict[int, str]) -> list[torch.nn.Parameter]:
    """This rank's trainable parameters in the plain model's order (the same on every peer)."""
    local = {id(p): p for p in engine.module.parameters() if p.requires_grad}
    missing = [n for i, n in names.items() if i in local and not n]
    assert not missing, missing
    return [local[i] for i in names if i in local]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to meta.json")


class UniversalCheckpoint:
    """What a runner needs to write and read the layout-independent format on its layout."""

    def __init__(self, model: torch.nn.Module, layout: dict[str, Any], tp_group: Any, writer: bool):
        # Taken from the plain model after tensor parallel, before the pipeline split: the engines keep
        # these very Parameter objects, so identity gives each one its plain name on every layout.
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.layout, self.tp_group, self.writer = layout, tp_group, writer

    def save(self, engine: Any, directory: Path) -> None:
        step_state = {"optimizer_step": global_steps(engine),
                      "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None}
        save_universal(engine, self.names, directory, self.layout, self.tp_group, self.writer, step_state)

    def needs_conversion(self, directory: Path) -> bool:
        """True when `directory` was saved on another layout, so DeepSpeed's own state cannot be loaded."""
        saved = saved_layout(directory)
        return saved is not None and saved != self.layout

    def load(self, engine: Any, directory: Path, load_optimizer: bool) -> None:
        from llmtrain.utils import print0

        print0(f"resuming across layouts: saved on {saved_layout(directory)}, now {self.layout}; "
               f"loading {directory / FOLDER}")
        load_universal(engine, self.names, directory, load_optimizer)
