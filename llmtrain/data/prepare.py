"""Tokenize a stream of documents into train/val shards (see `format.py`), restartably.

Work is cut into chunks of consecutive input documents; a chunk ends once it holds `shard_tokens`
tokens and then writes one train and one val shard plus `chunk_00000.json`, the marker that it is done.
An interrupted run skips the documents of finished chunks (reading, not tokenizing, them) and goes on.
Memory stays flat: at most `2 * workers` batches of documents are in flight at any time.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.data import tokenize_worker
from llmtrain.data.format import (
    BLOCK_SIZE,
    CHECKSUM_ALGORITHM,
    FORMAT_NAME,
    VERSION,
    ShardWriter,
    shard_checksums,
    token_dtype,
    write_manifest,
)
from llmtrain.data.order import derive_key, mix64
from llmtrain.data.tokenizer import Tokenizer, tokenizer_meta
from llmtrain.errors import DataError

SPLITS = ("train", "val")


def is_val(doc_index: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A document's split is a hash of its input position: stable across restarts and worker counts."""
    if val_fraction <= 0:
        return np.zeros(len(doc_index), dtype=bool)
    h = mix64(np.asarray(doc_index, dtype=np.uint64) ^ np.uint64(derive_key(seed, 0x5A1)))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction


# -- tokenizing, in this process or in workers ---------------------------------------------------


def encoded_batches(
    batches: Iterable[list[str]], tok: Tokenizer, workers: int, dtype: Any = np.uint32
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per batch, in input order: each non-empty text's tokens then EOS, concatenated (`dtype`), and each
    text's length (EOS included; 0 for an empty text). `workers` > 1 tokenizes in that many processes."""
    dtype = np.dtype(dtype)
    typecode = {2: "H", 4: "I"}[dtype.itemsize]
    assert array(typecode).itemsize == dtype.itemsize, "array typecode and dtype disagree on this platform"
    if workers <= 1:
        encode = tokenize_worker.encoder(tok.hf)
        for texts in batches:
            flat, lengths = tokenize_worker.encode_texts(encode, tok.eos_id, typecode, texts)
            yield np.frombuffer(flat, dtype), np.frombuffer(lengths, np.int64)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may hold threads (torch, tokenizers) that fork would copy half-alive.
    init = (tok.hf.to_str(), tok.eos_id, typecode)
    with ProcessPoolExecutor(workers, mp.get_context("spawn"), tokenize_worker.init, init) as pool:
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.submit(tokenize_worker.encode, texts))
            if len(pending) >= 2 * workers:  # bounded prefetch keeps memory flat on any corpus size
                flat, lengths = pending.popleft().result()
                yield np.frombuffer(flat, dtype), np.frombuffer(lengths, np.int64)
        while pending:
            flat, lengths = pending.popleft().result()
            yield np.frombuffer(flat, dtype), np.frombuffer(lengths, np.int64)


def _batched(texts: Iterable[str], skip: int, size: int) -> Iterator[list[str]]:
    it = itertools.islice(texts, skip, None)  # skipped documents are read, not tokenized
    while batch := list(itertools.islice(it, size)):
        yield batch


# -- chunks ----------------------------------------------------------------------------------------


class _Chunk:
    def __init__(self, out: Path, number: int, first_doc: int, dtype: np.dtype) -> None:
        self.out, self.number, self.first_doc = out, number, first_doc
        self.writers = {s: ShardWriter(out / f"{s}_{number:05d}", dtype) for s in SPLITS}
        self.docs = 0
        self.moved_to_val = 0  # training documents moved to validation (_keep_one_val_doc)

    @property
    def tokens(self) -> int:
        return sum(w.tokens for w in self.writers.values())

    def add(self, tokens: np.ndarray, lengths: np.ndarray, val: np.ndarray) -> None:
        """Consecutive documents: their `tokens` (EOS included) concatenated, `lengths`, and which are val."""
        self.docs += len(lengths)
        for split, mine in (("train", ~val), ("val", val)):
            mine = mine & (lengths > 0)  # empty documents add nothing, not even an EOS
            if mine.all():
                self.writers[split].add_docs(tokens, lengths)
            elif mine.any():
                self.writers[split].add_docs(tokens[np.repeat(mine, lengths)], lengths[mine])

    def discard(self) -> None:
        for w in self.writers.values():
            w.discard()

    def close(self, settings: dict[str, Any]) -> dict[str, Any]:
        info = {"chunk": self.number, "first_doc": self.first_doc, "input_docs": self.docs, **settings}
        if self.moved_to_val:
            info["moved_to_val"] = self.moved_to_val
        for s, w in self.writers.items():
            info[s] = {"shard": f"{s}_{self.number:05d}", **w.close()}
        tmp = self.out / f"chunk_{self.number:05d}.json.tmp"
        tmp.write_text(json.dumps(info, sort_keys=True))
        os.replace(tmp, self.out / f"chunk_{self.number:05d}.json")  # the chunk is done only now
        return info


def finished_chunks(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Chunks an earlier run finished, in order; refuses to mix runs with different settings."""
    done: list[dict[str, Any]] = []
    while (f := out / f"chunk_{len(done):05d}.json").exists():
        info = json.loads(f.read_text())
        diff = {k: (info.get(k), v) for k, v in settings.items() if info.get(k) != v}
        if diff:
            raise DataError(
                f"{f}: {out} was prepared with other settings {diff} (earlier, now); use a new --out "
                "directory or delete this one"
            )
        done.append(info)
    return done


def write_dataset(
    texts: Iterable[str],
    tok: Tokenizer,
    out: str | Path,
    *,
    source: dict[str, Any],
    val_fraction: float = 0.0,
    shard_tokens: int = 100_000_000,
    workers: int = 1,
    seed: int = 0,
    batch_docs: int = 512,
    progress: bool = True,
    label: str = "input",
) -> dict[str, Any]:
    """Tokenize `texts` (one document each) into `out`; returns the manifest. Restartable."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    settings = {"tokenizer_hash": tok.hash, "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens}
    chunks = finished_chunks(out, settings)
    skip = sum(c["input_docs"] for c in chunks)
    for stale in out.glob("*.tmp"):  # half-written files of an interrupted chunk
        stale.unlink()
    dtype = token_dtype(tok.vocab_size)
    bar = _progress(progress, label, skip)
    chunk, full_chunk = _Chunk(out, len(chunks), skip, dtype), None
    doc_index, started, new_tokens = skip, time.perf_counter(), 0
    for flat, lengths in encoded_batches(_batched(texts, skip, batch_docs), tok, workers, dtype):
        val = is_val(np.arange(doc_index, doc_index + len(lengths)), val_fraction, seed)
        ends = np.cumsum(lengths)
        a = 0
        while a < len(lengths):  # the documents [a, b) go to this chunk; it closes after the one that fills it
            if full_chunk is not None:  # kept open until a document follows it (see _keep_one_val_doc)
                chunks.append(full_chunk.close(settings))
                full_chunk = None
            start = int(ends[a - 1]) if a else 0
            # the first document with which the chunk reaches `shard_tokens` (len(lengths): none of this batch)
            full = int(np.searchsorted(ends, start + shard_tokens - chunk.tokens))
            b = min(max(full, a) + 1, len(lengths))
            chunk.add(flat[start : ends[b - 1]], lengths[a:b], val[a:b])
            if full < len(lengths):  # shards stay within one document of `shard_tokens`
                full_chunk, chunk = chunk, _Chunk(out, len(chunks) + 1, doc_index + b, dtype)
            a = b
        doc_index += len(lengths)
        new_tokens += len(flat)
        bar.update(len(flat))
    if val_fraction > 0:
        _keep_one_val_doc(chunks, [c for c in (full_chunk, chunk) if c is not None])
    if full_chunk is not None:
        chunks.append(full_chunk.close(settings))
    if chunk.docs or not chunks:
        chunks.append(chunk.close(settings))
    else:
        chunk.discard()
    bar.close()
    manifest = _manifest(out, chunks, tok, source, settings, dtype)
    if manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"] == 0:
        raise DataError(
            f"{label}: the corpus is empty (no document has any text); check the input path and --text-field"
        )
    write_manifest(out, manifest)
    manifest["prepare_seconds"] = time.perf_counter() - started
    manifest["new_tokens"] = new_tokens
    return manifest


def _keep_one_val_doc(done: list[dict[str, Any]], open_chunks: list[_Chunk]) -> None:
    """--val-fraction > 0 on a small corpus may hash no document into validation (587 documents at the default
    0.0005 expect 0.3): then the last training document moves there, so runs can evaluate. Only the last
    chunks are still open, so no finished shard is rewritten; a finished run never needs it again."""

    def docs(split: str) -> int:
        return sum(c[split]["docs"] for c in done) + sum(c.writers[split].docs for c in open_chunks)

    last = next((c for c in reversed(open_chunks) if c.writers["train"].docs), None)
    if docs("val") == 0 and docs("train") >= 2 and last is not None:
        last.writers["val"].add(last.writers["train"].pop_last())
        last.moved_to_val = 1


def _manifest(
    out: Path,
    chunks: list[dict[str, Any]],
    tok: Tokenizer,
    source: dict[str, Any],
    settings: dict[str, Any],
    dtype: np.dtype,
) -> dict[str, Any]:
    splits = {
        s: {
            "shards": [c[s]["shard"] for c in chunks],
            "tokens": sum(c[s]["tokens"] for c in chunks),
            "docs": sum(c[s]["docs"] for c in chunks),
        }
        for s in SPLITS
    }
    files: dict[str, Any] = {}
    for c in chunks:
        for s in SPLITS:  # chunks finished by an llmtrain without checksums are hashed now
            files.update(c[s].get("checksums") or shard_checksums(out / c[s]["shard"]))
    return {
        "format": FORMAT_NAME,
        "version": VERSION,
        "tokenizer": tokenizer_meta(tok),
        "dtype": dtype.name,
        "source": source,
        "input_docs": sum(c["input_docs"] for c in chunks),
        "splits": splits,
        "val_fraction": settings["val_fraction"],
        "seed": settings["seed"],
        "shard_tokens": settings["shard_tokens"],
        "moved_to_val": sum(c.get("moved_to_val", 0) for c in chunks),
        "checksums": {"algorithm": CHECKSUM_ALGORITHM, "block_size": BLOCK_SIZE, "files": files},
    }


def _progress(enabled: bool, label: str, skip: int) -> Any:
    from tqdm import tqdm

    desc = f"tokenizing {label}" + (f" (skipped {skip} docs of finished shards)" if skip else "")
    return tqdm(desc=desc, unit="tok", unit_scale=True, disable=not enabled, dynamic_ncols=True)
