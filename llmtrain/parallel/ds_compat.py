"""Every use of DeepSpeed internals (names outside its public API), each behind one small function.

DeepSpeed can rename any of these in a minor release. Keeping them here means an upgrade is checked in
one file: `check_internals()` (run by tests/parallel/test_ds_compat.py) imports each module, looks up
each name and fails naming every one that is missing. `TESTED` is the range pinned in pyproject.toml.

Everything else goes through the DeepSpeed door (`llmtrain/parallel/engine.py`) and the public API.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

TESTED = "deepspeed>=0.19.8,<0.20"  # the range pyproject.toml allows; 0.19.8 is what the suite ran on

# (module, class or "", name, kind): "attr" = an attribute of the module/class; "set" = an instance (or
# parameter) attribute that the module's source assigns (`.name =`), so it cannot be looked up statically.
_Z12 = ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer")
_BF16 = ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer")
_Z3 = ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3")
_ENGINE = ("deepspeed.runtime.engine", "DeepSpeedEngine")
REQUIRED: tuple[tuple[str, str, str, str], ...] = (
    ("deepspeed.comm.torch", "", "build_shm_op", "attr"),
    ("deepspeed.runtime.zero.utils", "", "ZERO_SUPPORTED_OPTIMIZERS", "attr"),
    (*_Z12, "_lazy_init_hp_params_optimizer_state", "attr"),
    (*_Z12, "_hp_optimizer_states_linked", "set"),
    (*_Z12, "single_partition_of_fp32_groups", "set"),
    (*_BF16, "_lazy_init_hp_params_optimizer_state", "attr"),
    (*_BF16, "_hp_optimizer_states_linked", "set"),
    (*_BF16, "fp32_groups_flat_partition", "set"),
    (*_Z3, "_reassign_or_swap_out_partitioned_parameters", "attr"),
    (*_Z3, "fp32_partitioned_groups_flat", "set"),
    (*_Z3, "fp16_groups", "set"),
    (*_ENGINE, "clip_fp32_gradients", "attr"),
    (*_ENGINE, "global_steps", "set"),
    (*_ENGINE, "checkpoint_engine", "set"),
    (*_ENGINE, "enable_backward_allreduce", "set"),
    (*_ENGINE, "allreduce_gradients", "attr"),
    (*_ENGINE, "inside_no_sync_ctxt", "set"),
    (*_ENGINE, "gradient_average", "set"),
    (*_ENGINE, "postscale_gradients", "attr"),
    (*_ENGINE, "gradient_predivide_factor", "attr"),
    (*_ENGINE, "dp_world_size", "set"),
    (*_ENGINE, "seq_dp_world_size", "set"),
    (*_ENGINE, "has_moe_layers", "set"),
    (*_ENGINE, "_configure_distributed_model", "attr"),
    ("deepspeed.utils.groups", "", "_create_expert_and_data_parallel", "attr"),
    ("deepspeed.utils.groups", "", "_get_expert_data_parallel_group_dict", "attr"),
    (*_ENGINE, "_autoep_folding_spec", "set"),
    ("deepspeed.utils.mixed_precision_linkage", "", "_hp_mapping", "set"),
    ("deepspeed.utils.tensor_fragment", "tensor_fragment", "optim_fragment", "attr"),
    ("deepspeed.runtime.zero.partition_parameters", "", "ds_id", "set"),
    ("deepspeed.runtime.zero.partition_parameters", "", "ds_shape", "set"),
    ("deepspeed.runtime.zero.partition_parameters", "", "ds_numel", "set"),
    ("deepspeed.runtime.zero.partition_parameters", "", "ds_tensor", "set"),
    ("deepspeed.runtime.pipe.module", "", "ds_pipe_replicated", "set"),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "forward_funcs", "set"),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "parts", "set"),
    ("deepspeed.runtime.pipe.engine", "PipelineEngine", "grid", "set"),
    ("deepspeed.runtime.pipe.engine", "PipelineEngine", "num_stages", "set"),
    (*_Z12, "loss_scaler", "set"),
    ("deepspeed.runtime.fp16.fused_optimizer", "FP16_Optimizer", "loss_scale_config", "set"),
    ("deepspeed.runtime.fp16.loss_scaler", "", "cur_scale", "set"),
    ("deepspeed.runtime.fp16.loss_scaler", "", "cur_iter", "set"),
    ("deepspeed.runtime.fp16.loss_scaler", "", "last_overflow_iter", "set"),
    ("deepspeed.runtime.fp16.loss_scaler", "", "cur_hysteresis", "set"),
)


def missing_internals() -> list[str]:
    """The `module[.Class].name` of every entry of REQUIRED the installed DeepSpeed lacks."""
    missing = []
    for module_name, cls_name, name, kind in REQUIRED:
        where = f"{module_name}.{cls_name}" if cls_name else module_name
        try:
            owner: Any = importlib.import_module(module_name)
            if cls_name:
                owner = getattr(owner, cls_name)
        except (ImportError, AttributeError):
            missing.append(f"{where}.{name} ({where} not found)")
            continue
        if kind == "attr":
            found = hasattr(owner, name)
        else:
            found = re.search(rf"\.{name}\s*=[^=]", inspect.getsource(owner)) is not None
        if not found:
            missing.append(f"{where}.{name}")
    return missing


def check_internals() -> None:
    """Raise naming every DeepSpeed internal llmtrain relies on that the installed version lacks."""
    import deepspeed

    missing = missing_internals()
    if missing:
        raise RuntimeError(
            f"deepspeed {deepspeed.__version__} lacks internals llmtrain uses (llmtrain/parallel/ds_compat.py): "
            f"{', '.join(missing)}; install the tested range: pip install '{TESTED}'"
        )


def _require(obj: Any, name: str, where: str) -> Any:
    if not hasattr(obj, name):
        import deepspeed

        raise RuntimeError(
            f"deepspeed {deepspeed.__version__}: {where}.{name} is gone, which "
            f"llmtrain/parallel/ds_compat.py relies on; install '{TESTED}'"
        )
    return getattr(obj, name)


# ---------------------------------------------------------------------------------------------
# Process start and optimizer admission


def skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed compiles its shared-memory all-reduce op (~55 s on 2 cores) at every
    init_distributed; only AutoTP inference uses it, training all-reduces go through gloo. Replace the
    builder by a no-op. (`import deepspeed.comm.torch as m` would bind the real `torch` package.)"""
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    _require(comm_torch, "build_shm_op", "deepspeed.comm.torch")
    setattr(comm_torch, "build_shm_op", lambda: None)


def allow_zero_optimizer(cls: type) -> None:
    """ZeRO checks the optimizer's exact type against a list; admit `cls` (an Adam(W) subclass whose
    update is unchanged) to it."""
    utils = importlib.import_module("deepspeed.runtime.zero.utils")
    supported = _require(utils, "ZERO_SUPPORTED_OPTIMIZERS", "deepspeed.runtime.zero.utils")
    if cls not in supported:
        supported.append(cls)


# ---------------------------------------------------------------------------------------------
# ZeRO / bf16-optimizer state of one parameter (what the universal checkpoint reads and writes)


def is_zero3_param(param: torch.nn.Parameter) -> bool:
    """A ZeRO-3 partitioned parameter (DeepSpeed tags each with `ds_id`)."""
    return hasattr(param, "ds_id")


def has_hp_mapping(param: torch.nn.Parameter) -> bool:
    """A parameter linked to a ZeRO-1/2 or bf16-optimizer fp32 fragment."""
    return hasattr(param, "_hp_mapping")


def optimizer_state_linked(param: torch.nn.Parameter, keys: tuple[str, ...]) -> bool:
    """False when `param`'s ZeRO-1/2 (bf16) fragment exists but is not yet linked to all of `keys`'
    optimizer states (before the first optimizer step); True otherwise (ZeRO-0, ZeRO-3: nothing to link)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return True
    fragment = mapping.optim_fragment or {}
    return all(k in fragment for k in keys)


def relink_optimizer_state(optimizer: Any) -> None:
    """Point every parameter's ZeRO-1/2 (bf16) fragment at the optimizer's current states. DeepSpeed
    links them once, after the first parameter group's first step, and marks that done."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def link_optimizer_state_once(optimizer: Any) -> None:
    """DeepSpeed's own one-time link (a no-op where it has run or the optimizer has none)."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._lazy_init_hp_params_optimizer_state()


def fp32_partitions(optimizer: Any) -> list[torch.Tensor] | None:
    """The flat fp32 master partitions the wrapped torch optimizer steps, or None (ZeRO-0 fp32)."""
    return (
        getattr(optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        or getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
        or getattr(optimizer, "fp32_groups_flat_partition", None)
    )  # bf16 optimizer


def refresh_zero3_partitions(optimizer: Any) -> None:
    """ZeRO-3: copy the fp32 masters into the working partitions of every sub-group (after writing them)."""
    refresh = _require(optimizer, "_reassign_or_swap_out_partitioned_parameters", type(optimizer).__name__)
    for sub_group_id in range(len(optimizer.fp16_groups)):
        refresh(sub_group_id)


def skip_identity_allreduce(engine: Any) -> None:
    """With one data-parallel replica DeepSpeed (ZeRO-0) still reduces the gradients after the last
    backward of each step: it flattens every gradient into one buffer (a copy of the whole model),
    multiplies it by 1/1, all-reduces it over a group of one and copies it back. Each of those leaves
    the gradients bit for bit as they were, so on one replica the whole pass is switched off."""
    where = "DeepSpeedEngine"
    if (
        engine.zero_optimization_stage() == 0
        and _require(engine, "dp_world_size", where) == 1
        and _require(engine, "seq_dp_world_size", where) == 1
        and not _require(engine, "has_moe_layers", where)
        and getattr(engine, "_autoep_folding_spec", None) is None
    ):
        _require(engine, "enable_backward_allreduce", where)
        engine.enable_backward_allreduce = False


def create_expert_groups(ep: int) -> str:
    """DeepSpeed's expert-parallel groups (ep consecutive ranks) and expert-data-parallel groups (ranks i, i + ep,
    ...) for ep; returns the name its expert parameters carry (`group_name`). Collective, once per ep."""
    groups = importlib.import_module("deepspeed.utils.groups")
    name = f"ep_size_{ep}"
    if name not in _require(groups, "_get_expert_data_parallel_group_dict", "deepspeed.utils.groups")():
        _require(groups, "_create_expert_and_data_parallel", "deepspeed.utils.groups")(ep)
    return name


@contextmanager
def moe_engine(enabled: bool) -> Iterator[None]:
    """Inside (when `enabled`), a DeepSpeedEngine being built sets `has_moe_layers`. DeepSpeed sets it only for
    models holding its own MoE layer class; it is what turns on its expert paths (expert optimizer groups in
    ZeRO-1/2 and the bf16 optimizer, the expert-data-parallel gradient reduction of ZeRO-0), which our MoE
    layer's expert parameters (`allreduce=False`, `group_name`) need. Set right after the model is configured,
    before the optimizer is."""
    if not enabled:
        yield
        return
    cls = importlib.import_module("deepspeed.runtime.engine").DeepSpeedEngine
    original = _require(cls, "_configure_distributed_model", "DeepSpeedEngine")

    def configure(self: Any, model: Any) -> None:
        original(self, model)
        self.has_moe_layers = True

    cls._configure_distributed_model = configure
    try:
        yield
    finally:
        cls._configure_distributed_model = original


def replace_allreduce_gradients(engine: Any, reduce: Callable[..., None]) -> None:
    """Make the engine call `reduce` where it would all-reduce the gradients itself (at the end of each
    backward; llmtrain/parallel/grad_overlap.py)."""
    _require(engine, "allreduce_gradients", "DeepSpeedEngine")
    engine.allreduce_gradients = reduce


def inside_no_sync(engine: Any) -> bool:
    """Inside the engine's `no_sync()` context: backward accumulates without reducing."""
    return bool(_require(engine, "inside_no_sync_ctxt", "DeepSpeedEngine"))


def default_grad_averaging(engine: Any) -> bool:
    """The engine averages gradients DeepSpeed's default way: all-reduce a sum, then multiply by 1/dp."""
    where = "DeepSpeedEngine"
    return (
        bool(_require(engine, "gradient_average", where))
        and _require(engine, "postscale_gradients", where)()
        and _require(engine, "gradient_predivide_factor", where)() == 1.0
    )


def global_steps(engine: Any) -> int:
    """The engine's optimizer-step counter (what DeepSpeed's own checkpoint records)."""
    return int(_require(engine, "global_steps", "DeepSpeedEngine"))


def set_global_steps(engine: Any, step: int) -> None:
    _require(engine, "global_steps", "DeepSpeedEngine")
    engine.global_steps = step


# The fp16 dynamic loss scaler's position: what the layout-independent checkpoint records of it
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler(engine: Any) -> Any:
    """The engine's fp16 loss scaler (ZeRO optimizers: `loss_scaler`; the fp16 optimizer: `loss_scale_config`)."""
    opt = engine.optimizer
    return getattr(opt, "loss_scaler", None) or getattr(opt, "loss_scale_config", None)


# ---------------------------------------------------------------------------------------------
# Pipeline engine and ZeRO-3 parameters


def replace_fp32_clipping(engine: Any, clip: Callable[[], None]) -> None:
    """Make the engine's ZeRO-0 fp32 gradient clipping call `clip` instead of its own."""
    _require(engine, "clip_fp32_gradients", "DeepSpeedEngine")
    engine.clip_fp32_gradients = clip


def stage_layers(module: Any) -> list[Any]:
    """The callables of this rank's pipeline stage, in order (PipelineModule's `forward_funcs`)."""
    return _require(module, "forward_funcs", "PipelineModule")


def stage_boundaries(module: Any) -> list[int]:
    """Layer index where each stage starts, plus the end (PipelineModule's `parts`)."""
    return _require(module, "parts", "PipelineModule")


def is_pipe_replicated(param: torch.nn.Parameter) -> bool:
    """A copy of a tied weight on a later pipeline stage (DeepSpeed keeps it equal to the first)."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def zero3_full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The whole shape of a ZeRO-3 partitioned parameter (its `.shape` is empty)."""
    return tuple(getattr(param, "ds_shape"))  # attributes ZeRO-3 adds to its parameters


def full_numel(param: torch.nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 has partitioned it (its `numel()` is then 0)."""
    return int(getattr(param, "ds_numel", param.numel()))


def zero3_numel(param: torch.nn.Parameter) -> tuple[int, int]:
    """(elements of this rank's partition, elements of the whole parameter)."""
    return getattr(param, "ds_tensor").numel(), getattr(param, "ds_numel")


def zero3_partition_dtype(param: torch.nn.Parameter) -> torch.dtype:
    return getattr(param, "ds_tensor").dtype


@contextmanager
def deferred_write_errors(engine: Any, errors: list[BaseException]) -> Iterator[None]:
    """Inside: a file write of engine.save_checkpoint that fails (a full disk, a read-only directory) is
    appended to `errors` instead of raised, and later writes are skipped, so this rank still joins the
    collectives that follow inside save_checkpoint (raising there leaves its peers waiting in them until
    the collective timeout). The caller raises errors[0] once every rank is past them."""
    writer = _require(engine, "checkpoint_engine", "DeepSpeedEngine")
    original = writer.save

    def save(state_dict: Any, path: str) -> None:
        if errors:
            return
        try:
            original(state_dict, path)
        except (OSError, RuntimeError) as exc:
            errors.append(exc)

    writer.save = save  # an instance attribute: every save of this engine (the pipeline's layers too)
    try:
        yield
    finally:
        del writer.save
