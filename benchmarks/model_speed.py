"""llmtrain's model + trainer against a minimal plain-PyTorch GPT, same tokens, same shape, side by side.

    python benchmarks/model_speed.py --out benchmarks/results/model_speed.json            # every case
    python benchmarks/model_speed.py --cases debug-1p 6x384-1p --rounds 6 --steps 8      # some cases
    python benchmarks/model_speed.py --cases debug-1p --profile benchmarks/results/profile_debug.txt
    python benchmarks/model_speed.py --list                                               # the case list
    python benchmarks/model_speed.py --table benchmarks/results/model_speed.json          # README markdown

The reference is written out below and is what users compare a trainer with (nanoGPT's shape of a GPT-2):
token + learned position embeddings, pre-LayerNorm blocks with one fused QKV linear,
`F.scaled_dot_product_attention(is_causal=True)`, exact GELU, tied embeddings, torch AdamW built as nanoGPT
builds it (torch's default implementation on CPU, which is its per-parameter loop there; `fused=True` on
CUDA) on the same two parameter groups, gradient clipping, the same LR schedule, DDP over the same process
group when there are 2 ranks. llmtrain runs its real `run_loop` (DeepSpeed engine, ZeRO stage of the case,
fp32, logging every `log.interval` steps, stop-signal agreement, metrics sink). Both sides train on the same
batches of the bundled text (llmtrain's data object), one CPU thread per rank.

Same computation on both sides by default: llmtrain runs `model.gelu_approximate=none` (exact GELU, as the
reference). `--gelu recipe` keeps the recipe's GELU (GPT-2's tanh approximation, which llmtrain keeps by
default for Hugging Face parity; its kernel is slower on CPU) against the exact reference;
`--gelu tanh --reference-gelu tanh` compares both in tanh.

Each case runs in a process of its own (`torchrun --nproc_per_node 2` for the 2-rank cases); inside it,
blocks of `--steps` steps alternate llmtrain / reference over `--rounds` rounds (the order flips every round,
so drift of the machine hits both), and the result is the median and the minimum of the per-round ratios
reference step time / llmtrain step time (> 1: llmtrain is faster). `train.compile` cases add the compile
time (the first block, not counted) separately.

On a GPU (`--device cuda`) the same cases run in bf16 (llmtrain `precision=bf16`, the reference under
`torch.autocast(bfloat16)`), so the first lent GPU measures llmtrain against the reference in one command;
`benchmarks/gpu_sweep.py` lists these cases too (`--group model_speed`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[str, ...]  # config overrides of the model shape
    ranks: int = 1
    zero_stage: int = 0
    compile: bool = False
    steps: int | None = None  # steps per block for this case (large shapes: fewer)
    recipe: str | None = None  # default: --recipe (recipes/gpt_debug.yaml)
    gpu: bool = False  # a GPU case (bf16, seq 2048): run by --device cuda
    extra: tuple[str, ...] = field(default_factory=tuple)


_DEBUG = ()  # recipes/gpt_debug.yaml as it is: 4 layers x 192, 6 heads, seq 128, micro 8 x accum 2
_MID = ("model.n_layer=6", "model.n_embd=384", "model.n_head=6", "train.seq_len=256", "train.micro_batch_size=4",
        "train.global_batch_size=8")  # fmt: skip
_BIG = ("model.n_layer=12", "model.n_embd=768", "model.n_head=12", "model.block_size=512", "train.seq_len=512", "train.micro_batch_size=2",
        "train.global_batch_size=4")  # fmt: skip

CASES = [
    Case("debug-1p", _DEBUG),
    Case("6x384-1p", _MID),
    Case("12x768-1p", _BIG, steps=2),
    Case("debug-2r-zero0", _DEBUG, ranks=2, zero_stage=0),
    Case("debug-2r-zero1", _DEBUG, ranks=2, zero_stage=1),
    Case("debug-2r-zero2", _DEBUG, ranks=2, zero_stage=2),
    Case("6x384-2r-zero0", _MID, ranks=2, zero_stage=0),
    Case("6x384-2r-zero2", _MID, ranks=2, zero_stage=2),
    Case("12x768-2r-zero0", _BIG, ranks=2, zero_stage=0, steps=2),
    Case("debug-1p-compile", _DEBUG, compile=True),
    Case("6x384-1p-compile", _MID, compile=True),
    Case("12x768-1p-compile", _BIG, compile=True, steps=2),
    # the GPU list (--device cuda): the recipes' shapes at seq 2048 in bf16, one GPU, against the anchors
    # llm-foundry 1.3B at 41.8% MFU on H100 and llm.c's ~50%
    Case("gpu-125m", ("train.micro_batch_size=16", "train.global_batch_size=32"), recipe="recipes/gpt_125m.yaml",
         gpu=True, steps=6),
    Case("gpu-350m", ("train.micro_batch_size=8", "train.global_batch_size=16"), recipe="recipes/gpt_350m.yaml",
         gpu=True, steps=6),
    Case("gpu-1b", ("train.micro_batch_size=8", "train.global_batch_size=16"), recipe="recipes/gpt_1b.yaml",
         gpu=True, steps=4),
    Case("gpu-1b-compile", ("train.micro_batch_size=8", "train.global_batch_size=16"), recipe="recipes/gpt_1b.yaml",
         gpu=True, compile=True, steps=4),
]  # fmt: skip
BY_NAME = {c.name: c for c in CASES}


# ----------------------------------------------------------------------------------------------------------
# the reference: a minimal GPT-2 in plain PyTorch


def reference_gpt(vocab: int, n_layer: int, n_head: int, n_embd: int, seq_len: int, gelu: str = "none"):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
            self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
            self.fc, self.fc2 = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, C = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.fc2(F.gelu(self.fc(self.ln2(x)), approximate=gelu))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(seq_len, n_embd)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab, bias=False)
            self.lm_head.weight = self.wte.weight
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)

    return GPT()


# ----------------------------------------------------------------------------------------------------------
# one case, in this process (under torchrun for 2 ranks)


def run_case(case: Case, args: argparse.Namespace) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from contextlib import nullcontext

    from llmtrain.config import derive, load_config
    from llmtrain.parallel.engine import init_distributed, param_groups
    from llmtrain.parallel.parallelize import build_runner
    from llmtrain.train.metrics import MetricsSink
    from llmtrain.train.objectives import CausalLM
    from llmtrain.train.preemption import StopRequest
    from llmtrain.train.schedule import lr_multiplier
    from llmtrain.train.trainer import TrainerState, build_data_for, build_model_for, build_throughput, run_loop
    from llmtrain.utils import rank

    cuda = args.device == "cuda"
    tmp = tempfile.mkdtemp(prefix="llmtrain-speed-")
    cfg = load_config(
        case.recipe or args.recipe,
        [
            *case.shape,
            *case.extra,
            *([f"model.gelu_approximate={args.gelu}"] if args.gelu != "recipe" else []),
            *args.set,
            f"parallel.zero_stage={case.zero_stage}",
            f"precision={'bf16' if cuda else 'fp32'}",
            f"train.compile={'true' if case.compile else 'false'}",
            "train.eval_interval=0",
            "checkpoint.interval=0",
            "log.progress=false",
            "log.wandb=false",
            f"out_dir={tmp}",
        ],
    )
    info = init_distributed()
    world = info.world_size
    derived = derive(cfg, world)
    data = build_data_for(cfg, derived)
    lr_at = lr_multiplier(cfg.optim, cfg.train.max_steps)
    ours_model = build_model_for(cfg, data.vocab_size)
    throughput = build_throughput(cfg, ours_model, info.device, world)
    runner = build_runner(ours_model, cfg, derived, info.device, lr_at)
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    ref = reference_gpt(m.vocab_size, m.n_layer, m.n_head, m.n_embd, cfg.train.seq_len, args.reference_gelu)
    ref = ref.to(info.device)
    if case.compile:
        for i, block in enumerate(ref.blocks):
            ref.blocks[i] = torch.compile(block)
    o = cfg.optim
    groups = param_groups(ref, o.weight_decay, skip_decay=lambda name, p: p.dim() < 2)  # nanoGPT's rule
    # nanoGPT's configure_optimizers: fused where CUDA is, torch's default elsewhere
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **({"fused": True} if cuda else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model = ref
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(ref)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    objective, state, sink, stop = CausalLM(), TrainerState(), MetricsSink(tmp, cfg.log, {}), StopRequest()

    def ref_step(step: int) -> None:
        batches = data.train_batches(step)
        for i, mb in enumerate(batches):
            sync = model.no_sync() if world > 1 and i < len(batches) - 1 else nullcontext()
            with sync, autocast:
                loss = model(mb["input_ids"].to(info.device), mb["labels"].to(info.device))
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def ours_block(n: int) -> float:
        import dataclasses

        block = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=state.step + n))
        sync()
        t0 = time.perf_counter()
        run_loop(block, derived, runner, data, objective, state, sink, stop, throughput)
        sync()
        return (time.perf_counter() - t0) / n

    ref_steps = 0

    def ref_block(n: int) -> float:
        nonlocal ref_steps
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            ref_step(ref_steps)
            ref_steps += 1
        sync()
        return (time.perf_counter() - t0) / n

    steps = case.steps or args.steps
    compile_s = {}
    if case.compile or args.warmup:  # the first block compiles / warms caches: not counted
        compile_s = {"llmtrain_first_block_s": ours_block(max(1, steps // 2)) * max(1, steps // 2)}
        compile_s["reference_first_block_s"] = ref_block(max(1, steps // 2)) * max(1, steps // 2)

    if args.profile:
        profile_both(args.profile, case, ours_block, ref_block, steps)

    ours, theirs = [], []
    for r in range(args.rounds):
        if r % 2 == 0:
            ours.append(ours_block(steps))
            theirs.append(ref_block(steps))
        else:
            theirs.append(ref_block(steps))
            ours.append(ours_block(steps))
    ratios = [t / o for o, t in zip(ours, theirs)]
    result = {
        "case": case.name,
        "ranks": world,
        "zero_stage": case.zero_stage,
        "compile": case.compile,
        "shape": {"n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head, "seq_len": cfg.train.seq_len},
        "tokens_per_step": derived.tokens_per_step,
        "rounds": args.rounds,
        "steps_per_block": steps,
        "threads_per_rank": torch.get_num_threads(),
        "device": str(info.device) if not cuda else torch.cuda.get_device_name(),
        "reference_gelu": args.reference_gelu,
        "llmtrain_gelu": m.gelu_approximate,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "llmtrain_tokens_per_s": derived.tokens_per_step / statistics.median(ours),
        "reference_tokens_per_s": derived.tokens_per_step / statistics.median(theirs),
        # MFU of both sides with llmtrain's FLOPs count of this shape (None on CPU: no peak to divide by)
        "llmtrain_mfu": throughput.record(derived.tokens_per_step / statistics.median(ours))["mfu"],
        "reference_mfu": throughput.record(derived.tokens_per_step / statistics.median(theirs))["mfu"],
        "llmtrain_step_s": ours,
        "reference_step_s": theirs,
        "reference_params": sum(p.numel() for p in ref.parameters()),
        **compile_s,
    }
    return result if rank() == 0 else {}


def profile_both(path: str, case: Case, ours_block, ref_block, steps: int) -> None:
    """Per-op self CPU time of a block of each side (torch.profiler), the top 25 ops, into `path`."""
    from torch.profiler import ProfilerActivity, profile

    from llmtrain.utils import rank

    tables, counts = [], []
    for name, block in (("llmtrain", ours_block), ("reference", ref_block)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            block(steps)
        averages = prof.key_averages()
        tables.append(f"== {case.name}: {name}, {steps} steps ==\n")
        tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=25))
        counts.append({e.key: (e.count, e.self_cpu_time_total / 1e3) for e in averages})
    # op counts are what noise cannot move: every op whose call count differs between the two sides
    ours_n, ref_n = counts
    tables.append(f"== {case.name}: ops whose call counts differ (llmtrain vs reference, {steps} steps) ==")
    tables.append(f"{'op':<60} {'llmtrain':>9} {'reference':>9} {'llmtrain self ms':>17} {'ref self ms':>12}")
    for key in sorted(set(ours_n) | set(ref_n), key=lambda k: -ours_n.get(k, (0, 0.0))[1]):
        (a, ta), (b, tb) = ours_n.get(key, (0, 0.0)), ref_n.get(key, (0, 0.0))
        if a != b:
            tables.append(f"{key[:60]:<60} {a:>9} {b:>9} {ta:>17.1f} {tb:>12.1f}")
    if rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(tables))
        print(f"profile written to {path}")


# ----------------------------------------------------------------------------------------------------------
# the driver: each case in its own process, results merged into --out


def launch(case: Case, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable]
    if case.ranks > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.ranks}"]
    cmd += [__file__, "--worker", case.name, "--worker-out", str(out), "--recipe", args.recipe,
            "--rounds", str(args.rounds), "--steps", str(args.steps), "--threads", str(args.threads),
            "--device", args.device, "--reference-gelu", args.reference_gelu, "--gelu", args.gelu]  # fmt: skip
    if args.profile:
        cmd += ["--profile", args.profile]
    if not args.warmup:
        cmd += ["--no-warmup"]
    for s in args.set:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"case": case.name, "error": f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(out.read_text())


def table(results: list[dict]) -> str:
    rows = ["| case | ranks | ZeRO | compile | GELU llmtrain / ref | llmtrain tok/s | reference tok/s | ratio median (min–max) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        if "error" in r:
            rows.append(f"| {r['case']} | | | | | | | error: {r['error']} |")
            continue
        gelu = f"{r.get('llmtrain_gelu', 'tanh')} / {r.get('reference_gelu', 'none')}"  # older files: tanh / exact
        rows.append(
            f"| {r['case']} | {r['ranks']} | {r['zero_stage']} | {'yes' if r['compile'] else 'no'} | {gelu} | "
            f"{r['llmtrain_tokens_per_s']:.0f} | {r['reference_tokens_per_s']:.0f} | "
            f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=None, help="case names (default: all; see --list)")
    ap.add_argument("--list", action="store_true", help="print the case list and exit")
    ap.add_argument("--recipe", default="recipes/gpt_debug.yaml")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds per case (default 6)")
    ap.add_argument("--steps", type=int, default=8, help="steps per block (large shapes use fewer)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default 1)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--reference-gelu",
        choices=["none", "tanh"],
        default="none",
        help="the reference's GELU: exact (default, nanoGPT's) or tanh (GPT-2's)",
    )
    ap.add_argument(
        "--gelu",
        choices=["none", "tanh", "recipe"],
        default="none",
        help="llmtrain's model.gelu_approximate: none (default: exact, as the reference), tanh, or recipe (keep "
        "the recipe's: tanh for GPT-2)",
    )
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="count the first block too")
    ap.add_argument("--profile", default="", help="write per-op self times of both sides to this file")
    ap.add_argument("--set", action="append", default=[], help="extra config override for llmtrain, repeatable")
    ap.add_argument("--out", default="benchmarks/results/model_speed.json")
    ap.add_argument("--table", default="", help="print the markdown table of a results file and exit")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.table:
        print(table(json.loads(Path(args.table).read_text())["cases"]))
        return 0
    if args.list:
        for c in CASES:
            print(
                f"{c.name}: ranks {c.ranks}, ZeRO-{c.zero_stage}, compile {c.compile}, {' '.join(c.shape) or 'gpt_debug'}"
            )
        return 0
    if args.worker:
        result = run_case(BY_NAME[args.worker], args)
        if result:
            Path(args.worker_out).write_text(json.dumps(result, indent=1))
        return 0

    names = args.cases or [c.name for c in CASES if c.gpu == (args.device == "cuda")]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; see --list")
    out = Path(args.out)
    previous = json.loads(out.read_text())["cases"] if out.exists() else []
    results = {r["case"]: r for r in previous}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            r = launch(BY_NAME[name], args, Path(tmp) / "case.json")
            r["wall_s"] = round(time.time() - t0, 1)
        results[name] = r
        summary = r.get("error") or f"ratio {r['ratio_median']:.3f} (min {r['ratio_min']:.3f})"
        print(f"{name}: {summary}  [{r['wall_s']} s]", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        ordered = [results[c.name] for c in CASES if c.name in results]
        out.write_text(json.dumps({"what": __doc__.splitlines()[0], "cases": ordered}, indent=1))
    print(table([results[n] for n in names]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
