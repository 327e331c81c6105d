"""Data pipeline benchmarks, measured side by side in one run; results written as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_bench.py [--workers N] [--out FILE]

1. prepare: `write_dataset` tokens/s vs raw HF `tokenizers` `encode_batch` over the same texts, the raw
   run given the same number of threads as prepare gets worker processes (target: >= 0.9x).
2. loader: `train_batches` vs a raw numpy-memmap random-window batcher at the same (B, T) (>= 0.5x).
3. resume: time to the first batch when resuming at global sample 10**8 (< 1 s).
4. memory: peak RSS of `prepare-data` (main process and largest worker) on corpora 1x and 4x in size,
   all several times larger than the shard size (flat).
The corpus is the bundled one (KJV + Shakespeare) split into paragraphs, so batches balance across workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtrain.data import DataConfig, build_data  # noqa: E402
from llmtrain.data.bundled import bundled_tokenizer_dir, cache_root  # noqa: E402
from llmtrain.data.corpus import bundled_documents  # noqa: E402
from llmtrain.data.tokenizer import load_tokenizer  # noqa: E402


def paragraphs() -> list[str]:
    docs = (text for _, text in bundled_documents(cache_root() / "downloads"))
    return [p for d in docs for p in d.split("\n\n") if p.strip()]


def bench_prepare(texts: list[str], tok_dir: Path, workers: int, tmp: Path, repeats: int = 3) -> dict:
    """Best of `repeats`, raw and ours interleaved so that load from other processes hits both alike."""
    from llmtrain.data.prepare import write_dataset

    tok = load_tokenizer(tok_dir)
    raw_times, our_times, tokens = [], [], 0
    for r in range(repeats):
        t = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), 512):
            tokens += sum(len(e.ids) for e in tok.hf.encode_batch(texts[i:i + 512], add_special_tokens=False))
        raw_times.append(time.perf_counter() - t)
        out = tmp / f"prep{r}"
        t = time.perf_counter()
        write_dataset(iter(texts), tok, out, source={"bench": "paragraphs"}, workers=workers, progress=False,
                      batch_docs=256, shard_tokens=10**9)
        our_times.append(time.perf_counter() - t)
        shutil.rmtree(out)
    raw, ours = tokens / min(raw_times), tokens / min(our_times)
    return {"docs": len(texts), "tokens": tokens, "workers": workers, "raw_encode_batch_tokens_per_s": round(raw),
            "prepare_tokens_per_s": round(ours), "ratio": round(ours / raw, 3), "target": ">= 0.9",
            "raw_seconds": [round(x, 3) for x in raw_times], "prepare_seconds": [round(x, 3) for x in our_times]}


def bench_loader(B: int, T: int, steps: int = 300) -> dict:
    d = build_data(DataConfig(), seq_len=T, seed=0, micro_batch_size=B, grad_accum=1, dp_rank=0, dp_size=1)
    import torch

    flat = d.sources[0].train.shards[0].tokens  # the raw baseline reads the same memmap
    rng = np.random.default_rng(0)
    ar = np.arange(T + 1)

    def raw_batch() -> dict:
        starts = rng.integers(0, len(flat) - T - 1, size=B)
        x = flat[starts[:, None] + ar].astype(np.int64)
        return {"input_ids": torch.from_numpy(x[:, :-1].copy()), "labels": torch.from_numpy(x[:, 1:].copy())}

    best = {"raw": float("inf"), "ours": float("inf")}
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            raw_batch()
        best["raw"] = min(best["raw"], time.perf_counter() - t)
        t = time.perf_counter()
        for s in range(steps):
            d.train_batches(s)
        best["ours"] = min(best["ours"], time.perf_counter() - t)
    raw, ours = steps / best["raw"], steps / best["ours"]
    need = step_need_tokens_per_s(T)
    return {"B": B, "T": T, "raw_memmap_batches_per_s": round(raw, 1), "loader_batches_per_s": round(ours, 1),
            "ratio": round(ours / raw, 3), "target": ">= 0.5", "loader_tokens_per_s": round(ours * B * T),
            "one_gpu_needs_tokens_per_s": round(need["tokens_per_s"]), "need_basis": need["basis"],
            "headroom": round(ours * B * T / need["tokens_per_s"], 1)}


def step_need_tokens_per_s(T: int, mfu: float = 0.5) -> dict:
    """Tokens/s one H100 consumes training gpt_125m at seq T and `mfu` (an upper bound on what a step asks
    of the loader per GPU; each data-parallel rank runs its own loader)."""
    from llmtrain.models.config import MODEL_SIZES
    from llmtrain.train.flops import PEAK_BF16, model_flops_per_token

    m = MODEL_SIZES["gpt_125m"]
    matmul = 12 * m["n_layer"] * m["n_embd"] ** 2 + m["vocab_size"] * m["n_embd"]  # blocks + tied head
    peak = dict(PEAK_BF16)["H100"]
    return {"tokens_per_s": mfu * peak / model_flops_per_token(matmul, m["n_layer"], m["n_embd"], T),
            "basis": f"gpt_125m at seq {T}, {mfu:.0%} MFU of an H100's {peak / 1e12:.0f} TFLOP/s bf16"}


def bench_resume(B: int, T: int) -> dict:
    gb = B
    t = time.perf_counter()
    d = build_data(DataConfig(), seq_len=T, seed=0, micro_batch_size=B, grad_accum=1, dp_rank=0, dp_size=1)
    d.load_state_dict({"base_step": 10**8 // gb, "base_samples": 10**8, "global_batch": gb})
    t_built = time.perf_counter()
    d.train_batches(10**8 // gb)
    t_first = time.perf_counter()
    return {"resume_sample": 10**8, "build_seconds": round(t_built - t, 4),
            "first_batch_seconds": round(t_first - t_built, 4), "total_seconds": round(t_first - t, 4),
            "epochs_skipped": 10**8 // d.n_train[0], "target": "< 1 s"}


def bench_memory(texts: list[str], tok_dir: Path, workers: int, tmp: Path, scales: tuple[int, ...]) -> dict:
    """Peak RSS of prepare-data in a fresh process per corpus size (ru_maxrss of it and of its children)."""
    out = {}
    for scale in scales:
        corpus = tmp / f"corpus{scale}.jsonl"
        with open(corpus, "w") as f:
            for _ in range(scale):
                for t in texts:
                    f.write(json.dumps({"text": t}) + "\n")
        code = ("import resource,sys; from llmtrain.data.cli import main; "
                f"rc = main(['prepare-data','--input',{str(corpus)!r},'--tokenizer',{str(tok_dir)!r},'--out',"
                f"{str(tmp / f'ds{scale}')!r},'--workers','{workers}','--shard-tokens','500000','--no-progress']); "
                "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        lines = proc.stdout.strip().splitlines()
        summary = json.loads(lines[0])
        _, main_kb, child_kb = lines[-1].split()
        out[f"{scale}x"] = {"corpus_mb": round(corpus.stat().st_size / 2**20, 1), "tokens": summary["train"]["tokens"],
                            "shards": summary["shards"], "peak_rss_main_mb": round(int(main_kb) / 1024, 1),
                            "peak_rss_worker_mb": round(int(child_kb) / 1024, 1)}
        shutil.rmtree(tmp / f"ds{scale}")
        corpus.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--scales", default="1,4")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_bench.json"))
    args = ap.parse_args()
    # The raw baseline gets as many tokenizer threads as prepare gets processes; tokenizers reads this
    # once, when its thread pool starts, so it is set before anything tokenizes.
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    tok_dir = bundled_tokenizer_dir(DataConfig())
    texts = paragraphs()
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "corpus": "bundled KJV + Shakespeare, one document per paragraph"}
    with tempfile.TemporaryDirectory() as tmp:
        result["prepare"] = bench_prepare(texts, tok_dir, args.workers, Path(tmp))
        print(json.dumps(result["prepare"]), flush=True)
        result["loader"] = bench_loader(args.B, args.T)
        print(json.dumps(result["loader"]), flush=True)
        result["resume"] = bench_resume(args.B, args.T)
        print(json.dumps(result["resume"]), flush=True)
        result["memory"] = bench_memory(texts, tok_dir, args.workers, Path(tmp),
                                        tuple(int(s) for s in args.scales.split(",")))
        print(json.dumps(result["memory"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
