"""What checking a prepared dataset costs: the start-up check of every run and the full `llmtrain verify`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verify_bench.py [--gb 4] [--dir /tmp/verify-bench] [--out FILE]

Writes a synthetic dataset of `--gb` GB in the default shard size (100 M uint16 tokens = 200 MB per .bin,
random ids, 1,000-token documents) with the real ShardWriter (so its checksums are computed the way
prepare-data computes them), then times, each cold (the files dropped from the page cache with
posix_fadvise(DONTNEED) first) and warm:
- `check_dataset(mode="auto")`: what every run does at start (above 256 MiB: headers, sizes, one 1 MiB block
  per shard file hashed and range-checked);
- `check_dataset(mode="full")`: what `llmtrain verify DIR` does (every block).
and extrapolates both to a 100 GB dataset in the same shard size (start-up: per shard file; full: per byte).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_TOKENS = 100_000_000  # prepare-data's default --shard-tokens
VOCAB = 50257


def build(out: Path, gb: float) -> int:
    """The dataset (train shards of SHARD_TOKENS, one small val shard); returns the number of train shards."""
    import numpy as np

    from llmtrain.data.format import BLOCK_SIZE, CHECKSUM_ALGORITHM, FORMAT_NAME, VERSION, ShardWriter, write_manifest

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n_shards = max(1, round(gb * 1e9 / (2 * SHARD_TOKENS)))
    files = {}
    names = [f"train_{k:05d}" for k in range(n_shards)] + ["val_00000"]
    for name in names:
        w = ShardWriter(out / name, np.dtype(np.uint16))
        tokens = SHARD_TOKENS if name.startswith("train") else 1_000_000
        for _ in range(tokens // 10_000_000):
            w.add_docs(rng.integers(0, VOCAB, 10_000_000, dtype=np.uint16), np.full(10_000, 1000))
        files.update(w.close()["checksums"])  # hashed as prepare-data hashes them
    manifest = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "dtype": "uint16",
        "tokenizer": {"hash": "bench", "vocab_size": VOCAB, "eos_id": VOCAB - 1, "kind": "bpe"},
        "splits": {"train": {"shards": names[:-1]}, "val": {"shards": names[-1:]}},
        "checksums": {"algorithm": CHECKSUM_ALGORITHM, "block_size": BLOCK_SIZE, "files": files},
    }
    write_manifest(out, manifest)
    return n_shards


def sha256_rate() -> float:
    """GB/s of raw sha256 over 256 MiB in memory on this core right now (the machine may be shared)."""
    import hashlib

    buf = memoryview(os.urandom(256 << 20))
    t = time.perf_counter()
    for i in range(256):
        hashlib.sha256(buf[i << 20 : (i + 1) << 20]).digest()
    return (256 << 20) / (time.perf_counter() - t) / 1e9


def prepare_hashing(d: Path) -> float:
    """Seconds to compute every shard's checksums from the page cache: what prepare-data adds."""
    from llmtrain.data.format import shard_checksums

    for f in d.glob("*.bin"):
        f.read_bytes()  # warm
    t = time.perf_counter()
    for f in d.glob("*.bin"):
        shard_checksums(f.with_suffix(""))
    return time.perf_counter() - t


def drop_cache(d: Path) -> None:
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(d: Path, mode: str, cold: bool) -> dict:
    from llmtrain.data.verify import check_dataset

    if cold:
        drop_cache(d)
    t = time.perf_counter()
    r = check_dataset(d, mode=mode)
    secs = time.perf_counter() - t
    return {
        "seconds": round(secs, 3),
        "bytes_hashed": r.bytes,
        "blocks": r.blocks,
        "files": r.files,
        "GB_per_s": round(r.bytes / secs / 1e9, 3),
        "raw_sha256_GB_per_s_now": round(sha256_rate(), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--dir", default="/tmp/verify-bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verify_bench.json"))
    ap.add_argument("--keep", action="store_true", help="keep the dataset (and reuse one already in --dir)")
    args = ap.parse_args()
    d = Path(args.dir)
    if not (args.keep and (d / "manifest.json").exists()):
        shutil.rmtree(d, ignore_errors=True)
        build(d, args.gb)
    size = sum(f.stat().st_size for f in d.iterdir())
    hashing = prepare_hashing(d)
    res = {
        "dataset_bytes": size,
        "shards": len(list(d.glob("train_*.bin"))),
        "prepare_hashing_seconds": round(hashing, 2),
        "prepare_hashing_GB_per_s": round(size / hashing / 1e9, 3),
        "raw_sha256_GB_per_s_now": round(sha256_rate(), 3),
    }
    for mode in ("auto", "full"):
        for cold in (True, False):
            res[f"{mode}_{'cold' if cold else 'warm'}"] = timed(d, mode, cold)
    files_100gb = 2 * round(100e9 / (2 * SHARD_TOKENS))  # .bin + .idx per shard
    per_file_cold = res["auto_cold"]["seconds"] / res["auto_cold"]["files"]
    res["extrapolated_100GB"] = {
        "start_up_check_cold_s": round(per_file_cold * files_100gb, 1),
        "full_verify_cold_s": round(res["full_cold"]["seconds"] * 100e9 / size, 1),
        "full_verify_warm_s": round(res["full_warm"]["seconds"] * 100e9 / size, 1),
        "basis": f"{files_100gb} shard files of the default size; linear in files (start-up) and bytes (full)",
    }
    res["cpu"] = os.cpu_count()
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
