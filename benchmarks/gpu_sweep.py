"""The GPU throughput matrix in one command: gpt_125m / gpt_350m / gpt_1b on one GPU in bf16 at seq 2048,
with and without activation checkpointing and torch.compile, and the cost of ZeRO-0/2/3 against the recipes'
ZeRO-1 at world size 1.

    python benchmarks/gpu_sweep.py --out benchmarks/results/gpu_throughput.json --budget-min 8
    python benchmarks/gpu_sweep.py --dry-run                      # the plan; every case's config is validated
    python benchmarks/gpu_sweep.py --table benchmarks/results/gpu_throughput.json   # markdown for the README

Each case runs `benchmarks/throughput.py` in a process of its own, so a CUDA out-of-memory or a failed
compile is recorded as that case's `error` and the next case starts with a clean allocator. Cases run most
telling first (the gpt_1b headline, then compile, then activation checkpointing, then the smaller models
and the ZeRO stages). A case already in `--out` is skipped, so a sweep cut short by `--budget-min` carries
on where it stopped when run again; `--redo` measures again instead. `--with-reference` then runs
`benchmarks/model_speed.py --device cuda` (llmtrain against a minimal plain-PyTorch GPT, same shapes, bf16)
in what is left of the budget.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# micro-batch per model at seq 2048 (what the recipes use); two micro-batches per optimizer step so that
# gradient accumulation and the optimizer step are both in every measured step
_MODELS = {
    "125m": ("recipes/gpt_125m.yaml", 16),
    "350m": ("recipes/gpt_350m.yaml", 8),
    "1b": ("recipes/gpt_1b.yaml", 8),
}
_VARIANTS = {
    "base": [],
    "compile": ["train.compile=true"],
    "ac": ["parallel.activation_checkpointing=full"],
    "ac-compile": ["parallel.activation_checkpointing=full", "train.compile=true"],
    "zero0": ["parallel.zero_stage=0"],
    "zero2": ["parallel.zero_stage=2"],
    "zero3": ["parallel.zero_stage=3"],
}
_ORDER = [
    "1b-base",
    "1b-compile",
    "1b-ac",
    "1b-ac-compile",
    "125m-base",
    "125m-compile",
    "350m-base",
    "350m-compile",
    "1b-zero0",
    "1b-zero2",
    "1b-zero3",
    "125m-ac",
    "350m-ac",
    "125m-ac-compile",
    "350m-ac-compile",
]


@dataclass
class Case:
    name: str
    recipe: str
    overrides: list[str]


def plan(only: list[str], recipe: str | None, extra: list[str]) -> list[Case]:
    """The cases to run, in priority order; `only` holds glob patterns over case names."""
    cases = []
    for name in _ORDER:
        if only and not any(fnmatch.fnmatch(name, pat) for pat in only):
            continue
        size, variant = name.split("-", 1)
        rec, mbs = _MODELS[size]
        common = [
            "precision=bf16",
            "train.seq_len=2048",
            f"train.micro_batch_size={mbs}",
            f"train.global_batch_size={2 * mbs}",
        ]
        cases.append(Case(name, recipe or rec, [*common, *_VARIANTS[variant], *extra]))
    if not cases:
        raise SystemExit(f"--only {','.join(only)} matches no case; the cases are: {', '.join(_ORDER)}")
    return cases


def validate(cases: list[Case], steps: int) -> None:
    """Load every case's config as throughput.py will, so a bad key fails here and not minutes into a sweep."""
    from throughput import bench_overrides

    from llmtrain.config import load_config

    for c in cases:
        load_config(ROOT / c.recipe, [*c.overrides, *bench_overrides(steps, "/tmp/unused")])


def run_case(case: Case, steps: int, warmup: int, timeout_s: float) -> dict:
    """One case in its own process (own process group, killed whole on timeout)."""
    with tempfile.TemporaryDirectory(prefix="llmtrain-sweep-") as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks/throughput.py"),
            case.recipe,
            *case.overrides,
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--out",
            str(out),
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            log, _ = proc.communicate(timeout=timeout_s)
            error = None if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            error = f"timed out after {timeout_s:.0f} s (the sweep's budget)"
        rec = json.loads(out.read_text())[0] if error is None else {"error": error, "log_tail": log[-2000:]}
    return {
        "case": case.name,
        "command": " ".join(
            [
                "python benchmarks/throughput.py",
                case.recipe,
                *case.overrides,
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
            ]
        ),
        "wall_s": round(time.perf_counter() - t0, 1),
        **rec,
    }


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def table(records: list[dict]) -> str:
    """Markdown: a row per case, plus the device and versions of the measured rows."""
    ok = [r for r in records if "error" not in r]
    head = "| case | tokens/s | TFLOP/s per GPU | MFU | HFU | peak GiB | case wall s |\n|---|---|---|---|---|---|---|"
    rows = []
    for r in records:
        if "error" in r:
            rows.append(f"| {r['case']} | failed: {r['error']} | | | | | |")
            continue
        rows.append(
            f"| {r['case']} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['tflops_per_device'], '.1f')} | "
            f"{_pct(r['mfu'])} | {_pct(r['hfu'])} | {_fmt(r.get('peak_mem_gib'), '.1f')} | {r['wall_s']} |"
        )
    envs = sorted(
        {f"{r['device']}, torch {r['torch']}, CUDA {r.get('cuda')}, deepspeed {r.get('deepspeed')}" for r in ok}
    )
    return "\n".join([head, *rows, "", *(f"Measured on: {e}" for e in envs)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_throughput.json", help="JSON list, one record per case")
    ap.add_argument("--steps", type=int, default=12, help="steps per case (default 12)")
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the medians (default 4)")
    ap.add_argument("--budget-min", type=float, default=30.0, help="stop starting cases after this (default 30)")
    ap.add_argument("--only", default="", help="comma-separated glob patterns over case names, e.g. '1b-*,125m-base'")
    ap.add_argument("--recipe", default=None, help="run every case on this recipe instead (e.g. to try the sweep)")
    ap.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override added to every case (repeatable)",
    )
    ap.add_argument("--redo", action="store_true", help="measure cases already in --out again")
    ap.add_argument(
        "--with-reference",
        action="store_true",
        help="then, within the budget, run benchmarks/model_speed.py --device cuda (llmtrain against a minimal "
        "plain-PyTorch GPT at the recipes' shapes) into benchmarks/results/model_speed_gpu.json",
    )
    ap.add_argument("--dry-run", action="store_true", help="print and validate the plan, run nothing")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    cases = plan([p for p in args.only.split(",") if p], args.recipe, args.extra)
    validate(cases, args.steps)
    if args.dry_run:
        for c in cases:
            print(
                f"{c.name}: python benchmarks/throughput.py {c.recipe} {' '.join(c.overrides)} --steps {args.steps} --warmup {args.warmup}"
            )
        return 0
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else []
    if args.redo:
        done = [r for r in done if r.get("case") not in {c.name for c in cases}]
    have = {r.get("case") for r in done if "error" not in r}
    deadline = time.monotonic() + 60 * args.budget_min
    for i, case in enumerate(cases, 1):
        if case.name in have:
            print(f"[{i}/{len(cases)}] {case.name}: already in {out}, skipped (--redo measures it again)")
            continue
        left = deadline - time.monotonic()
        if left < 30:
            print(f"budget spent: {len(cases) - i + 1} case(s) not run; run the same command again to continue")
            break
        rec = run_case(case, args.steps, args.warmup, left)
        done = [r for r in done if r.get("case") != case.name] + [rec]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        tmp.replace(out)  # a sweep killed mid-write keeps the cases it had
        if "error" in rec:
            print(f"[{i}/{len(cases)}] {case.name}: FAILED ({rec['error']}); log tail:\n{rec['log_tail'][-800:]}")
        else:
            print(
                f"[{i}/{len(cases)}] {case.name}: {rec['tokens_per_s']:,.0f} tokens/s, MFU {_pct(rec['mfu'])}, "
                f"{rec['wall_s']} s"
            )
    print(table(done))
    left = deadline - time.monotonic()
    if args.with_reference and left > 60:
        cmd = [sys.executable, str(ROOT / "benchmarks/model_speed.py"), "--device", "cuda"]
        cmd += ["--out", str(ROOT / "benchmarks/results/model_speed_gpu.json")]
        try:
            subprocess.run(cmd, cwd=ROOT, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            print("budget spent during model_speed.py; its finished cases are in model_speed_gpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
