"""Compression on the bundled text: prune + distil vs training the small shape from scratch, and
distillation vs none at equal student compute. Every run goes through the real launchers.

    python benchmarks/compression.py --out benchmarks/results/compression.json

Sized to finish in about 15 minutes on an idle 2-core machine (1 thread per run); `cpu_s_of_runs` in the
JSON is the CPU time the runs took. A --work directory with a finished teacher (and prune) reuses them.

1. Teacher: gpt_debug (4 x 192, ~3.4M params) trained by `launchers/train.py` for --teacher-steps.
2. `llmtrain prune` with recipes/prune_gpt_debug.yaml (6 -> 4 heads, 192 -> 128 wide, MLP 768 -> 512: ~54%
   of the parameters), then for --steps each, on the same tokens (same seed, same batches):
   - pruned + distilled (init from the pruned weights, KD from cached teacher top-k logits),
   - pruned + plain CE fine-tuning (no teacher),
   - the same shape from scratch (random init, plain CE).
   gap_closed = (scratch - pruned_distilled) / (scratch - teacher), held-out loss.
3. Distillation vs none at equal student compute: the same shape from random init, KD from cached
   teacher logits (no teacher forward in the student run) vs plain CE, over --seeds seeds; mean +- std
   of held-out perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAU = 1.0  # KD temperature of every distilled run (the caches are built at it)
PRUNED_LR = 3e-4  # runs that start from the pruned weights; from scratch: the recipe's 1e-3
SHAPE = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.intermediate_size=512"]  # prune_gpt_debug.yaml's target


def run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")


def done(out: Path, steps: int) -> bool:
    """A finished run of `steps` steps is reused (the teacher and the prune are deterministic)."""
    m = out / "metrics.jsonl"
    return m.is_file() and any(json.loads(x).get("step") == steps and "eval_loss" in json.loads(x)
                               for x in m.read_text().splitlines() if x.strip())


def final_eval(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r][-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=60, help="student steps (each variant, each seed)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--work", default="", help="run directory root (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/compression.json")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="llmtrain-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    common = ["train.seq_len=64", "train.micro_batch_size=16", "train.global_batch_size=16", "train.eval_interval=0",
              "train.eval_batches=16", "train.sample_tokens=0", "checkpoint.interval=0", "log.interval=25",
              "log.progress=false"]
    student = [*common, f"train.max_steps={args.steps}", "optim.warmup_steps=10", *SHAPE]
    start = time.time()

    teacher = work / "teacher"
    reused = [name for name, ok in (("teacher", done(teacher, args.teacher_steps)),
                                    ("pruned", (work / "pruned" / "prune.json").is_file())) if ok]
    if not done(teacher, args.teacher_steps):
        run([py, "launchers/train.py", "recipes/gpt_debug.yaml", *common, f"train.max_steps={args.teacher_steps}",
             f"out_dir={teacher}"], work / "teacher.log")
    pruned = work / "pruned"
    if not (pruned / "prune.json").is_file():
        run([py, "-m", "llmtrain.cli", "prune", str(teacher), "--recipe", "recipes/prune_gpt_debug.yaml", "--out",
             str(pruned), "prune.seq_len=64", "prune.micro_batch_size=16"], work / "prune.log")
    prune_figs = json.loads((pruned / "prune.json").read_text())

    def distill(out: str, seed: int, *extra: str) -> float:
        d = work / out
        shutil.rmtree(d, ignore_errors=True)  # student runs always start fresh
        run([py, "launchers/distill.py", "recipes/distill_gpt_debug.yaml", *student, f"train.seed={seed}",
             f"distill.teacher={teacher}", f"distill.cache_dir={work / f'cache_seed{seed}'}",
             f"distill.top_k={args.top_k}", f"distill.temperature={TAU}", f"out_dir={d}", *extra], work / f"{out}.log")
        return final_eval(d)

    def scratch(out: str, seed: int, *extra: str) -> float:
        d = work / out
        shutil.rmtree(d, ignore_errors=True)
        run([py, "launchers/train.py", "recipes/gpt_debug.yaml", *student, f"train.seed={seed}", f"out_dir={d}",
             *extra], work / f"{out}.log")
        return final_eval(d)

    teacher_loss = final_eval(teacher)
    seed0 = 1234
    # Pruned weights are already good: a gentler LR than from scratch (Minitron retrains at a lower LR),
    # and logit KD only (alpha 1), as Minitron distils.
    pd = distill("pruned_distilled", seed0, f"model.init_from={pruned}", f"optim.lr={PRUNED_LR}", "distill.alpha=1.0")
    pf = scratch("pruned_finetuned", seed0, f"model.init_from={pruned}", f"optim.lr={PRUNED_LR}")
    kd, ce = [], []
    for i in range(args.seeds):
        kd.append(distill(f"kd_seed{i}", seed0 + i, "distill.alpha=0.5"))
        ce.append(scratch(f"scratch_seed{i}", seed0 + i))
    sc = ce[0]  # seed 0 from scratch: the same shape, steps and tokens as the pruned runs

    def ppl_stats(losses: list[float]) -> dict[str, float]:
        p = [math.exp(x) for x in losses]
        return {"mean": statistics.mean(p), "std": statistics.stdev(p) if len(p) > 1 else 0.0, "runs": p}

    result = {
        "command": "python benchmarks/compression.py " + " ".join(sys.argv[1:]),
        "setup": {"teacher": "gpt_debug 4x192 (6 heads), seq 64, batch 16", "teacher_steps": args.teacher_steps,
                  "student_shape": "4 layers x 128 wide, 4 heads, MLP 512", "student_steps": args.steps,
                  "tokens_per_student_run": args.steps * 16 * 64, "cached_top_k": args.top_k,
                  "kd": {"temperature": TAU, "alpha_pruned": 1.0, "alpha_random_init": 0.5},
                  "lr": {"pruned_init": PRUNED_LR, "random_init": 1e-3},
                  "params_teacher": prune_figs["params_before"], "params_student": prune_figs["params_after"],
                  "threads": os.environ.get("OMP_NUM_THREADS", "1")},
        "heldout_loss": {"teacher": teacher_loss, "pruned_before_training": prune_figs["loss_after"],
                         "pruned_distilled": pd, "pruned_finetuned_ce": pf, "scratch": sc},
        "gap_closed_pruned_distilled": (sc - pd) / (sc - teacher_loss),
        "gap_closed_pruned_finetuned_ce": (sc - pf) / (sc - teacher_loss),
        "equal_compute_random_init": {"distilled_cached_ppl": ppl_stats(kd), "no_distillation_ppl": ppl_stats(ce),
                                      "seeds": [seed0 + i for i in range(args.seeds)]},
        "wall_s": time.time() - start,
        "cpu_s_of_runs": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime,
        "reused_from_work_dir": reused,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
