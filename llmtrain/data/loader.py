"""Packed next-token batches from prepared shards: world-size-independent order, O(1) exact resume.

A split's shards form one token stream; sample j of a source is the window tokens[j*T : j*T + T + 1]
(consecutive windows share one boundary token, so every token is a target exactly once per epoch).
Global sample g maps to (source, index) through the blend table, and index to a window through a
keyed permutation per (seed, source, epoch). A step's global batch is samples
[start, start + B*G*dp); rank r takes the contiguous slice [r*B*G, (r+1)*B*G) and cuts it into G
micro-batches of B. So 1 rank x G=2 sees exactly what 2 ranks x G=1 see, and a run resumed on another
number of ranks continues with exactly the next samples.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.data.format import REPREPARE, Shard, read_manifest
from llmtrain.data.order import blend_table, derive_key, permute
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer
from llmtrain.data.verify import check_dataset
from llmtrain.errors import DataError
from llmtrain.utils import print0

# Sources with at most this many windows keep their epoch's permutation as a table (8 MB at most).
PERM_CACHE_MAX = 1 << 20


class TokenStream:
    """The shards of one split of a prepared dataset, read as a single memory-mapped token stream."""

    def __init__(
        self, dataset_dir: Path, shard_names: list[str], vocab_size: int | None = None, mask: bool = False
    ) -> None:
        shards = [Shard.open(dataset_dir / name, mask) for name in shard_names]
        self.has_mask = mask
        self.dataset_dir = dataset_dir
        self.shards = [s for s in shards if len(s.tokens)]
        sizes = [len(s.tokens) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # token offset of each shard
        docs = [len(s.ends) for s in self.shards]
        self.doc_starts = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)  # doc offset of each shard
        self.n_tokens = int(self.starts[-1])
        # Ids of every window read are checked against this (None: the dtype cannot hold a larger id).
        dtype_max = max((np.iinfo(s.tokens.dtype).max for s in self.shards), default=0)
        self.vocab_size = vocab_size if vocab_size is not None and vocab_size <= dtype_max else None

    def _checked(self, tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """`tokens` (windows read at `starts`), or a DataError naming the shard when an id is outside the
        vocabulary: a corrupt shard must not reach the model as an out-of-range embedding index."""
        if self.vocab_size is None or not tokens.size or int(tokens.max()) < self.vocab_size:
            return tokens
        rows = tokens.reshape(len(starts), -1)
        row, col = (int(x) for x in np.argwhere(rows >= self.vocab_size)[0])
        pos = int(starts[row]) + col
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        raise DataError(
            f"{self.shards[k].path.with_suffix('.bin')}: token id {int(rows[row, col])} "
            f"at token {pos - int(self.starts[k])} is outside the tokenizer's {self.vocab_size}-token "
            f"vocabulary: the shard is corrupt or was made with another tokenizer; check it with "
            f"`llmtrain verify {self.dataset_dir}`, then {REPREPARE}"
        )

    def window(self, start: int, length: int, channel: str = "tokens") -> np.ndarray:
        """Tokens [start, start+length) as int64, crossing shard boundaries when needed (`channel="mask"`:
        the loss mask of those tokens instead)."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        off = start - int(self.starts[k])
        piece = getattr(self.shards[k], channel)[off : off + length]
        parts, need = [piece], length - len(piece)
        while need > 0:  # rare: a window that straddles shards
            k += 1
            parts.append(getattr(self.shards[k], channel)[:need])
            need -= len(parts[-1])
        out = (piece if len(parts) == 1 else np.concatenate(parts)).astype(np.int64)
        return self._checked(out, np.array([start])) if channel == "tokens" else out

    def windows(self, starts: np.ndarray, length: int, channel: str = "tokens") -> np.ndarray:
        """Tokens [s, s+length) for each start, as an int64 (len(starts), length) array, one gather per shard
        (`channel="mask"`: their loss mask, 0/1)."""
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        ks = np.searchsorted(self.starts, starts, side="right") - 1
        inside = starts + length <= self.starts[ks + 1]
        ar = np.arange(length, dtype=np.int64)
        check = self._checked if channel == "tokens" else (lambda x, _: x)
        if len(self.shards) == 1 and inside.all():  # one shard: a single gather, no per-shard bookkeeping
            return check(getattr(self.shards[0], channel)[starts[:, None] + ar].astype(np.int64), starts)
        for k in np.unique(ks[inside]):
            sel = np.flatnonzero(inside & (ks == k))
            out[sel] = getattr(self.shards[k], channel)[(starts[sel] - self.starts[k])[:, None] + ar]
        for i in np.flatnonzero(~inside):  # rare: windows that straddle two shards
            out[i] = self.window(int(starts[i]), length, channel)
        return check(out, starts)

    def doc_index(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(global document id, offset within its document) of each token position in the window."""
        pos = np.arange(start, start + length, dtype=np.int64)
        ks = np.searchsorted(self.starts, pos, side="right") - 1
        doc, doc_start = np.empty(length, np.int64), np.empty(length, np.int64)
        for k in np.unique(ks):
            sel = ks == k
            local = pos[sel] - self.starts[k]
            ends = self.shards[k].ends
            d = np.searchsorted(ends, local.astype(np.uint64), side="right").astype(np.int64)
            first = np.where(d > 0, ends[np.maximum(d - 1, 0)].astype(np.int64), 0)
            doc[sel] = d + self.doc_starts[k]
            doc_start[sel] = first
        return doc, pos - self.starts[ks] - doc_start

    def doc_bounds(self, pos: int) -> tuple[int, int]:
        """[start, end) token offsets of the document holding token `pos` (its EOS is the last token)."""
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        ends = self.shards[k].ends
        d = int(np.searchsorted(ends, np.uint64(pos - self.starts[k]), side="right"))
        lo = int(ends[d - 1]) if d > 0 else 0
        return int(self.starts[k]) + lo, int(self.starts[k]) + int(ends[d])


class PreparedSource:
    """One prepared dataset directory: manifest, tokenizer and the train/val token streams."""

    def __init__(self, path: str | Path, verify: str = "auto") -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.tokenizer = load_tokenizer(self.path)
        want = self.manifest["tokenizer"]["hash"]
        if self.tokenizer.hash != want:
            raise DataError(
                f"{self.path / 'tokenizer.json'}: tokenizer hash {self.tokenizer.hash} differs from the "
                f"{want} recorded in {self.path / 'manifest.json'}: the tokens were made with another "
                f"tokenizer; {REPREPARE}"
            )
        self.integrity = check_dataset(self.path, self.manifest, mode=verify)  # before any token is read
        if not self.integrity.has_checksums:
            print0(
                f"notice: {self.path / 'manifest.json'} records no shard checksums (prepared by an older llmtrain): "
                f"only shard headers, sizes and token ids are checked; `llmtrain verify --add-checksums "
                f"{self.path}` records them",
                file=sys.stderr,
            )
        splits, vocab = self.manifest["splits"], int(self.manifest["tokenizer"]["vocab_size"])
        # Chat and preference data (llmtrain/data/chat.py) carry a loss mask and were cut for one seq_len.
        self.kind: str = self.manifest.get("kind", "text")
        self.has_mask = bool(self.manifest.get("loss_mask"))
        self.train = TokenStream(self.path, splits["train"]["shards"], vocab, self.has_mask)
        self.val = TokenStream(self.path, splits["val"]["shards"], vocab, self.has_mask)

    def check_seq_len(self, seq_len: int) -> None:
        """Chat/preference data packs whole conversations into windows of the seq_len it was prepared for:
        another train.seq_len would cut them apart (or pad them wrongly), so it is refused."""
        want = self.manifest.get("seq_len")
        if want is not None and int(want) != seq_len:
            raise DataError(
                f"{self.path}: prepared ({self.kind} data) for train.seq_len={want} (conversations are packed "
                f"whole into windows of that length) but this run has train.seq_len={seq_len}; set "
                f"train.seq_len={want} (llmtrain eval: --seq-len {want}), or prepare the data again with "
                f"--seq-len {seq_len}"
            )


def require_eval_batches(n: int) -> None:
    """Every run evaluates at its end, so train.eval_batches must ask for at least one batch."""
    if n < 1:
        raise DataError(
            f"train.eval_batches={n}: every run evaluates on held-out data at its end (and every "
            "train.eval_interval steps); set train.eval_batches >= 1"
        )


def _windows(stream: TokenStream, seq_len: int) -> int:
    return max(0, (stream.n_tokens - 1) // seq_len)


class OrderedData:
    """The sample order, batch slicing, val selection and resume state shared by every sample kind.

    Subclasses say how one sample is made from a window start (`unit` tokens apart) via
    `_micro_batches(global indices)` and `_val_batch(rows, first val index)`.
    """

    def __init__(
        self,
        sources: list[PreparedSource],
        weights: list[float],
        *,
        seq_len: int,
        seed: int,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
        unit: int,
        blend_block: int = 1000,
    ) -> None:
        _check_same_tokenizer(sources)
        self.sources, self.seq_len, self.seed, self.unit = sources, seq_len, seed, unit
        self.B, self.G, self.dp_rank, self.dp_size = micro_batch_size, grad_accum, dp_rank, dp_size
        self.tokenizer: Tokenizer = sources[0].tokenizer
        self.vocab_size: int = self.tokenizer.vocab_size
        self.global_batch = micro_batch_size * grad_accum * dp_size
        self.n_train = [_windows(s.train, unit) for s in sources]
        for s, n in zip(sources, self.n_train):
            if n == 0:
                raise DataError(
                    f"{s.path}: its train split has {s.train.n_tokens} tokens, fewer than one sequence of "
                    f"train.seq_len={seq_len}; lower train.seq_len or prepare more text"
                )
        self.weights = [float(w) for w in weights]
        self._table = blend_table(self.weights, blend_block if len(sources) > 1 else 1)
        # Step -> first sample is base_samples + (step - base_step) * global_batch; a resume whose global
        # batch differs re-bases at the first step it asks for (the trainer asks for its resume step first).
        self._base_step, self._base_samples = 0, 0
        self._rebase: dict[str, int] | None = None
        self._lock = threading.Lock()  # the trainer may build step+1 on a background thread
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Refuse a model whose embedding has fewer rows than the tokenizer the data was made with."""
        for s in self.sources:
            v = s.manifest["tokenizer"]["vocab_size"]
            if v > model_vocab_size:
                raise DataError(
                    f"{s.path / 'manifest.json'}: the data was tokenized with a {v} tokens vocabulary but "
                    f"model.vocab_size={model_vocab_size}; set model.vocab_size >= {v} or prepare the data "
                    "with the model's tokenizer"
                )

    # -- the global sample order -------------------------------------------------------------------

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source id, sample index within that source), exact blend proportions."""
        src, ordinal, counts = self._table
        block = len(src)
        pos = g % block
        k = src[pos]
        return k, (g // block) * counts[k] + ordinal[pos]

    def window_starts(self, k: int, n: np.ndarray) -> np.ndarray:
        """Token offset of sample index n (an array) of source k: a fresh permutation every epoch."""
        size = self.n_train[k]
        epoch, j = n // size, n % size
        if epoch[0] == epoch[-1]:  # n is increasing: the usual case is a batch inside one epoch
            return self._permuted(k, int(epoch[0]), j) * self.unit
        out = np.empty(len(n), dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self._permuted(k, int(e), j[sel]) * self.unit
        return out

    def _permuted(self, k: int, epoch: int, j: np.ndarray) -> np.ndarray:
        """permute(j) for (source, epoch); a small source's whole epoch permutation is computed once."""
        size, key = self.n_train[k], derive_key(self.seed, k, epoch)
        if size > PERM_CACHE_MAX:  # O(1) per sample, no O(size) table: resume stays instant on any size
            return permute(j, size, key).astype(np.int64)
        table = self._perm_cache.get((k, epoch))
        if table is None:
            table = permute(np.arange(size), size, key).astype(np.int64)
            # Keep this epoch and the one before (a batch may straddle them); replaced whole: thread-safe reads.
            kept = {key_: t for key_, t in self._perm_cache.items() if key_[1] >= epoch - 1}
            self._perm_cache = {**kept, (k, epoch): table}
        return table[j]

    def starts(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source id, window start token) of each global sample index."""
        g = np.asarray(g, dtype=np.int64)
        ks, ns = self.locate(g)
        if len(self.sources) == 1:
            return ks, self.window_starts(0, ns)
        starts = np.empty(len(g), dtype=np.int64)
        for k in np.unique(ks):
            sel = ks == k
            starts[sel] = self.window_starts(int(k), ns[sel])
        return ks, starts

    # -- the contract ------------------------------------------------------------------------------

    def step_start(self, step: int) -> int:
        """Global index of the first sample of optimizer step `step`."""
        with self._lock:
            if self._rebase is not None:
                old = self._rebase
                self._base_samples = old["base_samples"] + (step - old["base_step"]) * old["global_batch"]
                self._base_step, self._rebase = step, None
            return self._base_samples + (step - self._base_step) * self.global_batch

    def train_batches(self, step: int) -> list[dict[str, Any]]:
        """G micro-batches of this rank for optimizer step `step` (0-based)."""
        per_rank = self.B * self.G
        first = self.step_start(step) + self.dp_rank * per_rank
        return self._micro_batches(np.arange(first, first + per_rank))

    def check_eval(self, n: int) -> None:
        """Before step 1 (the trainer calls it with train.eval_batches): DataError naming the dataset and the
        fix when `val_batches(n)` could not give one batch: no validation split, or fewer validation windows
        than one global micro-batch (or n < 1). Then the final eval, after every training step, cannot fail on data."""
        require_eval_batches(n)
        self._eval_batches(n)

    def _eval_batches(self, n: int) -> tuple[list[int], int]:
        """(validation windows per source, how many of the n requested micro-batches they fill)."""
        counts = [_windows(s.val, self.unit) for s in self.sources]
        names = ", ".join(str(s.path) for s in self.sources)
        if sum(counts) == 0:
            tokens = sum(s.val.n_tokens for s in self.sources)
            raise DataError(
                f"{names}: no validation split ({tokens} validation tokens, fewer than one sequence of "
                f"train.seq_len={self.seq_len} + 1): prepare the dataset with a larger --val-fraction "
                "(data.val_fraction for the bundled corpus), or lower train.seq_len"
            )
        per_batch = self.B * self.dp_size
        if sum(counts) < per_batch:
            raise DataError(
                f"{names}: the validation split has {sum(counts)} sequences of train.seq_len="
                f"{self.seq_len}, fewer than one eval batch (train.micro_batch_size={self.B} x "
                f"{self.dp_size} data-parallel ranks = {per_batch}); prepare the dataset with a larger "
                "--val-fraction, or lower train.micro_batch_size or train.seq_len"
            )
        return counts, min(n, sum(counts) // per_batch)

    def val_batches(self, n: int) -> list[dict[str, Any]]:
        """The first n micro-batches of this rank over the validation windows, in order (no shuffle)."""
        counts, n = self._eval_batches(n)
        per_batch = self.B * self.dp_size
        # Take from each source in proportion to its weight, up to what it has: deterministic, no wrap.
        order = _val_order(counts, self.weights, n * per_batch)
        lo = self.dp_rank * self.B
        return [
            self._val_batch(order[b * per_batch + lo : b * per_batch + lo + self.B], b * per_batch + lo)
            for b in range(n)
        ]

    def _micro_batches(self, g: np.ndarray) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _val_batch(self, rows: list[tuple[int, int]], first: int) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The step -> sample mapping (not a position: the trainer's step says where it is)."""
        with self._lock:
            mapping = self._rebase or {
                "base_step": self._base_step,
                "base_samples": self._base_samples,
                "global_batch": self.global_batch,
            }
        return {
            "version": 1,
            **mapping,
            "seed": self.seed,
            "tokenizer_hash": self.tokenizer.hash,
            "sources": [str(s.path) for s in self.sources],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue the saved run's sample sequence; its global batch size may differ from this run's."""
        if not d:
            return
        if d.get("tokenizer_hash", self.tokenizer.hash) != self.tokenizer.hash:
            raise DataError(
                f"the checkpoint's data was tokenized with tokenizer {d['tokenizer_hash']}, this run's "
                f"data with {self.tokenizer.hash}; resume with the same data (or start a new out_dir)"
            )
        mapping = {k: int(d[k]) for k in ("base_step", "base_samples", "global_batch")}
        with self._lock:
            if mapping["global_batch"] == self.global_batch:
                self._base_step, self._base_samples, self._rebase = mapping["base_step"], mapping["base_samples"], None
            else:
                self._rebase = mapping


class CausalData(OrderedData):
    """What `build_data` returns for causal LM training (see DEVELOPERS.md, "Data contract")."""

    def __init__(
        self, sources: list[PreparedSource], weights: list[float], *, doc_mask: bool = False, **kw: Any
    ) -> None:
        super().__init__(sources, weights, unit=kw["seq_len"], **kw)
        self.doc_mask = doc_mask
        self.loss_mask = any(s.has_mask for s in sources)
        for s in sources:
            s.check_seq_len(self.seq_len)
        if self.loss_mask and not doc_mask:
            print0(
                "notice: chat data without data.doc_mask=true: conversations packed into one window attend to "
                "each other (their losses stay separate); set data.doc_mask=true to keep them apart",
                file=sys.stderr,
            )

    def samples(self, g: np.ndarray) -> dict[str, np.ndarray]:
        """Token windows (len(g), T+1) for global sample indices `g`, plus document info if doc_mask."""
        ks, starts = self.starts(g)
        return self._windows_of(ks, starts, "train")

    def _windows_of(self, ks: np.ndarray, sts: np.ndarray, split: str) -> dict[str, np.ndarray]:
        if len(self.sources) == 1:
            tokens = getattr(self.sources[0], split).windows(sts, self.seq_len + 1)
        else:
            tokens = np.empty((len(ks), self.seq_len + 1), dtype=np.int64)
            for k in np.unique(ks):
                sel = np.flatnonzero(ks == k)
                tokens[sel] = getattr(self.sources[k], split).windows(sts[sel], self.seq_len + 1)
        out = {"tokens": tokens}
        if self.loss_mask:
            out["mask"] = _mask_windows([getattr(self.sources[k], split) for k in ks], ks, sts, self.seq_len + 1)
        if self.doc_mask:
            out.update(_doc_info([getattr(self.sources[k], split) for k in ks], sts, self.seq_len))
        return out

    def _micro_batches(self, g: np.ndarray) -> list[dict[str, Any]]:
        s = self.samples(g)
        return [self._to_batch(s, m * self.B, (m + 1) * self.B) for m in range(len(g) // self.B)]

    def _val_batch(self, rows: list[tuple[int, int]], first: int) -> dict[str, Any]:
        ks = np.array([k for k, _ in rows], dtype=np.int64)
        return self._to_batch(
            self._windows_of(ks, np.array([j * self.unit for _, j in rows], dtype=np.int64), "val"), 0, self.B
        )

    def _to_batch(self, s: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, Any]:
        import torch

        x = s["tokens"][lo:hi]
        batch = {"input_ids": torch.from_numpy(x[:, :-1].copy()), "labels": torch.from_numpy(x[:, 1:].copy())}
        if self.doc_mask:
            batch["position_ids"] = torch.from_numpy(s["position_ids"][lo:hi].copy())
            batch["doc_ids"] = torch.from_numpy(s["doc_ids"][lo:hi].copy())
            # The token after an EOS starts another document: nothing in this one predicts it.
            batch["labels"][batch["input_ids"] == self.tokenizer.eos_id] = -100
        if self.loss_mask:  # chat data: only the tokens its mask marks (assistant replies) are targets
            batch["labels"][torch.from_numpy(s["mask"][lo:hi, 1:] == 0)] = -100
        return batch


class PreferenceData(OrderedData):
    """Chosen/rejected pairs of a `--format preference` dataset (llmtrain/data/chat.py): each sequence sits in a
    slot of exactly seq_len tokens, the chosen one then the rejected one, so sample j is the 2*seq_len + 1
    tokens at j * 2 * seq_len. Batches hold `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`,
    `rejected_labels` (B, T each; labels -100 on the prompt and the padding), what the DPO objective reads."""

    def __init__(self, sources: list[PreparedSource], weights: list[float], **kw: Any) -> None:
        super().__init__(sources, weights, unit=2 * kw["seq_len"], **kw)
        for s in sources:
            if s.kind != "preference":
                raise DataError(
                    f"{s.path}: {s.kind} data blended with preference data; a run trains on one kind: list only "
                    "datasets prepared with --format preference in data.sources"
                )
            s.check_seq_len(self.seq_len)

    def _pairs(self, ks: np.ndarray, starts: np.ndarray, split: str) -> dict[str, np.ndarray]:
        n = 2 * self.seq_len + 1
        tokens, mask = np.empty((len(ks), n), np.int64), np.empty((len(ks), n), np.int64)
        for k in np.unique(ks):
            sel = np.flatnonzero(ks == k)
            stream = getattr(self.sources[k], split)
            tokens[sel], mask[sel] = stream.windows(starts[sel], n), stream.windows(starts[sel], n, "mask")
        return {"tokens": tokens, "mask": mask}

    def _micro_batches(self, g: np.ndarray) -> list[dict[str, Any]]:
        s = self._pairs(*self.starts(g), "train")
        return [self._to_batch(s, m * self.B, (m + 1) * self.B) for m in range(len(g) // self.B)]

    def _val_batch(self, rows: list[tuple[int, int]], first: int) -> dict[str, Any]:
        ks = np.array([k for k, _ in rows], dtype=np.int64)
        starts = np.array([j * self.unit for _, j in rows], dtype=np.int64)
        return self._to_batch(self._pairs(ks, starts, "val"), 0, self.B)

    def _to_batch(self, s: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, Any]:
        import torch

        T, batch = self.seq_len, {}
        for name, a in (("chosen", 0), ("rejected", T)):
            x, m = s["tokens"][lo:hi, a : a + T + 1], s["mask"][lo:hi, a : a + T + 1]
            labels = np.where(m[:, 1:] == 1, x[:, 1:], -100)
            batch[f"{name}_input_ids"] = torch.from_numpy(x[:, :-1].copy())
            batch[f"{name}_labels"] = torch.from_numpy(labels)
        return batch


def _mask_windows(streams: list[TokenStream], ks: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """The loss mask (len(starts), length) of each window; all ones for a source without one (plain text)."""
    out = np.ones((len(starts), length), np.int64)
    for k in np.unique(ks):
        sel = np.flatnonzero(ks == k)
        if streams[sel[0]].has_mask:
            out[sel] = streams[sel[0]].windows(starts[sel], length, "mask")
    return out


def _doc_info(streams: list[TokenStream], starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """doc_ids (0 = the window's first document) and position_ids (0 at the window start and after each EOS,
    as Megatron's reset_position_ids: positions stay below seq_len, within the model's block_size)."""
    doc_ids = np.empty((len(starts), seq_len), np.int64)
    pos_ids = np.empty((len(starts), seq_len), np.int64)
    t = np.arange(seq_len, dtype=np.int64)
    for i, (stream, st) in enumerate(zip(streams, starts)):
        d, p = stream.doc_index(int(st), seq_len)
        doc_ids[i], pos_ids[i] = d - d[0], np.minimum(p, t)
    return {"doc_ids": doc_ids, "position_ids": pos_ids}


def _val_order(counts: list[int], weights: list[float], total: int) -> list[tuple[int, int]]:
    """(source, window) pairs: sources interleaved by weight, each read in order, exhausted ones dropped."""
    w = np.array([wt if c else 0.0 for wt, c in zip(weights, counts)], dtype=np.float64)
    taken = np.zeros(len(counts), dtype=np.int64)
    order = []
    for p in range(total):
        live = taken < np.array(counts)
        score = (
            np.where(live, w / w[live].sum() * (p + 1) - taken, -np.inf)
            if w[live].sum() > 0
            else np.where(live, 0.0, -np.inf)
        )
        k = int(np.argmax(score))
        order.append((k, int(taken[k])))
        taken[k] += 1
    return order


def _check_same_tokenizer(sources: list[PreparedSource]) -> None:
    first = sources[0]
    for s in sources[1:]:
        if s.tokenizer.hash != first.tokenizer.hash:
            raise DataError(
                f"{s.path / 'manifest.json'}: tokenized with tokenizer {s.tokenizer.hash}, but "
                f"{first.path} with {first.tokenizer.hash}; blend only datasets prepared with the same "
                "tokenizer (re-run `llmtrain prepare-data --tokenizer` on one of them)"
            )
