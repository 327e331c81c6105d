"""Throughput of a recipe: run it for K steps and write tokens/s, TFLOP/s, MFU and peak memory to JSON.

    python benchmarks/throughput.py recipes/gpt_125m.yaml --steps 30 --out benchmarks/results/gpu.json \
        train.micro_batch_size=8 train.global_batch_size=8
    deepspeed --num_gpus 8 benchmarks/throughput.py recipes/gpt_1b.yaml ...

The first `--warmup` steps (allocator, cuDNN/SDPA autotuning, torch.compile) are left out of the medians.
Several runs can be appended to one JSON file (a list), each with its config delta and the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmtrain.config import load_config  # noqa: E402
from llmtrain.train.metrics import read_metrics  # noqa: E402
from llmtrain.train.trainer import train  # noqa: E402
from llmtrain.utils import rank  # noqa: E402


def bench_overrides(steps: int, out_dir: str) -> list[str]:
    """What the benchmark sets on top of the recipe: K steps, a record per step, no eval/sample/checkpoint."""
    return [
        f"train.max_steps={steps}",
        "log.interval=1",
        "train.eval_interval=0",
        "train.eval_batches=1",
        "train.sample_tokens=0",
        "checkpoint.interval=0",
        "train.resume=none",
        f"out_dir={out_dir}",
        "log.progress=false",
    ]


def measure(recipe: str, overrides: list[str], steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="llmtrain-bench-") as tmp:
        cfg = load_config(recipe, [*overrides, *bench_overrides(steps, f"{tmp}/run")])
        train(cfg)
        recs = [r for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if "loss" in r][warmup:]

    def med(key):
        return statistics.median(r[key] for r in recs) if recs and recs[0].get(key) is not None else None

    import deepspeed
    import torch
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {
        "recipe": recipe,
        "overrides": overrides,
        "steps": steps,
        "warmup_excluded": warmup,
        "tokens_per_s": med("tokens_per_s"),
        "tflops_per_device": med("tflops_per_device"),
        "mfu": med("mfu"),
        "hfu": med("hfu"),
        "peak_mem_gib": max((r.get("peak_mem_gib") or 0) for r in recs) or None,
        "final_loss": recs[-1]["loss"] if recs else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "world_size": world,
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "precision": cfg.precision,
        "zero_stage": cfg.parallel.zero_stage,
        "activation_checkpointing": cfg.parallel.activation_checkpointing,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_intermixed_args()
    result = measure(args.recipe, args.overrides, args.steps, args.warmup)
    if rank() == 0:
        out = Path(args.out)
        runs = json.loads(out.read_text()) if out.exists() else []
        runs.append(result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(runs, indent=1))
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
