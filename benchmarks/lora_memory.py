"""Optimizer + gradient memory per rank of LoRA against full fine-tuning, counted from tensors.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_memory.py [--sizes llama_debug llama_135m] \
        [--ranks 1] [--zero-stage 1] [--precision bf16] [--out benchmarks/results/lora_memory.json]

For each model size: full fine-tuning and LoRA (rank 8 and 16 on every linear of every block, the base
frozen), one DeepSpeed engine each, as training builds it (`build_engine`), one step on random tokens.
Counted as benchmarks/zero_memory.py counts them (unique storages, views of flat buffers once): the
gradients held after the boundary's backward and the optimizer state after the step (fp32 master
partitions where DeepSpeed keeps them, and the Adam moments), and, apart, the weights this rank holds
(parameters and buffers: QLoRA's int4 base, `qlora_r8`, is smaller). The aim (issue 16): LoRA <= 10% of full fine-tuning's optimizer + gradients.

`measure(overrides, world_size)` is the function other benchmarks (benchmarks/finetune.py) call, inside an
initialised process group (llmtrain.parallel.engine.init_distributed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from zero_memory import _grads, _nbytes  # noqa: E402  (the same counting)

SEQ, MICRO = 64, 1


def _optimizer_tensors(opt: Any) -> list[torch.Tensor]:
    """fp32 master partitions (ZeRO-1/2/3, bf16 optimizer; none at ZeRO-0 fp32) and the Adam moments."""
    base = getattr(opt, "optimizer", opt)
    masters = list(
        getattr(opt, "single_partition_of_fp32_groups", None)
        or getattr(opt, "fp32_partitioned_groups_flat", None)
        or []
    )
    moments = [v for st in base.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return masters + moments


def measure(overrides: list[str], world_size: int = 1, recipe: str = "recipes/llama_debug.yaml") -> dict[str, Any]:
    """Bytes this rank holds for gradients (after backward) and optimizer state (after one step) of the
    recipe's model with `overrides` (e.g. ["model.lora.rank=8"]), plus trainable and total parameters."""
    from llmtrain.config import derive, load_config
    from llmtrain.models import build_model
    from llmtrain.models.converters import apply_converters
    from llmtrain.parallel.engine import build_engine

    cfg = load_config(
        ROOT / recipe,
        [
            *overrides,
            f"train.seq_len={SEQ}",
            f"train.micro_batch_size={MICRO}",
            f"train.global_batch_size={MICRO * world_size}",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    apply_converters(model, cfg.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    engine, _ = build_engine(model, cfg, derive(cfg, world_size), lambda step: 1.0)
    params = list(engine.module.parameters())
    x = torch.randint(0, cfg.model.vocab_size, (MICRO, SEQ))
    loss = torch.nn.functional.cross_entropy(engine(x).float().flatten(0, 1), x.flatten())
    engine.backward(loss)
    grads = _nbytes(_grads(engine.optimizer, params))
    engine.step()
    optimizer = _nbytes(_optimizer_tensors(engine.optimizer))
    weights = _nbytes([p.data for p in params] + list(engine.module.buffers()))
    del engine
    return {
        "trainable_params": trainable,
        "params": total,
        "weight_bytes": weights,
        "grad_bytes": grads,
        "optimizer_bytes": optimizer,
        "optimizer_plus_grad_bytes": grads + optimizer,
    }


CASES = {
    "full": [],
    "lora_r8": ["model.lora.rank=8", "model.lora.targets=[all]"],
    "lora_r16": ["model.lora.rank=16", "model.lora.targets=[all]"],
    # QLoRA: the base's block linears int4 (groups of 64 input columns), rank 8 adapters in float
    "qlora_r8": [
        "model.converters=[quantized_weights]",
        "model.weight_quant.bits=4",
        "model.weight_quant.group_size=64",
        "model.lora.rank=8",
        "model.lora.targets=[all]",
    ],
}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from llmtrain.parallel.engine import init_distributed

    init_distributed()
    n = dist.get_world_size()
    rows = []
    for size in args.sizes:
        common = [f"model.name={size}", f"parallel.zero_stage={args.zero_stage}", f"precision={args.precision}"]
        full = None
        for case, extra in CASES.items():
            rec = {"size": size, "case": case, "ranks": n, **measure([*common, *extra], n)}
            full = full or rec
            rec["fraction_of_full"] = rec["optimizer_plus_grad_bytes"] / full["optimizer_plus_grad_bytes"]
            rows.append(rec)
            if dist.get_rank() == 0:
                print(json.dumps(rec), flush=True)
    if dist.get_rank() == 0:
        result = {
            "command": "benchmarks/lora_memory.py " + " ".join(sys.argv[1:]),
            "zero_stage": args.zero_stage,
            "precision": args.precision,
            "seq_len": SEQ,
            "micro_batch": MICRO,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "rows": rows,
        }
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["llama_debug", "llama_135m"])
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker or "RANK" in os.environ:
        worker(args)
        return
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={args.ranks}", __file__, "--worker"]
    cmd += sys.argv[1:]
    sys.exit(
        subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))).returncode
    )


if __name__ == "__main__":
    main()
