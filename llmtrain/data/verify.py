"""Integrity of a prepared dataset: the check every run makes at start, and `llmtrain verify`'s full one.

`prepare-data` records in the manifest, for every shard file, its size and the digest of each 1 MiB
block (`format.py`). What is checked, and what it costs (sha256 runs at ~1.7 GB/s on one core here):

- always, at every start: every shard's header (magic, version, item size) and size against its header
  and the manifest, and that each `.idx` (and loss-mask `.mask`) belongs to its `.bin` (`Shard.open`);
- at start, `data.verify=auto` (the default): every block of every shard when the dataset holds at most
  `FULL_CHECK_BYTES`; above that, `SAMPLE_BLOCKS` block(s) per shard file, chosen by a hash of the file's
  name (the same blocks on every rank, so all ranks reach the same verdict). A 100 GB dataset in the
  default 200 MB shards reads and hashes ~0.9 GB of its 1,000 files: ~3 s cold, extrapolated from
  `benchmarks/verify_bench.py` on a 4 GB dataset (0.12 s);
- `llmtrain verify DIR` / `data.verify=full`: every block of every file.

Each block read is also checked for content: token ids below the tokenizer's vocabulary (`.bin`) and
non-decreasing document ends within the shard's token count (`.idx`), loss-mask values 0 or 1 (`.mask`). The loader checks the ids of every
batch as well (`TokenStream`), so an id out of range is a `DataError` naming the shard, never an
`IndexError` inside the model.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.data.format import (
    BLOCK_SIZE,
    CHECKSUM_ALGORITHM,
    DIGEST_HEX,
    HEADER,
    IDX_MAGIC,
    MANIFEST,
    REPREPARE,
    Shard,
    block_digest,
    read_header,
    read_manifest,
    write_manifest,
)
from llmtrain.errors import DataError

FULL_CHECK_BYTES = 256 << 20  # datasets up to this size are hashed whole at every start (~0.15 s of sha256)
SAMPLE_BLOCKS = 1  # blocks per shard file hashed at start above that size
THREADS = min(8, os.cpu_count() or 1)  # files checked at once
MODES = ("auto", "full", "sample", "off")


@dataclass
class Report:
    """What a check covered: `blocks` hashed (and content-checked), out of `total_blocks`."""

    path: Path
    files: int = 0
    bytes: int = 0
    blocks: int = 0
    total_blocks: int = 0
    tokens: int = 0  # token ids range-checked
    has_checksums: bool = True
    seconds: float = 0.0
    digests: dict[str, dict[str, Any]] = field(default_factory=dict)  # every file's, after a full check


def shard_files(manifest: dict[str, Any]) -> list[str]:
    """Every shard file of the dataset, `.bin` then `.idx` (then `.mask` with a loss mask) of each shard, in
    split and shard order."""
    exts = (".bin", ".idx", ".mask") if manifest.get("loss_mask") else (".bin", ".idx")
    return [f"{stem}{ext}" for split in manifest["splits"].values() for stem in split["shards"] for ext in exts]


def sample_blocks(name: str, n_blocks: int) -> list[int]:
    """The blocks of file `name` hashed by a sampled start-up check: a hash of the name, identical on every rank."""
    if n_blocks <= SAMPLE_BLOCKS:
        return list(range(n_blocks))
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return sorted({(seed + i * 0x9E3779B97F4A7C15) % n_blocks for i in range(SAMPLE_BLOCKS)})


def check_dataset(
    path: str | Path, manifest: dict[str, Any] | None = None, *, mode: str = "auto", progress: bool = False
) -> Report:
    """Check the dataset at `path` (see the module docstring for `mode`); raises DataError naming the file."""
    if mode not in MODES:
        raise DataError(f"data.verify={mode!r}: use one of {', '.join(MODES)}")
    started = time.perf_counter()
    path = Path(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    recorded = manifest.get("checksums")
    report = Report(path, has_checksums=recorded is not None)
    block_size = int(recorded["block_size"]) if recorded else BLOCK_SIZE
    for split in manifest["splits"].values():
        for stem in split["shards"]:
            # headers, sizes, and that the .idx (and .mask) belong to the .bin
            Shard.open(path / stem, mask=bool(manifest.get("loss_mask")))
    files = [(name, _checked_size(path, name, recorded)) for name in shard_files(manifest)]
    report.files = len(files)
    total = sum(size for _, size in files)
    full = mode == "full" or (mode == "auto" and total <= FULL_CHECK_BYTES)
    if mode == "off":
        report.seconds = time.perf_counter() - started
        return report
    checker = _ContentChecker(path, manifest, block_size)
    # sha256 and file reads release the GIL: threads hash several files at once (and overlap slow reads).
    with _progress(progress, total if full else None, path) as bar, ThreadPoolExecutor(THREADS) as pool:
        jobs = []
        for name, size in files:
            n_blocks = -(-size // block_size)
            blocks = range(n_blocks) if full else sample_blocks(name, n_blocks)
            want = recorded["files"][name]["blocks"] if recorded else None
            jobs.append(pool.submit(_check_blocks, path / name, blocks, block_size, want, checker, bar))
            report.total_blocks += n_blocks
        try:
            for (name, size), job in zip(files, jobs):  # in file order: the first bad file is the one named
                digests, tokens, nbytes = job.result()
                report.blocks, report.bytes, report.tokens = (
                    report.blocks + len(digests),
                    report.bytes + nbytes,
                    report.tokens + tokens,
                )
                if full:
                    report.digests[name] = {"size": size, "blocks": "".join(digests)}
        finally:
            for job in jobs:
                job.cancel()
    report.seconds = time.perf_counter() - started
    return report


def _check_blocks(
    file: Path, blocks: Iterable[int], block_size: int, want: str | None, checker: _ContentChecker, bar: Any
) -> tuple[list[str], int, int]:
    """Hash and content-check these blocks of `file` against the recorded digests `want`; returns their
    digests, the token ids checked and the bytes read."""
    digests, tokens, nbytes = [], 0, 0
    with open(file, "rb") as f:
        for i in blocks:
            f.seek(i * block_size)
            block = f.read(block_size)
            digests.append(block_digest(block))
            if want is not None and digests[-1] != want[i * DIGEST_HEX : (i + 1) * DIGEST_HEX]:
                raise DataError(
                    f"{file}: block {i} (bytes {i * block_size}-{i * block_size + len(block)}) does not "
                    f"match its checksum in {file.parent / MANIFEST}: the shard is corrupt (bad disk or "
                    f"copy); copy the dataset again from a good source, or {REPREPARE}"
                )
            tokens += checker.check(file.name, i, block)
            nbytes += len(block)
            bar.update(len(block))
    return digests, tokens, nbytes


def _checked_size(path: Path, name: str, recorded: dict[str, Any] | None) -> int:
    """The file's size, which must be the size the manifest recorded."""
    file = path / name
    size = file.stat().st_size
    if recorded is not None:
        want = recorded["files"].get(name)
        if want is None:
            raise DataError(f"{file}: not listed in the checksums of {path / MANIFEST}; {REPREPARE}")
        if want["size"] != size:
            raise DataError(
                f"{file}: {size} bytes, but {want['size']} were written ({path / MANIFEST}): the "
                f"shard was replaced or changed; {REPREPARE}"
            )
    return size


class _ContentChecker:
    """Token ids of `.bin` blocks below the vocabulary; document ends of `.idx` blocks ordered and in range;
    loss-mask values of `.mask` blocks 0 or 1."""

    def __init__(self, path: Path, manifest: dict[str, Any], block_size: int) -> None:
        self.path, self.vocab, self.block_size = path, int(manifest["tokenizer"]["vocab_size"]), block_size
        self.dtype = np.dtype(manifest["dtype"])
        self._last: dict[str, tuple[int, int]] = {}  # .idx file -> (last block read, its last document end)
        self._tokens: dict[str, int] = {}

    def check(self, name: str, i: int, block: bytes) -> int:
        """Check block `i` of shard file `name`; returns the number of token ids it checked."""
        skip = HEADER.size if i == 0 else 0  # blocks are multiples of every item size: items never straddle
        if name.endswith(".mask"):
            flags = np.frombuffer(block, dtype=np.uint8, offset=skip)
            if len(flags) and int(flags.max()) > 1:
                k = int(np.argmax(flags > 1))
                raise DataError(
                    f"{self.path / name}: loss-mask value {int(flags[k])} at token "
                    f"{i * self.block_size + skip - HEADER.size + k} is neither 0 nor 1: corrupt mask; {REPREPARE}"
                )
            return 0
        if name.endswith(".bin"):
            ids = np.frombuffer(block, dtype=self.dtype, offset=skip)
            if len(ids) and int(ids.max()) >= self.vocab:
                k = int(np.argmax(ids >= self.vocab))
                token = (i * self.block_size + skip - HEADER.size) // self.dtype.itemsize + k
                raise DataError(
                    f"{self.path / name}: token id {int(ids[k])} at token {token} is outside the "
                    f"tokenizer's {self.vocab}-token vocabulary ({self.path / MANIFEST}): the shard is "
                    f"corrupt or was made with another tokenizer; {REPREPARE}"
                )
            return len(ids)
        ends = np.frombuffer(block, dtype=np.uint64, offset=skip).astype(np.int64)
        if not len(ends):
            return 0
        last_i, last_end = self._last.get(name, (-1, 0))
        # A block read right after its predecessor (a full check) continues from that block's last end.
        floor = last_end if i == last_i + 1 else (0 if i == 0 else int(ends[0]))
        tokens = self._idx_tokens(name)
        if int(ends[0]) < floor or (np.diff(ends) < 0).any() or int(ends[-1]) > tokens:
            raise DataError(
                f"{self.path / name}: document ends in block {i} are out of order or beyond the shard's "
                f"{tokens} tokens: corrupt index; {REPREPARE}"
            )
        self._last[name] = (i, int(ends[-1]))
        return 0

    def _idx_tokens(self, name: str) -> int:
        """The token count an `.idx` header records (that of its `.bin`, checked on open)."""
        if name not in self._tokens:
            self._tokens[name] = read_header(self.path / name, IDX_MAGIC)[2]
        return self._tokens[name]


def add_checksums(path: str | Path, progress: bool = False) -> Report:
    """Record checksums in the manifest of a dataset prepared before they existed, after a full content check
    (token ids, document ends). Trust on first use: they vouch for the files as they are now."""
    path = Path(path)
    manifest = read_manifest(path)
    report = check_dataset(
        path, {k: v for k, v in manifest.items() if k != "checksums"}, mode="full", progress=progress
    )
    if "checksums" not in manifest:
        manifest["checksums"] = {"algorithm": CHECKSUM_ALGORITHM, "block_size": BLOCK_SIZE, "files": report.digests}
        write_manifest(path, manifest)
    return report


def _progress(enabled: bool, total: int | None, path: Path) -> Any:
    from tqdm import tqdm

    return tqdm(
        desc=f"verifying {path}",
        total=total,
        unit="B",
        unit_scale=True,
        disable=not enabled or total is None,
        dynamic_ncols=True,
    )
