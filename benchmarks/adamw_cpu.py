"""torch AdamW's three implementations on a recipe's parameters, on CPU: time per step and whether each
gives the per-parameter loop's bits.

    python benchmarks/adamw_cpu.py --out benchmarks/results/adamw_cpu.json                      # gpt_debug
    python benchmarks/adamw_cpu.py --recipe recipes/gpt_debug.yaml --set model.n_layer=6 --steps 30

Why: on CPU torch picks its per-parameter loop (`foreach` and `fused` default to CUDA only), and the
trainer's ZeRO-0 step runs AdamW over every parameter tensor. Measured here (gpt_debug, 1 thread): the
foreach form gives the loop's bits but is slower on CPU; the fused CPU kernel is ~5x faster but rounds
differently (it would move every training number), so the trainer keeps torch's default on CPU.

Same gradients every step (random, fixed seed), the recipe's two parameter groups (weight decay on
matrices only), its LR, betas and eps; one thread; interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/gpt_debug.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override, repeatable")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per block (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--out", default="", help="write the JSON here too")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from llmtrain.config import load_config
    from llmtrain.parallel.engine import param_groups
    from llmtrain.train.trainer import build_model_for

    torch.set_num_threads(1)
    cfg = load_config(args.recipe, args.set)
    o = cfg.optim
    shapes = [p.shape for p in build_model_for(cfg, cfg.model.vocab_size).parameters()]

    def optimizer(kind: str) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        model = torch.nn.ParameterList(params)
        groups = param_groups(model, o.weight_decay, skip_decay=lambda name, p: p.dim() < 2)
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **KINDS[kind])
        return opt, params

    runs = {kind: optimizer(kind) for kind in KINDS}
    grads = torch.Generator().manual_seed(1)
    step_grads = [[torch.randn(s, generator=grads) * 1e-3 for s in shapes] for _ in range(4)]

    def block(kind: str, n: int) -> float:
        opt, params = runs[kind]
        t0 = time.perf_counter()
        for i in range(n):
            for p, g in zip(params, step_grads[i % len(step_grads)]):
                p.grad = g
            opt.step()
        return (time.perf_counter() - t0) / n

    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(args.rounds):
        for kind in KINDS if r % 2 == 0 else reversed(KINDS):
            times[kind].append(block(kind, args.steps))

    def same_bits(kind: str) -> bool:
        (a, pa), (b, pb) = runs["loop"], runs[kind]
        if not all(torch.equal(x, y) for x, y in zip(pa, pb)):
            return False
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        return all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in ("exp_avg", "exp_avg_sq"))

    n = sum(s.numel() for s in shapes)
    result = {
        "recipe": args.recipe,
        "overrides": args.set,
        "parameters": n,
        "tensors": len(shapes),
        "steps_per_block": args.steps,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "same_bits_as_loop": {k: same_bits(k) for k in KINDS if k != "loop"},
        "steps_compared": args.rounds * args.steps,
    }
    ms = result["ms_per_step"]
    for kind in KINDS:
        bits = "" if kind == "loop" else f", same bits as the loop: {result['same_bits_as_loop'][kind]}"
        print(f"{kind:8s} {ms[kind]:7.2f} ms/step ({ms['loop'] / ms[kind]:.2f}x the loop){bits}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
