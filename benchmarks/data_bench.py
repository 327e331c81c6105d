"""Data pipeline benchmarks, measured side by side in one run; results written as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_bench.py [--workers N] [--rounds R] [--out FILE]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_bench.py --parts memory   # re-measure one part

1. prepare: `write_dataset` tokens/s vs raw HF `tokenizers` over the same texts (target: >= 0.9x).
2. loader: `train_batches` vs a raw numpy-memmap random-window batcher at the same (B, T) (>= 0.5x).
3. resume: time to the first batch when resuming at global sample 10**8 (< 1 s).
4. memory: peak RSS of `prepare-data` (main process, and the largest worker's own peak: VmHWM sampled
   after its exec) on corpora 1x and 4x in size,
   all several times larger than the shard size (flat); with the CLI's own seconds and tokens/s.
The corpus is the bundled one (KJV + Shakespeare) split into paragraphs, so batches balance across workers.

How the prepare comparison is kept fair (an earlier version reported 0.58x from the same code that measures
~1x here: it took the best of 3 runs on a shared 2-core machine whose load swung 2.5x between runs):
- Both sides get the same parallelism: the raw side `--workers` tokenizer threads (RAYON_NUM_THREADS, set
  before anything tokenizes), prepare `--workers` single-threaded worker processes (they set
  TOKENIZERS_PARALLELISM=false), the same batches of documents, and each run starts from a freshly loaded
  tokenizer (an empty BPE word cache, as every prepare worker starts with).
- The raw side makes the call prepare's workers make, `encode_batch_fast` (ids only, no character offsets;
  `encode_batch` where tokenizers is older than 0.21), so the ratio is the pipeline's overhead alone;
  `ratio_vs_encode_batch` is the same against plain `encode_batch`, the baseline the target was set on.
- `--rounds` rounds, each running every side once, the order rotating; the figures are medians, and the ratio
  is the median of each round's ratio (sides measured seconds apart see the same load).
- This script imports only the standard library at the top: spawned workers re-import the main module, and
  `llmtrain prepare-data`'s main module is light, so the workers here must not pay for numpy & co. either.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def paragraphs() -> list[str]:
    from llmtrain.data.bundled import cache_root
    from llmtrain.data.corpus import bundled_documents

    docs = (text for _, text in bundled_documents(cache_root() / "downloads"))
    return [p for d in docs for p in d.split("\n\n") if p.strip()]


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (prepare's workers)."""
    return sum(
        r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def bench_prepare(
    texts: list[str], tok_dir: Path, workers: int, tmp: Path, rounds: int = 7, batch_docs: int = 512
) -> dict:
    """Raw tokenizing vs `write_dataset`, interleaved (see the module docstring); medians over `rounds`."""
    from llmtrain.data.prepare import write_dataset
    from llmtrain.data.tokenize_worker import encoder
    from llmtrain.data.tokenizer import load_tokenizer

    def raw(encode) -> int:
        return sum(
            len(e.ids)
            for i in range(0, len(texts), batch_docs)
            for e in encode(texts[i : i + batch_docs], add_special_tokens=False)
        )

    def prepare(tok) -> int:
        m = write_dataset(
            iter(texts),
            tok,
            tmp / "prep",
            source={"bench": "paragraphs"},
            workers=workers,
            progress=False,
            batch_docs=batch_docs,
            shard_tokens=10**9,
        )
        shutil.rmtree(tmp / "prep")
        return m["splits"]["train"]["tokens"] - m["splits"]["train"]["docs"]  # without the EOS tokens

    sides = {
        "raw": lambda tok: raw(encoder(tok.hf)),
        "raw_encode_batch": lambda tok: raw(tok.hf.encode_batch),
        "prepare": prepare,
    }
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    tokens = set()
    for r in range(rounds):
        for k in list(sides)[r % 3 :] + list(sides)[: r % 3]:
            tok = load_tokenizer(tok_dir)  # fresh for each run, not timed
            t, c = time.perf_counter(), _cpu_seconds()
            tokens.add(sides[k](tok))
            seconds[k].append(time.perf_counter() - t)
            cpu[k].append(_cpu_seconds() - c)
    assert len(tokens) == 1, f"the sides tokenized different token counts {tokens}"
    n = tokens.pop()
    med = {k: statistics.median(v) for k, v in seconds.items()}

    def ratio(base: str) -> float:
        return round(statistics.median(b / p for b, p in zip(seconds[base], seconds["prepare"])), 3)

    return {
        "docs": len(texts),
        "tokens": n,
        "workers": workers,
        "batch_docs": batch_docs,
        "rounds": rounds,
        "raw_call": encoder(load_tokenizer(tok_dir).hf).__name__,
        "raw_tokens_per_s": round(n / med["raw"]),
        "raw_encode_batch_tokens_per_s": round(n / med["raw_encode_batch"]),
        "prepare_tokens_per_s": round(n / med["prepare"]),
        "ratio": ratio("raw"),
        "target": ">= 0.9",
        "ratio_vs_encode_batch": ratio("raw_encode_batch"),
        **{f"{k}_seconds": [round(x, 3) for x in v] for k, v in seconds.items()},
        "cpu_seconds_median": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
    }


def bench_loader(B: int, T: int, steps: int = 300) -> dict:
    import numpy as np
    import torch

    from llmtrain.data import DataConfig, build_data

    d = build_data(DataConfig(), seq_len=T, seed=0, micro_batch_size=B, grad_accum=1, dp_rank=0, dp_size=1)

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
    return {
        "B": B,
        "T": T,
        "raw_memmap_batches_per_s": round(raw, 1),
        "loader_batches_per_s": round(ours, 1),
        "ratio": round(ours / raw, 3),
        "target": ">= 0.5",
        "loader_tokens_per_s": round(ours * B * T),
        "one_gpu_needs_tokens_per_s": round(need["tokens_per_s"]),
        "need_basis": need["basis"],
        "headroom": round(ours * B * T / need["tokens_per_s"], 1),
    }


def step_need_tokens_per_s(T: int, mfu: float = 0.5) -> dict:
    """Tokens/s one H100 consumes training gpt_125m at seq T and `mfu` (an upper bound on what a step asks
    of the loader per GPU; each data-parallel rank runs its own loader)."""
    from llmtrain.models.config import MODEL_SIZES
    from llmtrain.train.flops import PEAK_BF16, model_flops_per_token

    m = MODEL_SIZES["gpt_125m"]
    matmul = 12 * m["n_layer"] * m["n_embd"] ** 2 + m["vocab_size"] * m["n_embd"]  # blocks + tied head
    peak = dict(PEAK_BF16)["H100"]
    return {
        "tokens_per_s": mfu * peak / model_flops_per_token(matmul, m["n_layer"], m["n_embd"], T),
        "basis": f"gpt_125m at seq {T}, {mfu:.0%} MFU of an H100's {peak / 1e12:.0f} TFLOP/s bf16",
    }


def bench_resume(B: int, T: int) -> dict:
    from llmtrain.data import DataConfig, build_data

    gb = B
    t = time.perf_counter()
    d = build_data(DataConfig(), seq_len=T, seed=0, micro_batch_size=B, grad_accum=1, dp_rank=0, dp_size=1)
    d.load_state_dict({"base_step": 10**8 // gb, "base_samples": 10**8, "global_batch": gb})
    t_built = time.perf_counter()
    d.train_batches(10**8 // gb)
    t_first = time.perf_counter()
    return {
        "resume_sample": 10**8,
        "build_seconds": round(t_built - t, 4),
        "first_batch_seconds": round(t_first - t_built, 4),
        "total_seconds": round(t_first - t, 4),
        "epochs_skipped": 10**8 // d.n_train[0],
        "target": "< 1 s",
    }


# Run inside the measured process: a thread that samples each child's VmHWM (its own peak RSS since exec)
# every 20 ms. RUSAGE_CHILDREN's ru_maxrss would not do: a spawned worker is first a fork of this process,
# and ru_maxrss keeps that instant's size (the parent's) across the exec.
_WATCH_WORKERS = """
import glob, os, threading, time
PEAKS = {}
def _watch():
    while True:
        for path in glob.glob(f'/proc/{os.getpid()}/task/*/children'):
            for pid in open(path).read().split():
                try:
                    status, cmd = open(f'/proc/{pid}/status').read(), open(f'/proc/{pid}/cmdline').read()
                except OSError:
                    continue
                if cmd.endswith('--multiprocessing-fork\\0'):  # a spawned worker after its exec
                    kb = int(status.split('VmHWM:')[1].split()[0])
                    PEAKS[pid] = max(PEAKS.get(pid, 0), kb)
        time.sleep(0.02)
threading.Thread(target=_watch, daemon=True).start()
"""


def bench_memory(texts: list[str], tok_dir: Path, workers: int, tmp: Path, scales: tuple[int, ...]) -> dict:
    """Peak RSS of prepare-data in a fresh process per corpus size (ru_maxrss of it and of its children)."""
    out = {}
    for scale in scales:
        corpus = tmp / f"corpus{scale}.jsonl"
        with open(corpus, "w") as f:
            for _ in range(scale):
                for t in texts:
                    f.write(json.dumps({"text": t}) + "\n")
        code = (
            _WATCH_WORKERS + "import resource; from llmtrain.data.cli import main; "
            f"rc = main(['prepare-data','--input',{str(corpus)!r},'--tokenizer',{str(tok_dir)!r},'--out',"
            f"{str(tmp / f'ds{scale}')!r},'--workers','{workers}','--shard-tokens','500000','--no-progress']); "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, max(PEAKS.values(), default=0))"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        lines = proc.stdout.strip().splitlines()
        summary = json.loads(lines[0])
        _, main_kb, child_kb = lines[-1].split()
        out[f"{scale}x"] = {
            "corpus_mb": round(corpus.stat().st_size / 2**20, 1),
            "tokens": summary["train"]["tokens"],
            "shards": summary["shards"],
            "peak_rss_main_mb": round(int(main_kb) / 1024, 1),
            "peak_rss_worker_mb": round(int(child_kb) / 1024, 1),
            "cli_seconds": summary["seconds"],
            "cli_tokens_per_s": summary["tokens_per_s"],
        }
        shutil.rmtree(tmp / f"ds{scale}")
        corpus.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--scales", default="1,4")
    ap.add_argument("--rounds", type=int, default=7, help="prepare: interleaved rounds (medians over them)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_bench.json"))
    ap.add_argument(
        "--parts",
        default="prepare,loader,resume,memory",
        help="which measurements to run; the others are kept from an existing --out file",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"prepare", "loader", "resume", "memory"}:
        ap.error(
            f"--parts: unknown {sorted(parts - {'prepare', 'loader', 'resume', 'memory'})}; "
            f"choose from prepare,loader,resume,memory"
        )
    # The raw baseline gets as many tokenizer threads as prepare gets processes; tokenizers reads this
    # once, when its thread pool starts, so it is set before anything tokenizes.
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    from llmtrain.data import DataConfig
    from llmtrain.data.bundled import bundled_tokenizer_dir

    tok_dir = bundled_tokenizer_dir(DataConfig())
    texts = paragraphs()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() and parts != {"prepare", "loader", "resume", "memory"} else {}
    result |= {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "corpus": "bundled KJV + Shakespeare, one document per paragraph",
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "prepare": lambda: bench_prepare(texts, tok_dir, args.workers, Path(tmp), args.rounds),
            "loader": lambda: bench_loader(args.B, args.T),
            "resume": lambda: bench_resume(args.B, args.T),
            "memory": lambda: bench_memory(
                texts, tok_dir, args.workers, Path(tmp), tuple(int(s) for s in args.scales.split(","))
            ),
        }
        for name, run in runs.items():
            if name in parts:
                result[name] = run()
                print(json.dumps(result[name]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
