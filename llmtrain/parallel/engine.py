"""DeepSpeed behind one door: process-group start, our config -> DeepSpeed JSON, engine construction.

This is the only module (with `ds_compat.py`, which holds every use of DeepSpeed internals) that imports
deepspeed. Everything DeepSpeed can do
that llmtrain does not model as a config key passes through `parallel.deepspeed_overrides`, merged last
and logged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from llmtrain.config import Config, Derived
from llmtrain.parallel import ds_compat
from llmtrain.parallel.layout import ParallelDims
from llmtrain.utils import print0


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank, its device and the comm backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Start (or join) the default process group for any launcher: deepspeed, torchrun, SLURM or plain python.

    A plain `python` start has no RANK/WORLD_SIZE; we fill in a world of one so DeepSpeed does not go
    looking for MPI. On CPU the backend is gloo; on GPU, NCCL with one device per local rank.
    """
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _limit_cpu_threads()
        ds_compat.skip_shm_comm_build()
    import deepspeed
    import torch.distributed as dist

    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)
    except (RuntimeError, dist.DistStoreError) as exc:
        env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        raise RuntimeError(
            f"rank {env['RANK']} could not join the process group of {env['WORLD_SIZE']} ranks at "
            f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} within {timeout_s:.0f} s: {exc}. Check that every node "
            f"started, that MASTER_ADDR is reachable from this host and that the port is free"
        ) from exc
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown_distributed() -> None:
    """Collective: wait for every rank, then leave the process group (a no-op when none was started)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def preflight(info: DistInfo) -> dict[str, Any]:
    """Every rank reports its host; one all-reduce is timed; versions are recorded. Collective."""
    import socket
    import time

    import deepspeed
    import torch.distributed as dist

    hosts: list[Any] = [None] * info.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    x = torch.ones(1, device=info.device)
    dist.all_reduce(x)  # warm-up: the first collective also sets up connections
    start = time.perf_counter()
    dist.all_reduce(x)
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    by_host: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    if int(x.item()) != info.world_size**2:  # ones summed twice over the world
        raise RuntimeError(f"preflight all-reduce returned {x.item()}, expected {info.world_size**2}")
    return {
        "world_size": info.world_size,
        "backend": info.backend,
        "device": str(info.device.type),
        "hosts": by_host,
        "allreduce_ms": 1000 * (time.perf_counter() - start),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limit_cpu_threads() -> None:
    # Neither the deepspeed launcher nor plain python sets OMP_NUM_THREADS; N ranks each using every core
    # oversubscribe the CPU and run slower than one thread each.
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))


# ---------------------------------------------------------------------------------------------
# Config translation


def deepspeed_config(cfg: Config, derived: Derived) -> dict[str, Any]:
    """Translate our config into DeepSpeed's JSON config (the only place that knows its key names)."""
    p, t = cfg.parallel, cfg.train
    zero: dict[str, Any] = {
        "stage": p.zero_stage,
        "reduce_bucket_size": p.comm_bucket_size,
        "allgather_bucket_size": p.comm_bucket_size,
    }
    if p.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = p.comm_bucket_size
    if p.overlap_comm is not None:
        zero["overlap_comm"] = p.overlap_comm
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": derived.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 16},
        # fp32 weights and optimizer; Linear matmuls in bf16 (and their gradients reduced in bf16)
        "torch_autocast": {"enabled": cfg.precision == "bf16-autocast", "dtype": "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.deepspeed_overrides:
        print0(f"deepspeed_overrides: {p.deepspeed_overrides}")
        ds = _deep_merge(ds, p.deepspeed_overrides)
    return ds


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def param_groups(
    model: torch.nn.Module, weight_decay: float, skip_decay: Callable[[str, Any], bool] | None = None
) -> list[dict[str, Any]]:
    """Decay what the model family's rule does not exempt (`ModelFamily.no_decay`: norms, biases, position
    tables); `skip_decay` defaults to the rule of `model.cfg`'s family (a pipeline module passes its own)."""
    if skip_decay is None:
        from llmtrain.models.registry import family_of

        skip_decay = family_of(model.cfg).no_decay
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if skip_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # an empty group (LoRA adapters are all matrices) would be dropped by DeepSpeed behind the LR schedule's back
    return [g for g in groups if g["params"]]


if TYPE_CHECKING:
    _OptimizerBase = torch.optim.Optimizer
else:
    _OptimizerBase = object


class _SkipMixin(_OptimizerBase):
    """Lets the trainer skip one update: set `skip_next = True` before the step (mixed into an optimizer)."""

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


class SkippableAdamW(_SkipMixin, torch.optim.AdamW):
    pass


def skippable_adamw(cfg: Config, params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW that can skip one update: a step whose loss was not finite on some rank leaves weights and
    moments untouched, where DeepSpeed would otherwise apply NaN-scaled gradients.

    torch's AdamW (fused on GPU) unless the optimizer state is offloaded, which needs DeepSpeedCPUAdam.
    torch's rather than DeepSpeed's FusedAdam also avoids compiling a C++ op at start (~76 s on CPU).
    """
    o = cfg.optim
    kwargs: dict[str, Any] = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if cfg.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        cls: type = type("SkippableCPUAdam", (_SkipMixin, DeepSpeedCPUAdam), {})
        kwargs["adamw_mode"] = True
    else:
        cls = SkippableAdamW
        if torch.cuda.is_available() and o.fused:
            kwargs["fused"] = True
        # On CPU torch's default (its per-parameter loop) stays: benchmarks/adamw_cpu.py measured the foreach
        # form slower there (same bits) and the fused CPU kernel ~5x faster but rounding differently.
    ds_compat.allow_zero_optimizer(cls)  # DeepSpeed checks exact types; these are Adam(W) unchanged
    return cls(params, **kwargs)


def build_engine(
    model: torch.nn.Module,
    cfg: Config,
    derived: Derived,
    lr_lambda: Callable[[int], float],
    mpu: Any = None,
) -> tuple[Any, torch.optim.Optimizer]:
    """Wrap `model` in a DeepSpeed engine with AdamW and our LR schedule; returns (engine, optimizer).

    `mpu` (`ParallelDims.ds_grid()`) tells DeepSpeed which ranks are data-parallel replicas when the
    model is tensor-parallel: gradients are averaged, and ZeRO partitions, over those ranks only.
    """
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    groups = param_groups(model, cfg.optim.weight_decay)
    experts = any(is_moe_param(p) for g in groups for p in g["params"])
    if experts:  # expert slices (parallel.ep): their own groups, reduced over the expert-data-parallel ranks
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        named = [{**g, "name": f"group{i}"} for i, g in enumerate(groups)]
        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]
    optimizer = skippable_adamw(cfg, groups)
    with ds_compat.moe_engine(experts):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=LambdaLR(optimizer, lr_lambda),
            config=deepspeed_config(cfg, derived),
            mpu=mpu,
        )
    ds_compat.skip_identity_allreduce(engine)
    from llmtrain.parallel.grad_overlap import install

    install(engine, cfg, derived)
    return engine, optimizer


def is_moe_param(param: torch.nn.Parameter) -> bool:
    """A DeepSpeed expert parameter (tagged by `expert_data_parallel`)."""
    from deepspeed.moe.utils import is_moe_param as tagged

    return bool(tagged(param))


def expert_data_parallel(params: list[torch.nn.Parameter], ep: int) -> None:
    """Make `params` (this rank's expert slices) DeepSpeed expert parameters of its ep-`ep` groups: gradients
    averaged over the expert-data-parallel ranks (i, i + ep, ...: those holding the same experts), ZeRO-1/2
    state partitioned over them. DeepSpeed's expert-parallel groups are ep consecutive ranks, as
    `ParallelDims.ep_group` (MoE runs with tp = pp = cp = 1). Collective: makes the groups."""
    name = ds_compat.create_expert_groups(ep)
    for p in params:
        p.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed's mark of an expert parameter
        p.group_name = name  # type: ignore[attr-defined]


def process_topology(dims: ParallelDims) -> Any:
    """DeepSpeed's process topology for our rank order (`ParallelDims`: pipe, data, context, model; model
    fastest). Context-parallel ranks fold into DeepSpeed's data axis (data index = dp * cp + context: the
    same rank order), so gradients are averaged, and ZeRO partitions, over dp x cp ranks."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp * dims.cp)


def process_grid(dims: ParallelDims) -> Any:
    """DeepSpeed's process grid (its `mpu`) for `dims`; collective. Use `dims.ds_grid()`, which makes it once."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    return PipelineParallelGrid(topology=process_topology(dims))


def grad_norm_unreported(engine: Any) -> bool:
    """True where DeepSpeed clips without recording the norm (ZeRO-0 in fp32): the trainer measures it."""
    return not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())


def reported_grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    return norm.item() if isinstance(norm, torch.Tensor) else (None if norm is None else float(norm))


# ---------------------------------------------------------------------------------------------
# Full (unpartitioned) optimizer state of one parameter, whatever the ZeRO stage: what the
# layout-independent checkpoint (llmtrain/parallel/universal.py) reads and writes.

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def get_full_state(engine: Any, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """fp32 master weight and Adam moments of `param`, whole over the data-parallel group.

    Collective over the data-parallel group with ZeRO (every replica calls it for the same parameters
    in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weight = safe_get_full_fp32_param(param)
    if weight is not None:  # ZeRO-1/2/3 or the bf16 optimizer: partitions gathered
        if not ds_compat.optimizer_state_linked(param, ADAM_KEYS):
            # ZeRO-1/2 (bf16) before the first update: no moments linked yet, they are zero
            return {"fp32": weight, **{k: torch.zeros_like(weight) for k in ADAM_KEYS}}
        return {"fp32": weight, **{k: safe_get_full_optimizer_state(param, k) for k in ADAM_KEYS}}
    state = engine.optimizer.state.get(param, {})  # ZeRO-0 fp32: the torch optimizer holds it as is
    return {
        "fp32": param.detach().float(),
        **{k: state[k] if k in state else torch.zeros_like(param, dtype=torch.float32) for k in ADAM_KEYS},
    }


def get_full_weight(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole weight of a frozen parameter (no optimizer state), gathered under ZeRO-3; collective
    over the data-parallel group there."""
    if ds_compat.is_zero3_param(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().float().clone()
    return param.detach().float()


def set_full_weight(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write the whole `value` into a frozen parameter (every rank passes the same value; ZeRO-3 keeps
    this rank's partition of it); collective over the data-parallel group under ZeRO-3."""
    if ds_compat.is_zero3_param(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value.to(param.dtype))
        return
    param.data.copy_(value.to(param.dtype))


def link_optimizer_state(engine: Any) -> None:
    """Point every parameter's ZeRO-1/2 (or bf16-optimizer) fragment at its Adam moments.

    DeepSpeed links them once, right after the optimizer steps its *first* parameter group, so the
    parameters of later groups (ours: the no-decay group) keep an empty link and
    `safe_get_full_optimizer_state` fails for them. Relinking after a step fixes that; call it before
    reading the state. A no-op where no link exists (ZeRO-0, ZeRO-3)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    if any("exp_avg" in st for st in base.state.values()):
        ds_compat.relink_optimizer_state(opt)


def prepare_set_state(engine: Any) -> None:
    """Create the Adam moments a fresh engine has not made yet (torch's AdamW and ZeRO-3 create them at
    the first step), so set_full_state has somewhere to write; call once before it."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)  # ZeRO / bf16 wrap the torch optimizer
    # The flat fp32 partitions the torch optimizer steps (ZeRO-3 hands them over one sub-group at a time)
    masters = (
        ds_compat.fp32_partitions(opt)  # ZeRO-1/2/3, bf16 optimizer
        or [p for g in base.param_groups for p in g["params"]]
    )  # ZeRO-0 fp32
    for p in masters:
        st = base.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(0.0)
            for k in ADAM_KEYS:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    ds_compat.link_optimizer_state_once(opt)  # ZeRO-1/2, bf16: point the fragments at them


def set_full_state(engine: Any, param: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
    """Write `values` (whole over the data-parallel group) into this rank's partition of `param`'s state;
    call `prepare_set_state` before the first parameter and `finish_set_state` after the last."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero3 = ds_compat.is_zero3_param(param)
    if zero3 or ds_compat.has_hp_mapping(param):
        safe_set_full_fp32_param(param, values["fp32"])
        for k in ADAM_KEYS:
            safe_set_full_optimizer_state(param, values[k], k)
        if not zero3:  # ZeRO-1/2: the model's own weight is whole on every rank
            param.data.copy_(values["fp32"].to(param.dtype))
        return
    param.data.copy_(values["fp32"].to(param.dtype))
    state = engine.optimizer.state[param]
    for k in ADAM_KEYS:
        state[k].copy_(values[k])


def finish_set_state(engine: Any, step: int) -> None:
    """After set_full_state: the optimizer step count everywhere, and ZeRO-3's working partitions
    refreshed from the fp32 masters."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    for st in base.state.values():
        if "exp_avg" in st:
            st["step"] = torch.tensor(float(step))
    if engine.zero_optimization_stage() == 3:
        ds_compat.refresh_zero3_partitions(opt)
    ds_compat.set_global_steps(engine, step)


# ---------------------------------------------------------------------------------------------
# Pipeline and inference engines


def pipeline_module(layers: list[Any], topology: Any, loss_fn: Callable | None, partition_method: str) -> Any:
    """DeepSpeed's PipelineModule over `topology` (`ParallelDims.ds_topology()`) from a family's layers
    (modules and `models.spec.TiedLayer` descriptions, built here as TiedLayerSpecs)."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    from llmtrain.models.spec import TiedLayer

    specs = [
        TiedLayerSpec(
            layer.key, layer.module_class, *layer.args, forward_fn=layer.forward_fn, tied_weight_attr=layer.weight_attr
        )
        if isinstance(layer, TiedLayer)
        else layer
        for layer in layers
    ]
    return PipelineModule(layers=specs, topology=topology, loss_fn=loss_fn, partition_method=partition_method)


def initialize_pipeline(
    module: Any, optimizer: torch.optim.Optimizer, lr_scheduler: Any, ds_config: dict[str, Any]
) -> Any:
    """DeepSpeed's PipelineEngine around a `pipeline_module`."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config
    )
    return engine


def zero3_inference_engine(
    build: Callable[[], torch.nn.Module],
    fill: Callable[[torch.nn.Module, Callable[[list[Any]], Any]], None],
    dtype: torch.dtype,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """An optimizer-less ZeRO-3 engine around a frozen module (a distillation teacher): `build()` runs inside
    zero.Init (each rank allocates only its partition of every parameter), then `fill(module, gathered)`
    writes the weights, `gathered(params)` being the context in which rank 0's writes reach every partition.
    `overrides` (parallel.deepspeed_overrides) are merged last, as for the training engine; stage 3 stays."""
    import deepspeed

    # Every parameter partitioned, however small (the default keeps those under 1e5 elements whole). No
    # memory-efficient linear: zero.Init would swap torch.nn.functional.linear for the whole process (the
    # student's layers too) to save activations for a backward the teacher never runs.
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "memory_efficient_linear": False}
    ds: dict[str, Any]
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if overrides:
        ds = _deep_merge(ds, overrides)
        ds["zero_optimization"]["stage"] = 3
    # the dtype comes from the config: zero.Init's own dtype argument is ignored on devices without fp16
    # (DeepSpeed 0.19 makes such parameters bf16 whatever is asked)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        module = build()
    fill(module, lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    module.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=ds)
    engine.eval()
    return engine


# ---------------------------------------------------------------------------------------------
# What a resume needs beyond the tensors (llmtrain/parallel/universal.py meta.json), and the
# finiteness check before a save


def adam_step(engine: Any) -> int:
    """Adam's own step count (bias correction): behind engine.global_steps by the skipped updates."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    for st in base.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def get_loss_scaler(engine: Any) -> dict[str, Any] | None:
    """The fp16 dynamic loss scaler's position (None without fp16), for meta.json."""
    scaler = ds_compat.loss_scaler(engine) if engine.fp16_enabled() else None
    if scaler is None:
        return None
    return {
        k: (v.item() if isinstance(v, torch.Tensor) else v)
        for k in ds_compat.LOSS_SCALER_FIELDS
        if isinstance(v := getattr(scaler, k, None), (int, float, torch.Tensor))
    }


def set_loss_scaler(engine: Any, saved: dict[str, Any] | None) -> None:
    scaler = ds_compat.loss_scaler(engine) if saved and engine.fp16_enabled() else None
    for k, v in (saved or {}).items():
        if scaler is not None and k in ds_compat.LOSS_SCALER_FIELDS:
            setattr(scaler, k, v)


def optimizer_state_finite(engine: Any) -> bool:
    """True when every tensor this rank's optimizer holds (its fp32 master weights, however ZeRO
    partitioned them, and the Adam moments) is finite: what a checkpoint would carry forward."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    tensors = [p for g in base.param_groups for p in g["params"]]
    tensors += [v for st in base.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    tensors += [p for p in engine.module.parameters() if p.numel()]  # the working weights (bf16 copies)
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True  # one device sync
