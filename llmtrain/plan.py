"""`llmtrain plan`: will a recipe fit a cluster, and how fast will it go? Answered from a laptop.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, section 3) for mixed-precision Adam
with Ψ parameters per model-parallel rank and N data-parallel ranks:
    ZeRO-0: 16Ψ    ZeRO-1: 4Ψ + 12Ψ/N    ZeRO-2: 2Ψ + 14Ψ/N    ZeRO-3: 16Ψ/N  (bytes)
(2Ψ bf16 weights + 2Ψ bf16 grads + 12Ψ fp32 master weights, momentum and variance). In fp32 training
weights and grads are 4Ψ each; DeepSpeed's ZeRO optimizers still keep an fp32 master copy of their
partition, so the optimizer is 12Ψ/N there too (8Ψ only for ZeRO-0 fp32, where AdamW updates in place).
Activations per transformer layer follow Korthikanti et al. 2022 (eq. 2): s·b·h·(34 + 5·a·s/h) bytes
in 16-bit without recomputation, divided by t with tensor (and sequence) parallelism; full
recomputation keeps only each layer's 2·s·b·h-byte input; selective keeps s·b·h·34/t. The 5·a·s/h
term is the attention matrix (scores, softmax, dropout mask); flash / memory-efficient attention (what
SDPA runs on GPU) never stores it, so by default the plan drops it (`--no-flash` keeps it).
With context parallel (`parallel.cp`) each rank holds s/cp tokens of every sequence, so every term above
is taken at s/cp; the ring attention keeps no attention matrix (it recomputes each block in backward).
ZeRO partitions model states over dp x cp ranks (the cp ranks are data-parallel ranks to DeepSpeed).
With expert parallel (`parallel.ep`) a rank holds num_experts/ep of each MoE block's routed experts, their
states partitioned over the dp/ep ranks that hold the same experts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch comes with the config: `llmtrain --help` lists this command without it
    from llmtrain.config import Config

GiB = 1024**3


@dataclass
class ModelStates:
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_bytes(
    psi: float, n_dp: int, stage: int, mixed: bool = True, offload_optimizer: bool = False, offload_params: bool = False
) -> ModelStates:
    """Per-rank bytes of weights, gradients and optimizer state on the accelerator (ZeRO paper)."""
    w, g = (2.0, 2.0) if mixed else (4.0, 4.0)
    k = 12.0 if (mixed or stage >= 1) else 8.0
    params = w * psi / (n_dp if stage >= 3 else 1)
    grads = g * psi / (n_dp if stage >= 2 else 1)
    optimizer = k * psi / (n_dp if stage >= 1 else 1)
    if offload_optimizer:
        optimizer = 0.0  # fp32 master weights and moments live in CPU memory
    if offload_params:
        params = 0.0
    return ModelStates(params, grads, optimizer)


def activation_bytes_per_layer(
    s: int, b: int, h: int, a: int, t: int = 1, mode: str = "none", every_n: int = 2, flash: bool = False
) -> float:
    """Bytes kept for backward by one transformer layer (Korthikanti et al. 2022), 16-bit activations."""
    full = s * b * h * (34 + (0 if flash else 5 * a * s / h)) / t
    if mode == "full":
        return 2.0 * s * b * h  # only the layer input
    if mode == "selective":
        return s * b * h * 34 / t  # the attention core (the 5·a·s/h term) is recomputed
    if mode == "every_n":
        return (full + (every_n - 1) * 2.0 * s * b * h) / every_n
    return full


@dataclass
class Plan:
    recipe: str
    gpus: int
    dp: int
    tp: int
    pp: int
    cp: int
    zero_stage: int
    params_total: float
    params_per_gpu: float
    model_states_gib: dict
    activations_gib: dict
    total_gib: float
    gpu_memory_gib: float
    fits: bool
    tokens_per_step: int
    flops_per_step: float
    step_time_s: float
    mfu_assumed: float
    peak_tflops: float
    params_active: float = 0.0  # per token (a mixture of experts runs top_k of its experts); = params_total if dense
    ep: int = 1


def make_plan(
    cfg: Config,
    recipe: str,
    nodes: int,
    gpus_per_node: int,
    gpu_memory_gb: float,
    mfu: float = 0.4,
    peak_tflops: float = 989.0,
    flash: bool = True,
) -> Plan:
    import torch

    from llmtrain.config import derive
    from llmtrain.models import build_model
    from llmtrain.models.gpt.moe import moe_layers
    from llmtrain.train import flops

    gpus, p, m, t = nodes * gpus_per_node, cfg.parallel, cfg.model, cfg.train
    derived = derive(cfg, gpus)
    with torch.device("meta"):
        model = build_model(m)
    n = sum(x.numel() for x in model.parameters())
    # mixture of experts: a token runs through top_k of num_experts experts (moe.py's llmtrain_active_fraction)
    active = sum(x.numel() * getattr(x, "llmtrain_active_fraction", 1.0) for x in model.parameters())
    # expert parallel: a rank holds E/ep of every block's routed experts, and ZeRO partitions their state over
    # the dp/ep ranks holding the same experts (MoE runs with tp = pp = cp = 1)
    routed = sum(x.numel() for layer in moe_layers(model) for x in layer.experts.parameters())
    psi_experts = routed / p.ep
    psi = (n - routed) / (p.tp * p.pp) + psi_experts
    mixed = cfg.precision in ("bf16", "fp16")  # bf16-autocast keeps fp32 weights and gradients
    zero_ranks = derived.dp_size * p.cp  # ZeRO partitions over the cp ranks too (they reduce gradients as dp)
    offload = (mixed, p.offload_optimizer, p.offload_params)
    dense = model_state_bytes(psi - psi_experts, zero_ranks, p.zero_stage, *offload)
    experts = model_state_bytes(psi_experts, derived.dp_size // p.ep, p.zero_stage, *offload)
    states = ModelStates(*(getattr(dense, k) + getattr(experts, k) for k in ("params", "grads", "optimizer")))
    layers_here = m.n_layer / p.pp
    # 1F1B keeps up to pp micro-batches in flight on the first stage.
    in_flight = min(p.pp, derived.grad_accum) if p.pp > 1 else 1
    s_local = t.seq_len // p.cp  # context parallel: this rank's chunks of each sequence
    act = {
        mode: activation_bytes_per_layer(
            s_local, t.micro_batch_size, m.n_embd, m.n_head, p.tp, mode, p.checkpoint_every_n, flash or p.cp > 1
        )
        * layers_here
        * in_flight
        / GiB
        for mode in ("none", "selective", "full")
    }
    logits = s_local * t.micro_batch_size * m.vocab_size / p.tp * (2 + 4) / GiB  # bf16 logits + fp32 loss
    chosen = act[p.activation_checkpointing if p.activation_checkpointing in act else "none"] + logits
    total = states.total / GiB + chosen
    per_token, _ = flops.flops_per_token(model, m.n_layer, m.n_embd, t.seq_len, cfg.data)
    step_flops = per_token * derived.tokens_per_step
    return Plan(
        recipe=recipe,
        gpus=gpus,
        dp=derived.dp_size,
        tp=p.tp,
        pp=p.pp,
        cp=p.cp,
        zero_stage=p.zero_stage,
        params_total=n,
        params_per_gpu=psi,
        model_states_gib={k: v / GiB for k, v in asdict(states).items()} | {"total": states.total / GiB},
        activations_gib={**act, "logits": logits, "chosen": chosen, "mode": p.activation_checkpointing},
        total_gib=total,
        gpu_memory_gib=gpu_memory_gb * 1e9 / GiB,
        fits=total <= 0.9 * gpu_memory_gb * 1e9 / GiB,
        tokens_per_step=derived.tokens_per_step,
        flops_per_step=step_flops,
        step_time_s=step_flops / (gpus * peak_tflops * 1e12 * mfu),
        mfu_assumed=mfu,
        peak_tflops=peak_tflops,
        params_active=active,
        ep=p.ep,
    )


def format_plan(pl: Plan) -> str:
    ms, act = pl.model_states_gib, pl.activations_gib
    verdict = "fits" if pl.fits else "does NOT fit"
    lines = [
        f"{pl.recipe}: {pl.params_total / 1e9:.3f}B params"
        f"{f' ({pl.params_active / 1e9:.3f}B active per token)' if pl.params_active < pl.params_total else ''}"
        f" on {pl.gpus} GPUs (dp {pl.dp} x tp {pl.tp} x pp {pl.pp}"
        f"{f' x cp {pl.cp}' if pl.cp > 1 else ''}{f', ep {pl.ep}' if pl.ep > 1 else ''}), ZeRO-{pl.zero_stage}",
        f"  per GPU, model states: params {ms['params']:.2f} GiB + grads {ms['grads']:.2f} GiB + "
        f"optimizer {ms['optimizer']:.2f} GiB = {ms['total']:.2f} GiB",
        f"  per GPU, activations: none {act['none']:.2f} GiB | selective {act['selective']:.2f} GiB | "
        f"full {act['full']:.2f} GiB (+ logits {act['logits']:.2f} GiB); recipe uses '{act['mode']}'",
        f"  total {pl.total_gib:.2f} GiB of {pl.gpu_memory_gib:.1f} GiB -> {verdict} (90% usable)",
        f"  step: {pl.tokens_per_step:,} tokens, {pl.flops_per_step / 1e15:.1f} PFLOP -> "
        f"{pl.step_time_s:.2f} s at {100 * pl.mfu_assumed:.0f}% MFU of {pl.peak_tflops:.0f} TFLOP/s per GPU",
    ]
    if not pl.fits:
        lines.append(
            "  hint: raise parallel.zero_stage, set parallel.activation_checkpointing=full, "
            "lower train.micro_batch_size, split long sequences with parallel.cp, or add GPUs"
        )
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from llmtrain.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    pl = make_plan(
        cfg,
        args.recipe,
        args.nodes,
        args.gpus_per_node,
        args.gpu_memory_gb,
        args.mfu,
        args.peak_tflops,
        flash=not args.no_flash,
    )
    print(json.dumps(asdict(pl), indent=1) if args.json else format_plan(pl))
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="memory per GPU and step time of a recipe on a cluster, before launching",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GB (1e9 bytes)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume for step time")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak per GPU (H100 SXM: 989)")
    p.add_argument(
        "--no-flash",
        action="store_true",
        help="count the attention matrix in activations (no flash / memory-efficient attention)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=cmd_plan)
