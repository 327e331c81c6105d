"""A labelled task from the bundled corpus, for fine-tuning classifiers: which source is a passage from?

Classes: 0 = King James Bible, Old Testament; 1 = New Testament; 2 = Shakespeare. Every document (a Bible
chapter without its "Book N" heading, or a whole play or poem) is cut into non-overlapping passages of
`seq_len - 2` tokens, each sample being `[CLS] passage [SEP] [PAD]...`. Every 10th document of each class
(by its position in the class) is held out, so validation passages come from chapters and works the
classifier never saw. Training samples are class-balanced: sample g has class g mod 3 and a passage drawn
with a generator seeded by (seed, g), so batches are a pure function of (seed, step) like every other
llmtrain data; validation takes the classes in turn, so chance accuracy is 1/3 in both.

The tokenized documents are built once per tokenizer into `<cache>/datasets/source-class-<tokenizer>/`: the
bundled one of `data.tokenizer`, or a model's own (`data.tokenizer_path`, e.g. an imported model's `tokenizer/`;
the directory is then named by the tokenizer's hash).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtrain.data.config import DataConfig
from llmtrain.errors import DataError

if TYPE_CHECKING:
    from llmtrain.data.tokenizer import Tokenizer

CLASSES = ("old_testament", "new_testament", "shakespeare")
_KJV_CHAPTERS, _OT_CHAPTERS = 1189, 929  # Genesis 1 .. Malachi 4 are the first 929 of the 1,189 chapters
_TOKENS = "tokens.npz"
_TRAIN = 0xC1A5


def class_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer of the passages: `data.tokenizer_path`, else the bundled WordPiece of `data.tokenizer`."""
    from llmtrain.data.bundled import bundled_tokenizer_dir
    from llmtrain.data.tokenizer import BERT_SPECIALS, load_tokenizer

    if not cfg.tokenizer_path:
        if cfg.tokenizer != "wordpiece":
            raise DataError(
                f"data.sample_kind=source_class needs data.tokenizer=wordpiece ([CLS]/[SEP]/[PAD]) or a "
                f"model's own WordPiece tokenizer in data.tokenizer_path; got data.tokenizer='{cfg.tokenizer}'"
            )
        return load_tokenizer(bundled_tokenizer_dir(cfg))
    tok = load_tokenizer(Path(cfg.tokenizer_path).expanduser())
    missing = [t for t in BERT_SPECIALS[:4] if t not in tok.specials]
    if missing:
        raise DataError(
            f"data.tokenizer_path={cfg.tokenizer_path}: source_class samples need the special tokens "
            f"{', '.join(missing)}; point it at a BERT (WordPiece) tokenizer"
        )
    return tok


def source_class_dir(cfg: DataConfig, tok: Tokenizer) -> Path:
    """The bundled documents tokenized with `tok`, with their class labels (built once per tokenizer)."""
    from llmtrain.data.bundled import _on_every_node_once, build_once, bundled_tokenizer_dir, cache_root

    name = f"tok{tok.hash}" if cfg.tokenizer_path else bundled_tokenizer_dir(cfg).name
    target = cache_root(cfg.cache_dir) / "datasets" / f"source-class-{name}"
    return _on_every_node_once(lambda: build_once(target, _TOKENS, lambda tmp: _build(cfg, tok, tmp)))


def _build(cfg: DataConfig, tok: Tokenizer, tmp: Path) -> None:
    from llmtrain.data.bundled import cache_root
    from llmtrain.data.corpus import bundled_documents

    texts, labels = [], []
    for i, (_name, text) in enumerate(bundled_documents(cache_root(cfg.cache_dir) / "downloads")):
        if i < _KJV_CHAPTERS:
            text = text.split("\n\n", 1)[1]  # the "Book N" heading would give the answer away
        texts.append(text)
        labels.append(0 if i < _OT_CHAPTERS else 1 if i < _KJV_CHAPTERS else 2)
    ids = tok.encode_batch(texts)
    np.savez(
        tmp / _TOKENS,
        tokens=np.concatenate([np.asarray(d, np.int32) for d in ids]),
        lengths=np.array([len(d) for d in ids], np.int64),
        labels=np.array(labels, np.int64),
    )


class SourceClassData:
    """What `build_data` returns for `data.sample_kind=source_class`; batches hold input_ids,
    token_type_ids, attention_mask and class_labels (B,)."""

    num_classes = len(CLASSES)

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seq_len: int,
        seed: int,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        if seq_len < 8:
            raise DataError(f"source_class samples need train.seq_len >= 8 (got {seq_len})")
        self.tokenizer = class_tokenizer(cfg)
        self.own_tokenizer = cfg.tokenizer_path  # a model's own: its vocabulary must match exactly
        self.vocab_size = self.tokenizer.vocab_size
        sp = self.tokenizer.specials
        self.cls, self.sep, self.pad = sp["[CLS]"], sp["[SEP]"], sp["[PAD]"]
        self.seq_len, self.seed, self.B, self.G = seq_len, seed, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        with np.load(source_class_dir(cfg, self.tokenizer) / _TOKENS) as z:
            self.tokens, lengths, labels = z["tokens"], z["lengths"], z["labels"]
        self.train, self.val = self._passages(lengths, labels, seq_len - 2)

    def _passages(self, lengths: np.ndarray, labels: np.ndarray, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per class, (start, length) rows of its train and val passages."""
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        train, val = [], []
        for c in range(self.num_classes):
            rows: tuple[list, list] = ([], [])
            for j, d in enumerate(np.flatnonzero(labels == c)):
                offsets = range(0, max(1, lengths[d] - n + 1), n)  # whole passages; a short document is one
                rows[j % 10 == 9].extend((starts[d] + o, min(n, lengths[d])) for o in offsets)
            train.append(np.array(rows[0], np.int64).reshape(-1, 2))
            val.append(np.array(rows[1], np.int64).reshape(-1, 2))
        return train, val

    def check_model_vocab(self, model_vocab_size: int) -> None:
        if self.own_tokenizer and self.vocab_size != model_vocab_size:
            raise DataError(
                f"data.tokenizer_path={self.own_tokenizer} has {self.vocab_size} tokens but "
                f"model.vocab_size={model_vocab_size}: a model reads only its own tokenizer; point "
                f"data.tokenizer_path at that model's tokenizer (an imported model's <dir>/tokenizer)"
            )
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"the tokenizer has {self.vocab_size} tokens but model.vocab_size={model_vocab_size}; "
                f"set model.vocab_size >= {self.vocab_size}"
            )

    def train_batches(self, step: int) -> list[dict[str, Any]]:
        global_batch = self.B * self.G * self.dp_size
        first = step * global_batch + self.dp_rank * self.B * self.G  # this rank's slice of the step
        rows = []
        for g in range(first, first + self.B * self.G):
            c = g % self.num_classes
            i = np.random.default_rng([self.seed, _TRAIN, g]).integers(len(self.train[c]))
            rows.append((self.train[c][i], c))
        return [self._collate(rows[m * self.B : (m + 1) * self.B]) for m in range(self.G)]

    def check_eval(self, n: int) -> None:
        """Before step 1: DataError when the held-out passages cannot fill one eval batch (see OrderedData)."""
        from llmtrain.data.loader import require_eval_batches

        require_eval_batches(n)
        per_batch = self.B * self.dp_size
        if min(len(v) for v in self.val) * self.num_classes < per_batch:
            raise DataError(
                f"the source-class validation split has {min(len(v) for v in self.val)} passages per "
                f"class, fewer than one eval batch (train.micro_batch_size={self.B} x {self.dp_size} "
                f"data-parallel ranks = {per_batch}); lower train.micro_batch_size or train.seq_len"
            )

    def val_batches(self, n: int) -> list[dict[str, Any]]:
        """Up to n micro-batches for this rank: the classes in turn, passages spread over each class."""
        per_class = min(len(v) for v in self.val)
        total = min(n * self.B * self.dp_size, per_class * self.num_classes)
        total -= total % (self.B * self.dp_size)
        k = total // self.num_classes + 1
        rows = [
            (self.val[i % self.num_classes][(i // self.num_classes) * per_class // k], i % self.num_classes)
            for i in range(total)
        ]
        mine = rows[self.dp_rank :: self.dp_size]
        return [self._collate(mine[m * self.B : (m + 1) * self.B]) for m in range(len(mine) // self.B)]

    def _collate(self, rows: list[tuple[np.ndarray, int]]) -> dict[str, Any]:
        import torch

        ids = np.full((len(rows), self.seq_len), self.pad, np.int64)
        mask = np.zeros((len(rows), self.seq_len), np.int64)
        for r, ((start, length), _) in enumerate(rows):
            ids[r, : length + 2] = np.concatenate([[self.cls], self.tokens[start : start + length], [self.sep]])
            mask[r, : length + 2] = 1
        return {
            "input_ids": torch.from_numpy(ids),
            "token_type_ids": torch.zeros_like(torch.from_numpy(ids)),
            "attention_mask": torch.from_numpy(mask),
            "class_labels": torch.tensor([c for _, c in rows], dtype=torch.long),
        }

    def state_dict(self) -> dict[str, Any]:
        return {}  # batches are a pure function of (seed, step): nothing to save

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass
