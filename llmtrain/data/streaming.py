"""Streaming mode: train straight from a `datasets` iterable, tokenized on the fly, with resumable state.

For data that was never prepared. The global sample order is the stream's order (documents packed into
`seq_len + 1` windows, EOS between documents), the same on any number of ranks: every rank reads the
stream and keeps its slice of each global batch. The state is the stream position (document index,
token offset) at the start of recent steps, so a resumed run (on any number of ranks) continues exactly;
resuming re-reads the skipped documents without tokenizing them. The first `stream_val_docs` documents
are held out for validation. Random access (shuffling across the corpus) needs `prepare-data`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from llmtrain.data.config import DataConfig
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer
from llmtrain.errors import DataError

KEEP_POSITIONS = 8  # the trainer saves after step k while step k+1 may already be built


class PackedStream:
    """Consecutive (T+1)-token windows (stride T) over the documents of a stream from position (doc, offset)."""

    def __init__(self, docs: Iterator[tuple[int, np.ndarray]], seq_len: int, doc: int, offset: int) -> None:
        self.docs, self.T = docs, seq_len
        self.buf: deque[tuple[int, np.ndarray]] = deque()
        self.doc, self.offset = doc, offset  # where the next window starts
        self.buffered = 0

    def _fill(self, need: int) -> bool:
        while self.buffered - self.offset < need:
            nxt = next(self.docs, None)
            if nxt is None:
                return False
            self.buf.append(nxt)
            self.buffered += len(nxt[1])
        return True

    def take(self) -> np.ndarray | None:
        """The next window, or None at the end of the stream."""
        if not self.buf:
            if not self._fill(1):
                return None
            self.doc = self.buf[0][0]
        if not self._fill(self.T + 1):
            return None
        window = np.concatenate([a for _, a in self.buf])[self.offset : self.offset + self.T + 1]
        self.offset += self.T
        while self.buf and self.offset >= len(self.buf[0][1]):  # drop documents fully behind the next window
            self.offset -= len(self.buf[0][1])
            self.buffered -= len(self.buf[0][1])
            self.buf.popleft()
            if self.buf:
                self.doc = self.buf[0][0]
            else:
                self.doc += 1
        return window.astype(np.int64)


class StreamingData:
    """What `build_data` returns when `data.stream` is set (same contract as the prepared loaders)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer_dir: str,
        *,
        seq_len: int,
        seed: int,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        self.cfg, self.tokenizer_dir, self.seq_len, self.seed = cfg, tokenizer_dir, seq_len, seed
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer_dir)
        self.vocab_size = self.tokenizer.vocab_size
        self.B, self.G, self.dp_rank, self.dp_size = micro_batch_size, grad_accum, dp_rank, dp_size
        self.global_batch = micro_batch_size * grad_accum * dp_size
        self.positions: dict[int, tuple[int, int]] = {0: (cfg.stream_val_docs, 0)}
        self._stream: PackedStream | None = None
        self._next_step = 0
        self._val: list[dict[str, Any]] | None = None

    def check_model_vocab(self, model_vocab_size: int) -> None:
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"{self.tokenizer.source}: the tokenizer has {self.vocab_size} tokens but "
                f"model.vocab_size={model_vocab_size}; set model.vocab_size >= {self.vocab_size}"
            )

    def _docs(self, first: int, last: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(document index, tokens + EOS) from document `first`; skipped documents are read, not tokenized."""
        from llmtrain.data.prepare import _batched, encoded_batches
        from llmtrain.data.reader import iter_texts

        texts = iter_texts(self.cfg.stream, text_field=self.cfg.stream_text_field)
        texts = itertools.islice(texts, first, last)
        index = first
        for flat, lengths in encoded_batches(_batched(texts, 0, 64), self.tokenizer, self.cfg.stream_workers):
            ends = np.cumsum(lengths)
            for j, n in enumerate(lengths.tolist()):
                if n:  # an empty document adds nothing, not even an EOS
                    yield index, flat[ends[j] - n : ends[j]]
                index += 1

    def _global_batch(self, step: int) -> np.ndarray:
        if step != self._next_step or self._stream is None:
            if step not in self.positions:
                raise DataError(
                    f"streaming data can continue only at a step whose position was saved "
                    f"({sorted(self.positions)}), not at step {step}; resume from that checkpoint"
                )
            doc, off = self.positions[step]
            self._stream = PackedStream(self._docs(doc), self.seq_len, doc, off)
        windows = []
        for _ in range(self.global_batch):
            w = self._stream.take()
            if w is None:
                raise DataError(
                    f"{self.cfg.stream}: the stream ended at step {step}; streaming mode runs one pass, "
                    "so lower train.max_steps or add data"
                )
            windows.append(w)
        self._next_step = step + 1
        self.positions[step + 1] = (self._stream.doc, self._stream.offset)
        for old in sorted(self.positions)[:-KEEP_POSITIONS]:
            del self.positions[old]
        return np.stack(windows)

    def train_batches(self, step: int) -> list[dict[str, Any]]:
        x = self._global_batch(step)
        per_rank = self.B * self.G
        mine = x[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [_to_batch(mine[m * self.B : (m + 1) * self.B]) for m in range(self.G)]

    def check_eval(self, n: int) -> None:
        """Before step 1: DataError when the held-out documents cannot fill one eval batch (see OrderedData)."""
        from llmtrain.data.loader import require_eval_batches

        require_eval_batches(n)
        self.val_batches(n)  # reads and keeps the first data.stream_val_docs documents, as the first eval would

    def val_batches(self, n: int) -> list[dict[str, Any]]:
        if self._val is None:
            stream = PackedStream(self._docs(0, self.cfg.stream_val_docs), self.seq_len, 0, 0)
            windows = cast(
                "list[np.ndarray]",
                list(itertools.takewhile(lambda w: w is not None, (stream.take() for _ in range(10**9)))),
            )
            per_batch = self.B * self.dp_size
            if len(windows) < per_batch:
                raise DataError(
                    f"{self.cfg.stream}: its first data.stream_val_docs={self.cfg.stream_val_docs} "
                    f"documents give {len(windows)} validation sequences, fewer than one global "
                    f"micro-batch ({per_batch}); raise data.stream_val_docs"
                )
            lo = self.dp_rank * self.B
            self._val = [
                _to_batch(np.stack(windows[b * per_batch + lo : b * per_batch + lo + self.B]))
                for b in range(len(windows) // per_batch)
            ]
        return self._val[:n]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "kind": "stream",
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "tokenizer_hash": self.tokenizer.hash,
            "stream": self.cfg.stream,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if not d:
            return
        if d.get("kind") != "stream":
            raise DataError(
                "the checkpoint's data state is not a streaming one; resume with the checkpoint's data "
                "settings (data.stream) or start a new out_dir"
            )
        self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in d["positions"].items()}
        self._stream, self._next_step = None, -1


def _to_batch(x: np.ndarray) -> dict[str, Any]:
    import torch

    return {"input_ids": torch.from_numpy(x[:, :-1].copy()), "labels": torch.from_numpy(x[:, 1:].copy())}
