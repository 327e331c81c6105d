"""CPU trainer overhead: llmtrain's real training loop vs a plain PyTorch loop, same everything else.

    python benchmarks/trainer_overhead.py --rounds 7 --steps 10 --out benchmarks/results/trainer_overhead.json

Both sides: the same model (same seeded init), the same batches (the same data object), AdamW with the
same hyper-parameters and param groups, the same LR schedule, gradient accumulation and clipping, 1 CPU
thread, world size 1. llmtrain runs `run_loop` (DeepSpeed engine at ZeRO-0 fp32, logging, stop-signal
checks, metrics sink); the plain loop is written out below. Rounds interleave the two (llmtrain block,
then plain block) so drift of the machine hits both; the result is the ratio of median step times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/gpt_debug.yaml")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--out", default="benchmarks/results/trainer_overhead.json")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both loops (default 1)")
    args = ap.parse_intermixed_args()
    # OMP_NUM_THREADS too: init_distributed sizes the thread pool from it when it is set, else from the cores.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    from llmtrain.config import derive, load_config
    from llmtrain.parallel.engine import init_distributed, param_groups
    from llmtrain.parallel.parallelize import build_runner
    from llmtrain.train.metrics import MetricsSink
    from llmtrain.train.objectives import CausalLM
    from llmtrain.train.preemption import StopRequest
    from llmtrain.train.schedule import lr_multiplier
    from llmtrain.train.trainer import TrainerState, build_data_for, build_model_for, build_throughput, run_loop

    tmp = tempfile.mkdtemp(prefix="llmtrain-overhead-")
    cfg = load_config(
        args.recipe,
        [
            *args.overrides,
            "parallel.zero_stage=0",
            "precision=fp32",
            "train.eval_interval=0",
            "checkpoint.interval=0",
            "log.progress=false",
            f"out_dir={tmp}",
        ],
    )
    info = init_distributed()
    derived = derive(cfg, 1)
    data = build_data_for(cfg, derived)
    lr_at = lr_multiplier(cfg.optim, cfg.train.max_steps)
    runner = build_runner(build_model_for(cfg, data.vocab_size), cfg, derived, info.device, lr_at)
    plain = build_model_for(cfg, data.vocab_size)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(plain, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    objective, state, sink, stop = CausalLM(), TrainerState(), MetricsSink(tmp, cfg.log, {}), StopRequest()
    throughput = build_throughput(cfg, plain, info.device, 1)

    def plain_step(step: int) -> None:
        batches = data.train_batches(step)
        for mb in batches:
            (objective(plain, mb) / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    ours, theirs, plain_steps = [], [], 0
    for _ in range(args.rounds):
        block = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=state.step + args.steps))
        t0 = time.perf_counter()
        run_loop(block, derived, runner, data, objective, state, sink, stop, throughput)
        ours.append((time.perf_counter() - t0) / args.steps)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            plain_step(plain_steps)
            plain_steps += 1
        theirs.append((time.perf_counter() - t0) / args.steps)
    result = {
        "what": "tokens/s of llmtrain's loop relative to a plain PyTorch loop (same model, data, optimizer)",
        "recipe": args.recipe,
        "overrides": args.overrides,
        "rounds": args.rounds,
        "steps_per_block": args.steps,
        "tokens_per_step": derived.tokens_per_step,
        "threads": torch.get_num_threads(),
        "llmtrain_step_s_median": statistics.median(ours),
        "plain_step_s_median": statistics.median(theirs),
        "llmtrain_step_s": ours,
        "plain_step_s": theirs,
        "ratio": statistics.median(theirs) / statistics.median(ours),
        "target": 0.95,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
