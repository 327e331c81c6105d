"""Checkpoints that resume on any layout: our own layout-independent format, written beside DeepSpeed's.

`<checkpoint>/universal/` holds, for every parameter of the plain model (by its plain name, e.g.
`blocks.0.attn.qkv.weight`), one safetensors file with the whole fp32 master weight and both Adam
moments, plus `meta.json` (the layout it was saved from, optimizer step, LR-schedule state).

Saving gathers one parameter at a time: its ZeRO partitions over the data-parallel group, then its
tensor-parallel shards (or an expert stack's slices over the ep group), and the first replica of its
pipeline stage writes it. No rank ever holds more than one whole parameter beyond its own shards, so
consolidation never needs a second copy of the model. Loading on a layout that differs from the saved
one (world size, tp, pp, ep or ZeRO stage) reads each local parameter's file, keeps this rank's
tensor-parallel (or expert-parallel) slice and hands it to the engine, which keeps its own ZeRO partition.
Every resume reads this format, on the same layout too (bit-exact there): DeepSpeed's own `state/*.pt`
files are pickles, which torch.load would run code from, so they are written for DeepSpeed's tools but
never read. meta.json therefore also carries what DeepSpeed's state
held beyond the tensors: Adam's own step count (behind the trainer's after skipped updates) and the
fp16 loss scaler.

Frozen parameters (a LoRA base, llmtrain/models/lora.py) have no optimizer state. When the model's weights
came from `model.init_from` (a fine-tuning run), they are not written at all: meta.json's `base` records the
base's directory (absolute, and relative to the checkpoint, so a run moved together with its base still finds
it) and a digest of its checksums.json entries (llmtrain/integrity.py:listed_digest), and a
resume or a reader rebuilds them from it (init_weights with the run's seed, the base's weights, the
converters), refusing a base that is missing or changed. Without a base, each is written with its weight
only (key `fp32`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from llmtrain.errors import CheckpointError
from llmtrain.parallel.ds_compat import global_steps, is_pipe_replicated
from llmtrain.parallel.layout import ParallelDims

if TYPE_CHECKING:
    from llmtrain.parallel.tensor_parallel import TPShard

FOLDER = "universal"


def layout_of(dims: ParallelDims, zero_stage: int, precision: str) -> dict[str, Any]:
    return {**dims.as_dict(), "zero_stage": zero_stage, "precision": precision}


def _file(directory: Path, name: str) -> Path:
    return directory / FOLDER / f"{name}.safetensors"


def _gather_tp(t: torch.Tensor, param: torch.nn.Parameter, tp_group: Any) -> torch.Tensor:
    """Reassemble a tensor-parallel shard into the whole tensor (every TP rank gets it)."""
    dim, index = cast("TPShard", param).llmtrain_tp_shard
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


def save_universal(
    engine: Any,
    names: dict[int, str],
    directory: Path,
    layout: dict[str, Any],
    tp_group: Any,
    writer: bool,
    step_state: dict[str, Any],
    ep_group: Any = None,
) -> None:
    """Collective. `names` maps id(parameter) -> plain-model name; `writer` is this rank's duty to write
    the parameters of its stage (first data-parallel replica, tensor-parallel rank 0); `ep_group` the ranks
    whose expert slices (`llmtrain_ep_shard`) make the whole expert stacks."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from llmtrain.parallel.engine import get_full_state, get_full_weight, link_optimizer_state

    (directory / FOLDER).mkdir(parents=True, exist_ok=True)
    link_optimizer_state(engine)
    failed: OSError | None = None
    for param in _local_params(engine, names, trainable=False):  # frozen, with no base to rebuild them from
        try:
            _write_tensors(directory, names[id(param)], param, {"fp32": get_full_weight(param)}, tp_group, writer)
        except OSError as exc:
            failed = failed or exc
    for param in _local_params(engine, names):
        state = get_full_state(engine, param)
        if hasattr(param, "llmtrain_tp_shard"):
            state = {k: _gather_tp(v, param, tp_group) for k, v in state.items()}
        if hasattr(param, "llmtrain_ep_shard"):
            from llmtrain.parallel.expert_parallel import gather_experts

            state = {k: gather_experts(v, ep_group, param.llmtrain_ep_shard[1]) for k, v in state.items()}
        if writer and not is_pipe_replicated(param) and failed is None:
            path = _file(directory, names[id(param)])
            try:
                save_file({k: v.detach().cpu().float().contiguous() for k, v in state.items()}, str(path))
            except (OSError, SafetensorError) as exc:  # raised after the loop: peers still gather the rest
                failed = OSError(getattr(exc, "errno", None), getattr(exc, "strerror", None) or str(exc), str(path))
        del state
    if failed is not None:
        raise failed
    if dist.get_rank() == 0:
        meta = {"layout": layout, **step_state}
        (directory / FOLDER / "meta.json").write_text(json.dumps(meta, indent=1, default=_jsonable))


def _write_tensors(
    directory: Path, name: str, param: torch.nn.Parameter, state: dict[str, torch.Tensor], tp_group: Any, writer: bool
) -> None:
    """Gather `state`'s tensor-parallel shards (collective) and, on the writer, save them as `name`'s file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if hasattr(param, "llmtrain_tp_shard"):
        state = {k: _gather_tp(v, param, tp_group) for k, v in state.items()}
    if writer and not is_pipe_replicated(param):
        path = _file(directory, name)
        try:
            save_file({k: v.detach().cpu().float().contiguous() for k, v in state.items()}, str(path))
        except (OSError, SafetensorError) as exc:
            raise OSError(getattr(exc, "errno", None), getattr(exc, "strerror", None) or str(exc), str(path)) from None


def saved_layout(directory: Path) -> dict[str, Any] | None:
    meta = directory / FOLDER / "meta.json"
    return json.loads(meta.read_text())["layout"] if meta.is_file() else None


def load_universal(engine: Any, names: dict[int, str], directory: Path, load_optimizer: bool) -> dict[str, Any]:
    """Collective. Restore every local parameter (and, with `load_optimizer`, its Adam moments and the
    step count) from the layout-independent files; returns meta.json."""
    from safetensors import safe_open

    from llmtrain.parallel.ds_compat import set_global_steps
    from llmtrain.parallel.engine import (
        finish_set_state,
        prepare_set_state,
        set_full_state,
        set_full_weight,
        set_loss_scaler,
    )

    meta = read_meta(directory)
    check_same_parameters(directory, names)
    prepare_set_state(engine)
    for param in _local_params(engine, names):
        path = _file(directory, names[id(param)])
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: the checkpoint under {directory} is incomplete; "
                f"resume from an older checkpoint (train.resume=<its step_* folder>)"
            )
        with safe_open(str(path), framework="pt") as f:
            values = {k: _local_slice(f.get_tensor(k), param) for k in f.keys()}
        if not load_optimizer:
            values = {"fp32": values["fp32"], **{k: torch.zeros_like(values["fp32"]) for k in values if k != "fp32"}}
        set_full_state(engine, param, {k: v.to(param.device) for k, v in values.items()})
    for param in _local_params(engine, names, trainable=False):  # frozen weights written without a base
        with safe_open(str(_file(directory, names[id(param)])), framework="pt") as f:
            set_full_weight(param, _local_slice(f.get_tensor("fp32"), param).to(param.device))
    finish_set_state(engine, meta.get("adam_step", meta["optimizer_step"]) if load_optimizer else 0)
    if load_optimizer:
        set_global_steps(engine, meta["optimizer_step"])  # counts skipped updates too, unlike Adam's step
        set_loss_scaler(engine, meta.get("loss_scaler"))
    if load_optimizer and engine.lr_scheduler is not None:
        _restore_schedule(engine.lr_scheduler, meta["lr_scheduler"])
    return meta


def _restore_schedule(scheduler: Any, saved: dict[str, Any]) -> None:
    """The schedule's position (its step) from the checkpoint; its peak LR (base_lrs) from this run's
    config, so a changed optim.lr applies from the first resumed step (the multiplier function is this
    run's too: warmup, decay and max_steps changes apply the same way)."""
    base_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(saved)
    scheduler.base_lrs = base_lrs
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(base_lrs, scheduler.lr_lambdas)]
    scheduler._last_lr = lrs
    # the optimizer's current LR lives in its param groups
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / FOLDER / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing: {directory} was written before layout-independent "
            f"checkpoints or is incomplete; resume from another checkpoint"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); resume from another checkpoint") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("optimizer_step"), int):
        raise CheckpointError(f"{path} lacks optimizer_step; resume from another checkpoint")
    return meta


def check_same_parameters(directory: Path, names: dict[int, str]) -> None:
    """The checkpoint holds exactly this model's parameters: a resume never drops or invents layers."""
    saved = {p.name[: -len(".safetensors")] for p in (directory / FOLDER).glob("*.safetensors")}
    wanted = set(names.values())
    extra, missing = sorted(saved - wanted), sorted(wanted - saved)
    if extra or missing:
        what = (
            f"parameters this model lacks ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
            if extra
            else f"no '{missing[0]}' ({len(missing)} parameters missing)"
        )
        raise CheckpointError(
            f"{directory / FOLDER} holds {what}: it was saved from another model shape; "
            f"resume with the checkpoint's model.* keys, or start a new out_dir "
            f"(model.init_from=... to start from its weights)"
        )


def _local_slice(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(param, "llmtrain_ep_shard"):  # this rank's experts (expert_parallel.py)
        from llmtrain.parallel.expert_parallel import local_experts

        return local_experts(full, param)
    if hasattr(param, "llmtrain_tp_shard"):
        dim, index = param.llmtrain_tp_shard
        return full.index_select(dim, index.cpu())
    return full


def _local_params(engine: Any, names: dict[int, str], trainable: bool = True) -> list[torch.nn.Parameter]:
    """This rank's trainable (or frozen) parameters among `names`, in the plain model's order (the same on
    every peer)."""
    local = {id(p): p for p in engine.module.parameters() if p.requires_grad == trainable}
    missing = [n for i, n in names.items() if i in local and not n]
    assert not missing, missing
    return [local[i] for i in names if i in local]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to meta.json")


class UniversalCheckpoint:
    """What a runner needs to write and read the layout-independent format on its layout."""

    def __init__(
        self, model: torch.nn.Module, layout: dict[str, Any], tp_group: Any, writer: bool, ep_group: Any = None
    ):
        # Taken from the plain model after tensor parallel, before the pipeline split: the engines keep
        # these very Parameter objects, so identity gives each one its plain name on every layout.
        named = dict(model.named_parameters())
        # A fine-tuned model's frozen weights come from its base (model.init_from, recorded by
        # init_model_from as `llmtrain_init_from`): only a pointer to it is stored, not the weights. So do
        # the buffers a converter made of the base's weights (a quantised base), which are never stored.
        init_from = getattr(model, "llmtrain_init_from", None)
        frozen = any(not p.requires_grad for p in named.values())
        converted_buffers = bool(getattr(model.cfg, "converters", None)) and len(model.state_dict()) > len(
            dict(model.named_parameters(remove_duplicate=False))
        )
        self.base = base_pointer(init_from) if init_from and (frozen or converted_buffers) else None
        self.names = {id(p): n for n, p in named.items() if p.requires_grad or self.base is None}
        self.layout, self.tp_group, self.writer, self.ep_group = layout, tp_group, writer, ep_group

    def save(self, engine: Any, directory: Path) -> None:
        from llmtrain.parallel.engine import adam_step, get_loss_scaler

        step_state = {
            "optimizer_step": global_steps(engine),
            "adam_step": adam_step(engine),
            "loss_scaler": get_loss_scaler(engine),
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "base": with_relative_path(self.base, directory),
        }
        save_universal(
            engine, self.names, directory, self.layout, self.tp_group, self.writer, step_state, self.ep_group
        )

    def needs_conversion(self, directory: Path) -> bool:
        """True when `directory` was saved on another layout (worth a line in the log)."""
        saved = saved_layout(directory)
        return saved is not None and saved != self.layout

    def load(self, engine: Any, directory: Path, load_optimizer: bool) -> None:
        from llmtrain.utils import print0

        if self.needs_conversion(directory):
            print0(
                f"resuming across layouts: saved on {saved_layout(directory)}, now {self.layout}; "
                f"loading {directory / FOLDER}"
            )
        load_universal(engine, self.names, directory, load_optimizer)


# ---------------------------------------------------------------------------------------------
# The frozen base of a fine-tuned (LoRA) checkpoint


def _weights_of(path: str | Path) -> tuple[Path, list[str]]:
    """(directory, the files that hold its weights) of a model directory or any checkpoint path."""
    from llmtrain.parallel.checkpoint_paths import resolve_checkpoint

    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path, ["model.safetensors", "config.yaml"]
    return resolve_checkpoint(path), [f"{FOLDER}/", "config.yaml"]


def base_pointer(init_from: str | Path) -> dict[str, str]:
    """{"path", "digest"}: the resolved base directory and one digest of its weight files' checksums."""
    from llmtrain.integrity import listed_digest

    where, files = _weights_of(init_from)
    return {"path": str(where.resolve()), "digest": listed_digest(where, files)}


def with_relative_path(base: dict[str, str] | None, directory: Path) -> dict[str, str] | None:
    """The pointer as a checkpoint stores it: also the base's path relative to the checkpoint `directory`
    (its temp name is a sibling of the final one, so the relative path holds after the rename)."""
    if base is None:
        return None
    return {**base, "relative": os.path.relpath(base["path"], Path(directory).resolve())}


def frozen_base(directory: Path) -> Path | None:
    """The base directory a checkpoint's frozen weights come from (None when it stores them itself),
    after checking it is there and unchanged since the checkpoint was written. The path relative to the
    checkpoint comes first (a run directory moved together with its base), then the absolute one (a run
    moved alone; checkpoints written before the relative path was stored have only this one)."""
    base = read_meta(directory).get("base")
    if not base:
        return None
    places = [Path(os.path.normpath(Path(directory).resolve() / base["relative"]))] if base.get("relative") else []
    present = [p for p in dict.fromkeys([*places, Path(base["path"])]) if p.exists()]
    path = present[0] if present else Path(base["path"])
    fix = (
        f"restore the base model at {path} as it was when this run started, or start a new run "
        f"from a base with model.init_from"
    )
    if not present:
        raise CheckpointError(
            f"{directory} holds only adapters over the frozen base {path} (model.init_from), which is missing; {fix}"
        )
    unreadable = ""
    for candidate in present:
        try:
            now = base_pointer(candidate)
        except (CheckpointError, ValueError) as exc:
            unreadable = unreadable or f"{directory}: its frozen base {candidate} cannot be read ({exc})"
            continue
        if now["digest"] == base["digest"]:
            return candidate
    if unreadable and len(present) == 1:
        raise CheckpointError(unreadable)
    raise CheckpointError(
        f"{directory} holds only adapters over the frozen base {path}, which changed since the "
        f"checkpoint was written (its checksums.json differs); {fix}"
    )
