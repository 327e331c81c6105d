"""The on-disk token format: `.bin` (tokens) + `.idx` (document ends) shards and a `manifest.json`.

    <dataset>/manifest.json        written last: its presence means the dataset is complete
    <dataset>/tokenizer.json       the tokenizer the tokens came from (its hash is in the manifest)
    <dataset>/<split>_00000.bin    32-byte header + `count` tokens (uint16 when the vocab fits, else uint32)
    <dataset>/<split>_00000.idx    32-byte header + `count` uint64 document end offsets (EOS included)

    <dataset>/<split>_00000.mask   only with a loss mask (chat / preference data, manifest `loss_mask`):
                                   32-byte header + `count` uint8, 1 = this token is a training target

Every header is `<8s I I Q Q`: magic, format version, item size in bytes, item count, and (idx only)
the token count of the matching `.bin`, so a truncated or mismatched pair is caught on open.

The loss mask is a channel parallel to the tokens: the loader turns `labels` into -100 wherever the mask
of the predicted token is 0. A dataset with one writes manifest version 2 (`MASKED_VERSION`), which an
llmtrain that knows no masks refuses instead of silently training on every token; version 1 datasets
(no mask) read as before.

The manifest's `checksums` record each shard file's size and a digest of every `BLOCK_SIZE` bytes of
it (the first 16 hex digits of the block's sha256): a start-up check can hash a few blocks of every
shard, `llmtrain verify` all of them (`verify.py`). Manifests written before checksums existed lack
the key; such datasets still train (with a notice).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.errors import DataError

VERSION = 1
BIN_MAGIC = b"LLMTBIN\x00"
IDX_MAGIC = b"LLMTIDX\x00"
MASK_MAGIC = b"LLMTMSK\x00"
MASKED_VERSION = 2  # manifest version of a dataset with a loss mask (shard headers stay VERSION)
HEADER = struct.Struct("<8sIIQQ")
MANIFEST = "manifest.json"
FORMAT_NAME = "llmtrain-tokens"
REPREPARE = "delete the dataset directory and run `llmtrain prepare-data` again"
BLOCK_SIZE = 1 << 20  # bytes per checksummed block: 16 manifest bytes per MiB of shards
DIGEST_HEX = 16  # hex digits kept of each block's sha256 (64 bits: ample against corruption)
CHECKSUM_ALGORITHM = f"sha256[:{DIGEST_HEX}] per {BLOCK_SIZE} bytes"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def block_digest(block: bytes | memoryview) -> str:
    return hashlib.sha256(block).hexdigest()[:DIGEST_HEX]


def file_checksum(path: Path) -> dict[str, Any]:
    """{"size", "blocks"}: the file's size and its block digests concatenated (one read of the file)."""
    digests = []
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            digests.append(block_digest(block))
    return {"size": Path(path).stat().st_size, "blocks": "".join(digests)}


def shard_checksums(stem: Path) -> dict[str, dict[str, Any]]:
    """Checksums of a shard's files, keyed by file name (`train_00000.bin`, `.idx`, and `.mask` if it has one)."""
    stem = Path(stem)
    files = [stem.with_suffix(".bin"), stem.with_suffix(".idx"), stem.with_suffix(".mask")]
    return {p.name: file_checksum(p) for p in files if p.suffix != ".mask" or p.exists()}


class ShardWriter:
    """Appends documents to `<stem>.bin`/`.idx` (and `.mask` with `mask=True`) written under temporary names,
    renamed on `close`."""

    def __init__(self, stem: Path, dtype: np.dtype, mask: bool = False) -> None:
        self.stem, self.dtype = Path(stem), np.dtype(dtype)
        self._bin_tmp = self.stem.with_suffix(".bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._bin.write(HEADER.pack(BIN_MAGIC, VERSION, self.dtype.itemsize, 0, 0))
        self._mask_tmp = self.stem.with_suffix(".mask.tmp")
        self._mask = open(self._mask_tmp, "wb") if mask else None
        if self._mask is not None:
            self._mask.write(HEADER.pack(MASK_MAGIC, VERSION, 1, 0, 0))
        self._ends: list[np.ndarray] = []
        self.tokens = self.docs = 0

    def add(self, ids: np.ndarray) -> None:
        """One document's tokens, EOS already appended."""
        self.add_docs(ids, np.array([len(ids)]))

    def add_docs(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Consecutive documents: their tokens (each with its EOS) concatenated, and each one's length; with a
        mask channel, `mask` (one 0/1 per token) too."""
        if (mask is None) != (self._mask is None):
            raise ValueError(f"{self.stem}: a loss mask must be given exactly when the writer has a mask channel")
        if self._mask is not None:
            assert mask is not None and len(mask) == len(tokens)
            self._mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self._ends.append(self.tokens + np.cumsum(lengths, dtype=np.uint64))
        self.tokens += len(tokens)
        self.docs += len(lengths)

    def pop_last(self) -> np.ndarray:
        """Take the last document added back out (its tokens, EOS included); only before `close`."""
        assert self._mask is None, "pop_last is for unmasked shards"
        ends = np.concatenate(self._ends)
        start = int(ends[-2]) if len(ends) > 1 else 0
        self._bin.flush()
        with open(self._bin_tmp, "rb") as f:
            f.seek(HEADER.size + start * self.dtype.itemsize)
            tokens = np.frombuffer(f.read(), dtype=self.dtype)
        self._bin.seek(HEADER.size + start * self.dtype.itemsize)
        self._bin.truncate()
        self._ends, self.tokens, self.docs = [ends[:-1]], start, self.docs - 1
        return tokens

    def discard(self) -> None:
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        if self._mask is not None:
            self._mask.close()
            self._mask_tmp.unlink(missing_ok=True)

    def close(self) -> dict[str, Any]:
        self._bin.seek(0)
        self._bin.write(HEADER.pack(BIN_MAGIC, VERSION, self.dtype.itemsize, self.tokens, 0))
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        idx_tmp = self.stem.with_suffix(".idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(HEADER.pack(IDX_MAGIC, VERSION, 8, self.docs, self.tokens))
            for ends in self._ends:
                f.write(ends.tobytes())
        if self._mask is not None:
            self._mask.seek(0)
            self._mask.write(HEADER.pack(MASK_MAGIC, VERSION, 1, self.tokens, 0))
            self._mask.flush()
            os.fsync(self._mask.fileno())
            self._mask.close()
            os.replace(self._mask_tmp, self.stem.with_suffix(".mask"))
        os.replace(self._bin_tmp, self.stem.with_suffix(".bin"))
        os.replace(idx_tmp, self.stem.with_suffix(".idx"))
        # Hashed from the page cache it was just written to: ~1.7 GB/s, under 1% of tokenizing time.
        return {"tokens": self.tokens, "docs": self.docs, "checksums": shard_checksums(self.stem)}


def read_header(path: Path, magic: bytes) -> tuple[int, int, int]:
    if not path.exists():
        raise DataError(f"{path}: missing shard file; {REPREPARE}")
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise DataError(f"{path}: truncated shard ({len(head)} bytes, shorter than its header); {REPREPARE}")
    got, version, itemsize, count, extra = HEADER.unpack(head)
    if got != magic:
        raise DataError(
            f"{path}: bad magic {got!r} (expected {magic!r}): not an llmtrain shard or corrupt; {REPREPARE}"
        )
    if version != VERSION:
        raise DataError(f"{path}: format version {version}, this llmtrain reads version {VERSION}; {REPREPARE}")
    want = HEADER.size + count * itemsize
    if path.stat().st_size != want:
        raise DataError(
            f"{path}: size {path.stat().st_size} bytes does not match its header ({count} items of "
            f"{itemsize} bytes = {want} bytes): truncated or corrupt; {REPREPARE}"
        )
    return itemsize, count, extra


@dataclass
class Shard:
    """A memory-mapped shard: `tokens` (count,), `ends` (docs,) document end offsets and, for a dataset with a
    loss mask, `mask` (count,) uint8 (None without one)."""

    path: Path
    tokens: np.ndarray
    ends: np.ndarray
    mask: np.ndarray | None = None

    @classmethod
    def open(cls, stem: Path, mask: bool = False) -> Shard:
        bin_path, idx_path = Path(stem).with_suffix(".bin"), Path(stem).with_suffix(".idx")
        itemsize, count, _ = read_header(bin_path, BIN_MAGIC)
        if itemsize not in (2, 4):
            raise DataError(f"{bin_path}: token item size {itemsize} is neither 2 nor 4; {REPREPARE}")
        _, docs, idx_tokens = read_header(idx_path, IDX_MAGIC)
        if idx_tokens != count:
            raise DataError(
                f"{idx_path}: index says {idx_tokens} tokens but {bin_path.name} holds {count}: the "
                f"pair does not belong together; {REPREPARE}"
            )
        dtype = np.uint16 if itemsize == 2 else np.uint32
        tokens = (
            np.memmap(bin_path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))
            if count
            else np.zeros(0, dtype)
        )
        ends = (
            np.memmap(idx_path, dtype=np.uint64, mode="r", offset=HEADER.size, shape=(docs,))
            if docs
            else np.zeros(0, np.uint64)
        )
        # Plain ndarray views of the maps (the maps stay alive as their base): indexing skips memmap's wrapping.
        tokens, ends = tokens.view(np.ndarray), ends.view(np.ndarray)
        if docs and int(ends[-1]) != count:
            raise DataError(
                f"{idx_path}: last document ends at {int(ends[-1])}, not at the {count} tokens of "
                f"{bin_path.name}: corrupt index; {REPREPARE}"
            )
        return cls(Path(stem), tokens, ends, _open_mask(Path(stem).with_suffix(".mask"), count) if mask else None)


def _open_mask(path: Path, count: int) -> np.ndarray:
    """The loss mask of a shard of `count` tokens (missing or mismatched: DataError)."""
    itemsize, n, _ = read_header(path, MASK_MAGIC)
    if itemsize != 1 or n != count:
        raise DataError(
            f"{path}: loss mask of {n} items of {itemsize} bytes does not match the {count} tokens of "
            f"{path.with_suffix('.bin').name}; {REPREPARE}"
        )
    if not count:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER.size, shape=(count,)).view(np.ndarray)


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / MANIFEST)


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    d = Path(dataset_dir)
    f = d / MANIFEST
    if not f.exists():
        hint = (
            "an interrupted `llmtrain prepare-data` leaves no manifest: run it again to finish"
            if d.is_dir()
            else "prepare one with `llmtrain prepare-data --out DIR`"
        )
        raise DataError(f"{f}: no manifest, so {d} is not a complete prepared dataset; {hint}")
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{f}: not valid JSON ({exc}); {REPREPARE}") from None
    if m.get("format") != FORMAT_NAME or m.get("version") not in (VERSION, MASKED_VERSION):
        raise DataError(
            f"{f}: format {m.get('format')!r} version {m.get('version')!r}, expected "
            f"{FORMAT_NAME!r} version {VERSION} or {MASKED_VERSION}; {REPREPARE}"
        )
    if (m["version"] == MASKED_VERSION) != bool(m.get("loss_mask")):
        raise DataError(
            f"{f}: version {m['version']} with loss_mask={m.get('loss_mask')!r} (edited or corrupt); {REPREPARE}"
        )
    sums = m.get("checksums")
    if sums is not None and not (
        isinstance(sums, dict)
        and isinstance(sums.get("files"), dict)
        and isinstance(sums.get("block_size"), int)
        and sums["block_size"] % 8 == 0
        and all(isinstance(v, dict) and {"size", "blocks"} <= set(v) for v in sums["files"].values())
    ):
        raise DataError(f"{f}: its 'checksums' are malformed (edited or corrupt); {REPREPARE}")
    return m
