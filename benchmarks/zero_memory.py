"""Memory of ZeRO stages and activation checkpointing, counted from tensors, against the formulas.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zero_memory.py [--ranks 2 4] [--out FILE]

1. Model states per rank, ZeRO-1/2/3 with 2 and 4 ranks (torchrun over gloo, bf16 mixed precision with
   DeepSpeed's AdamW path: bf16 weights and gradients, fp32 master weights and moments). Counted from
   the storages DeepSpeed actually holds on each rank after one step (unique storages, so views into
   flat buffers count once): weights (module parameters, or their ZeRO-3 shards), gradients after the
   accumulation boundary's backward (and during accumulation, with 2 micro-batches per step), fp32
   master partition + Adam moments. Compared with the ZeRO
   paper's 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N; must agree within 1% plus the bytes of DeepSpeed's padding
   (flat buffers are padded so they split evenly over N). Communication buckets are transient, not
   model state, and are not counted. Counted as shard sizes (numel x itemsize of each partition); the
   JSON also gives the whole storages those shards keep alive (`storage_bytes_held`): with ZeRO-2,
   DeepSpeed 0.19 keeps a gradient partition that cuts through a parameter as a view of that
   parameter's whole reduced gradient until the step, so it holds more than its shard then. Where
   DeepSpeed departs from the paper (ZeRO-1 without gradient accumulation keeps only its gradient
   partition, 2Ψ/N, at the boundary), `deepspeed_formula` says what it keeps instead.
2. Activations kept for backward per transformer layer, per `parallel.activation_checkpointing` mode,
   counted with saved_tensors_hooks (llmtrain.parallel.checkpointing.SavedBytes) on a bf16 model with
   dropout, as the difference between a 4- and a 2-layer model; compared with Korthikanti et al.'s
   s·b·h·(34+5·a·s/h) (llmtrain.plan.activation_bytes_per_layer). The attention runs on torch's math
   kernel (what the CPU uses with dropout; it stores the attention matrix, as the formula assumes), which
   upcasts bf16 to fp32 inside the attention core: the JSON also gives the formula with that core in
   fp32 (cpu_math_attention_bytes), which is what the measurement should match on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtrain.models import ModelConfig, build_model  # noqa: E402
from llmtrain.plan import activation_bytes_per_layer, model_state_bytes  # noqa: E402

MODEL = dict(n_layer=4, n_head=4, n_embd=256, vocab_size=8192, block_size=256)
SEQ, MICRO = 64, 2


# ---------------------------------------------------------------------------------------------
# 1. model states (runs inside torchrun)


def _nbytes(tensors: list[torch.Tensor], storages: bool = False) -> int:
    """Bytes of the tensors (shard sizes: numel x itemsize, each view once), or with `storages` of the
    whole storages they keep alive (a view of a larger buffer holds all of it)."""
    spans: dict[int, list[tuple[int, int]]] = {}  # storage -> byte ranges used (a flat buffer and its views overlap)
    for t in tensors:
        if t is not None and t.numel() > 0:
            base = t.untyped_storage().data_ptr()
            if storages:
                spans.setdefault(base, []).append((base, base + t.untyped_storage().nbytes()))
            else:
                spans.setdefault(base, []).append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    total = 0
    for ranges in spans.values():
        end = None
        for lo, hi in sorted(ranges):
            lo = lo if end is None else max(lo, end)
            total += max(0, hi - lo)
            end = hi if end is None else max(end, hi)
    return total


def _grads(opt: Any, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    out = [p.grad for p in params]
    for group in getattr(opt, "averaged_gradients", {}).values():  # ZeRO-1/2 partitions (dict of lists)
        out += list(group or [])
    for name in ("grads_in_partition", "grad_partitions_flat_buffer"):  # ZeRO-2 / ZeRO-3 flat partitions
        out.append(getattr(opt, name, None))
    return out


def _optimizer_state(opt: Any) -> list[torch.Tensor]:
    masters = list(getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat)
    moments = [
        v for state in opt.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
    ]
    return masters + moments


def _padding(opt: Any, psi: int, n: int) -> int:
    """Elements DeepSpeed added so every rank's partition has the same size (summed over ranks)."""
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return sum(p.numel() for p in opt.single_partition_of_fp32_groups) * n - psi
    return sum(p.numel() for p in opt.fp32_partitioned_groups_flat) * n - psi


def measure_states(stage: int, n: int, accum: int) -> dict[str, Any]:
    from llmtrain.config import derive, load_config
    from llmtrain.parallel.engine import build_engine

    overrides = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={accum * MICRO * n}",
        f"parallel.zero_stage={stage}",
        "precision=bf16",
    ]
    cfg = load_config(ROOT / "recipes" / "gpt_debug.yaml", overrides)
    # shard every parameter (DeepSpeed keeps those under 1e5 elements whole by default)
    cfg.parallel.deepspeed_overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    psi = sum(p.numel() for p in model.parameters())
    engine, _ = build_engine(model, cfg, derive(cfg, n), lambda step: 1.0)
    opt = engine.optimizer
    params = list(engine.module.parameters())
    grads = grad_storages = 0
    for _ in range(accum):  # gradients held during accumulation (accum > 1), then at the boundary
        x = torch.randint(0, MODEL["vocab_size"], (MICRO, SEQ))
        loss = torch.nn.functional.cross_entropy(engine(x).float().flatten(0, 1), x.flatten())
        engine.backward(loss)
        grads = max(grads, _nbytes(_grads(opt, params)))
        grad_storages = max(grad_storages, _nbytes(_grads(opt, params), storages=True))
        engine.step()  # steps the optimizer at the boundary only
    held = [p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]
    weights, optimizer = _nbytes(held), _nbytes(_optimizer_state(opt))
    storages = _nbytes(held, storages=True) + grad_storages + _nbytes(_optimizer_state(opt), storages=True)
    return {
        "stage": stage,
        "ranks": n,
        "accumulation_steps": accum,
        "psi": psi,
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "total": weights + grads + optimizer,
        "storage_bytes_held": storages,
        "padding_elements": _padding(opt, psi, n),
    }


def worker(out: Path) -> None:
    import gc

    import torch.distributed as dist

    from llmtrain.parallel.engine import init_distributed

    init_distributed()
    n = dist.get_world_size()
    rows = []
    for stage, accum in ((s, a) for a in (1, 2) for s in (1, 2, 3)):
        rec = measure_states(stage, n, accum)
        everyone = [None] * n
        dist.all_gather_object(everyone, rec)
        rows.append(
            {
                **rec,
                "per_rank_total": [r["total"] for r in everyone],
                "per_rank_storage_bytes_held": [r["storage_bytes_held"] for r in everyone],
            }
        )
        gc.collect()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_expectation(psi: float, n: int, stage: int, accum: int) -> tuple[float, str]:
    """What DeepSpeed 0.19 keeps where it departs from the paper (seen in this benchmark's counts)."""
    if stage == 1 and accum == 1:
        return 2 * psi + 14 * psi / n, (
            "ZeRO-1 without accumulation: DeepSpeed reduces gradients into this "
            "rank's partition at the boundary as ZeRO-2 does, so 2Ψ/N gradients"
        )
    return model_state_bytes(psi, n, stage, mixed=True).total, "as the paper"


def run_states(ranks: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [
                str(Path(sys.executable).parent / "torchrun"),
                f"--nproc_per_node={n}",
                f"--master_port={_free_port()}",
                __file__,
                "--worker",
                str(out),
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            rows += json.loads(out.read_text())
    for r in rows:
        expect = model_state_bytes(r["psi"], r["ranks"], r["stage"], mixed=True)
        r["formula"] = {
            "weights": expect.params,
            "grads": expect.grads,
            "optimizer": expect.optimizer,
            "total": expect.total,
        }
        r["padding_bytes"] = 16 * r["padding_elements"] / r["ranks"]  # this rank's share, all 16 bytes/param
        r["deviation"] = r["total"] / expect.total - 1
        r["within_1pct_plus_padding"] = abs(r["total"] - expect.total) <= 0.01 * expect.total + r["padding_bytes"]
        r["deepspeed_formula"], r["deepspeed_note"] = deepspeed_expectation(
            r["psi"], r["ranks"], r["stage"], r["accumulation_steps"]
        )
        r["within_1pct_of_deepspeed_formula"] = (
            abs(r["total"] - r["deepspeed_formula"]) <= 0.01 * r["deepspeed_formula"] + r["padding_bytes"]
        )
    return rows


# ---------------------------------------------------------------------------------------------
# 2. activations


def saved_bytes(n_layer: int, mode: str, s: int, b: int) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmtrain.parallel.checkpointing import SavedBytes, apply_activation_checkpointing

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**MODEL, "n_layer": n_layer, "block_size": s, "dropout": 0.1}))
    model.init_weights()
    model.to(torch.bfloat16).train()
    apply_activation_checkpointing(model, mode, every_n=2)
    x = torch.randint(0, MODEL["vocab_size"], (b, s))
    with sdpa_kernel(SDPBackend.MATH):  # what the CPU runs with dropout; stores the attention matrix
        with SavedBytes(exclude=list(model.parameters())) as saved:
            logits = model(x)
    del logits
    return saved.bytes


def cpu_math_attention_bytes(s: int, b: int, h: int, a: int, mode: str) -> float:
    """The formula with the attention core as torch's CPU math kernel runs it on bf16 inputs: upcast to
    fp32, so q, k, v are kept as fp32 copies (12sbh instead of the 6sbh inside the 34) and the scores'
    softmax output, dropout mask and dropped probabilities are fp32 (12as²b instead of 5as²b)."""
    if mode in ("selective", "full"):  # the core is recomputed: nothing of it is kept
        return activation_bytes_per_layer(s, b, h, a, mode=mode)
    none = s * b * h * (34 - 6 + 12 + 12 * a * s / h)
    return none if mode == "none" else (none + 2.0 * s * b * h) / 2  # every_n=2


def run_activations(s: int = 256, b: int = 2) -> list[dict[str, Any]]:
    h, a = MODEL["n_embd"], MODEL["n_head"]
    rows = []
    for mode in ("none", "selective", "every_n", "full"):
        per_layer = (saved_bytes(4, mode, s, b) - saved_bytes(2, mode, s, b)) / 2
        formula = activation_bytes_per_layer(s, b, h, a, mode=mode, every_n=2)
        cpu = cpu_math_attention_bytes(s, b, h, a, mode)
        rows.append(
            {
                "mode": mode,
                "s": s,
                "b": b,
                "h": h,
                "a": a,
                "measured_bytes_per_layer": per_layer,
                "formula_bytes_per_layer": formula,
                "ratio": per_layer / formula,
                "formula_fp32_attention_core": cpu,
                "ratio_fp32_attention_core": per_layer / cpu,
            }
        )
    for r in rows:
        r["saved_vs_none"] = 1 - r["measured_bytes_per_layer"] / rows[0]["measured_bytes_per_layer"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zero_memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return
    states = run_states(args.ranks)
    acts = run_activations()
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "model": MODEL,
        "precision": "bf16 (fp32 master weights and Adam moments)",
        "model_states": states,
        "activations": acts,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"model states per rank, Ψ = {states[0]['psi']:,} parameters (MB = 1e6 bytes):")
    for r in states:
        f = r["formula"]
        print(
            f"  ZeRO-{r['stage']} N={r['ranks']} accum {r['accumulation_steps']}: weights {r['weights'] / 1e6:.3f} grads {r['grads'] / 1e6:.3f} "
            f"optimizer {r['optimizer'] / 1e6:.3f} = {r['total'] / 1e6:.3f} MB | formula {f['total'] / 1e6:.3f} MB "
            f"({100 * r['deviation']:+.3f}%, padding {r['padding_bytes'] / 1e3:.1f} kB) "
            f"{'OK' if r['within_1pct_plus_padding'] else 'OFF'} | DeepSpeed's own "
            f"{r['deepspeed_formula'] / 1e6:.3f} MB {'OK' if r['within_1pct_of_deepspeed_formula'] else 'OFF'} | "
            f"storages held {max(r['per_rank_storage_bytes_held']) / 1e6:.3f} MB"
        )
    print(f"activations per layer (s={acts[0]['s']}, b={acts[0]['b']}, h={acts[0]['h']}, a={acts[0]['a']}, bf16):")
    for r in acts:
        print(
            f"  {r['mode']:>9}: {r['measured_bytes_per_layer'] / 1e6:7.3f} MB | formula "
            f"{r['formula_bytes_per_layer'] / 1e6:7.3f} MB (x{r['ratio']:.3f}), with the fp32 attention core "
            f"{r['formula_fp32_attention_core'] / 1e6:7.3f} MB (x{r['ratio_fp32_attention_core']:.3f}) | "
            f"saves {100 * r['saved_vs_none']:.1f}%"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
