"""GGUF rows of the quantisation benchmark: `llmtrain export-gguf --type q8_0 | q4_k` of a model, then held-out
perplexity, bytes on disk and CPU tokens/s of `generate` measured through transformers' GGUF loader
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`), i.e. the file as a real client reads it.

benchmarks/quantization.py calls `measure_gguf` for its "GGUF q8_0" / "GGUF q4_k" rows; standalone:

    nice -n 10 python benchmarks/quantization_gguf.py MODEL_DIR [--data PREPARED] --work runs/gguf_bench

prints one JSON object per row (fp32 through our own model first, the same batches for every row) and, with
--out, adds them to a JSON file (benchmarks/results/quantization_gguf.json).

- perplexity: next-token cross-entropy of transformers' logits over the held-out batches that
  `inference.perplexity_on` uses (`build_data(...).val_batches(n)`), so the rows compare with the others;
- bytes: the .gguf file (weights, tokenizer and metadata);
- tokens/s: transformers' `generate`, greedy, batch 1, KV cache, 1 torch thread, best of 2. transformers
  dequantises a GGUF file to fp32 when it loads it (llama / gpt2), so this is fp32 speed, not llama.cpp's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GGUF_ROWS = {"GGUF q8_0": "q8_0", "GGUF q4_k": "q4_k"}


def export(model_dir: Path, kind: str, work: Path) -> Path:
    from llmtrain.interop.gguf_export import export_gguf

    out = work / f"{model_dir.name}-{kind}.gguf"
    if not out.is_file():
        counts = export_gguf(model_dir, out, kind)
        (out.with_suffix(".types.json")).write_text(json.dumps(counts))
    return out


def _batches(model_dir: Path, data: str, s: dict) -> list[dict]:
    from llmtrain.data import build_data
    from llmtrain.inference import _checkpoint_dir, _saved_config, eval_data_config

    cfg = eval_data_config(model_dir, data) if data else _saved_config(_checkpoint_dir(model_dir)).data
    run_data = build_data(
        cfg, seq_len=s["seq_len"], seed=0, micro_batch_size=s["batch"], grad_accum=1, dp_rank=0, dp_size=1
    )
    return run_data.val_batches(s["eval_batches"])


def load_transformers(path: Path, block_size: int) -> Any:
    import gguf
    import torch
    import transformers

    arch = gguf.GGUFReader(str(path)).fields["general.architecture"].contents()
    extra = {"n_positions": block_size} if arch == "gpt2" else {}  # transformers reads no table length for gpt2
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **extra
    ).eval()


def _perplexity(forward: Any, batches: list[dict]) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = forward(b["input_ids"]).float()
            labels = b["labels"]
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / max(count, 1), count


def _speed(generate: Any, prompt: Any, gen_tokens: int) -> float:
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        generate(prompt, gen_tokens)
        best = min(best, time.perf_counter() - t0)
    return gen_tokens / best


def measure_gguf(model_dir: Path, data: str, s: dict, kind: str, work: Path, gen_tokens: int = 32) -> dict:
    """The row for `kind` ("q8_0" / "q4_k") of the model at `model_dir` (keys as quantization.py's measure)."""
    import torch

    from llmtrain.parallel.consolidate import load_model_weights

    torch.set_num_threads(1)
    t0 = time.time()
    path = export(Path(model_dir), kind, work)
    made = time.time() - t0
    cfg, _ = load_model_weights(model_dir)
    hf = load_transformers(path, cfg.block_size)
    batches = _batches(Path(model_dir), data, s)
    loss, tokens = _perplexity(lambda ids: hf(ids).logits, batches)
    prompt = batches[0]["input_ids"][:1, :16]

    def gen(p: Any, n: int) -> Any:
        return hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    types_file = path.with_suffix(".types.json")
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "eval_tokens": tokens,
        "bytes": path.stat().st_size,
        "gen_tokens_per_s": _speed(gen, prompt, gen_tokens),
        "tensor_types": json.loads(types_file.read_text()) if types_file.is_file() else {},
        "reader": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...), dequantised to fp32",
        "seconds_to_make": round(made, 1),
    }


def measure_fp32(model_dir: Path, data: str, s: dict, gen_tokens: int = 32) -> dict:
    """Our own fp32 model on the same batches (the baseline of the rows above)."""
    import torch

    from llmtrain.inference import load_decoder
    from llmtrain.models.generation import generate

    torch.set_num_threads(1)
    cfg, model = load_decoder(model_dir)
    batches = _batches(Path(model_dir), data, s)
    loss, tokens = _perplexity(model, batches)
    prompt = batches[0]["input_ids"][:1, :16]
    speed = _speed(lambda p, n: generate(model, p, n, cfg.block_size, temperature=0.0), prompt, gen_tokens)
    weights = Path(model_dir) / "model.safetensors"
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "eval_tokens": tokens,
        "bytes": weights.stat().st_size if weights.is_file() else None,
        "gen_tokens_per_s": speed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model directory (consolidated, imported; a run dir: consolidate it first)")
    p.add_argument("--data", default="", help="prepared dataset (default: the model's own data section)")
    p.add_argument("--work", default="runs/gguf_bench")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--out", default="", help="JSON file to add this model's rows to (keyed by the model's name)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    s = dict(seq_len=args.seq_len, batch=args.batch, eval_batches=args.eval_batches)
    rows = {"fp32 (ours)": measure_fp32(Path(args.model), args.data, s, args.gen_tokens)}
    print(json.dumps({"fp32 (ours)": rows["fp32 (ours)"]}), flush=True)
    for row, kind in GGUF_ROWS.items():
        rows[row] = measure_gguf(Path(args.model), args.data, s, kind, work, args.gen_tokens)
        print(json.dumps({row: rows[row]}), flush=True)
    fp = rows["fp32 (ours)"]
    for row, r in rows.items():
        print(
            f"| {row} | {r['ppl']:.3f} | {r['ppl'] / fp['ppl'] - 1:+.2%} | {r['bytes'] / 2**20:.2f} MiB | "
            f"{r['gen_tokens_per_s']:.1f} |"
        )
    command = "nice -n 10 python benchmarks/quantization_gguf.py " + " ".join(sys.argv[1:])
    print("command:", command)
    if args.out:
        import os
        import platform

        import torch

        out = Path(args.out)
        doc = json.loads(out.read_text()) if out.is_file() else {}
        doc[Path(args.model).name] = {
            "command": command,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, 1 thread",
            "settings": s,
            "rows": rows,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
