"""BERT pre-training samples: sentence pairs for next-sentence prediction plus masked-LM targets.

Sample g is a pure function of (seed, g), like causal samples: its window start comes from the same
world-size-independent order, and its random choices from a generator seeded with (seed, g).
Each sample is `[CLS] A [SEP] B [SEP] [PAD]...` where A starts at the window start inside one document
and B is, with probability 1/2, the text that follows A in that document (nsp_labels 0) or else a span
of another document (nsp_labels 1). Of the non-special tokens, `mlm_prob` are chosen (whole words with
`whole_word_mask`); a chosen token becomes [MASK] 80%, a random token 10%, itself 10% of the time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmtrain.data.config import DataConfig
from llmtrain.data.loader import OrderedData, PreparedSource, TokenStream
from llmtrain.errors import DataError

_TRAIN, _VAL = 0xB7, 0x7A1


class BertData(OrderedData):
    """What `build_data` returns when `data.sample_kind=bert`; batches hold input_ids, token_type_ids,
    attention_mask, mlm_labels (-100 = not predicted) and nsp_labels (0 = B follows A, 1 = random B)."""

    def __init__(self, sources: list[PreparedSource], weights: list[float], *, cfg: DataConfig, **kw: Any) -> None:
        if kw["seq_len"] < 8:
            raise DataError(f"BERT samples need train.seq_len >= 8 (got {kw['seq_len']})")
        super().__init__(sources, weights, unit=kw["seq_len"] - 3, blend_block=cfg.blend_block, **kw)
        sp = self.tokenizer.specials
        missing = [t for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]") if t not in sp]
        if missing:
            raise DataError(
                f"{sources[0].path / 'tokenizer.json'}: BERT samples need the special tokens {missing}; "
                "prepare the data with a WordPiece tokenizer (`llmtrain train-tokenizer --kind wordpiece`)"
            )
        self.cls, self.sep, self.mask, self.pad = sp["[CLS]"], sp["[SEP]"], sp["[MASK]"], sp["[PAD]"]
        self.mlm_prob, self.whole_word = cfg.mlm_prob, cfg.whole_word_mask
        self.special_ids = np.array(sorted(sp.values()), dtype=np.int64)
        self.normal_ids = np.setdiff1d(np.arange(self.vocab_size), self.special_ids)
        self.continues_word = self._continuation_table()

    def _continuation_table(self) -> np.ndarray:
        """True for ids that continue the previous word (WordPiece '##x'; byte-level BPE pieces without 'Ġ')."""
        hf = self.tokenizer.hf
        cont = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            t = hf.id_to_token(i) or ""
            cont[i] = t.startswith("##") if self.tokenizer.kind == "wordpiece" else not t.startswith("Ġ")
        cont[self.special_ids] = False
        return cont

    # -- samples -----------------------------------------------------------------------------------

    def _micro_batches(self, g: np.ndarray) -> list[dict[str, Any]]:
        ks, starts = self.starts(g)
        rows = [
            self._sample(self.sources[k].train, int(st), np.random.default_rng([self.seed, _TRAIN, int(i)]))
            for k, st, i in zip(ks, starts, g)
        ]
        return [self._collate(rows[m * self.B : (m + 1) * self.B]) for m in range(len(g) // self.B)]

    def _val_batch(self, rows: list[tuple[int, int]], first: int) -> dict[str, Any]:
        return self._collate(
            [
                self._sample(self.sources[k].val, j * self.unit, np.random.default_rng([self.seed, _VAL, first + i]))
                for i, (k, j) in enumerate(rows)
            ]
        )

    def _sample(self, stream: TokenStream, start: int, rng: np.random.Generator) -> dict[str, Any]:
        budget = self.seq_len - 3
        lo, hi = stream.doc_bounds(start)
        content_end = hi - 1  # drop the document's [SEP]/EOS
        if content_end - start < 2:  # the window starts at a document's end: use that document from its start
            start = lo
        avail = min(content_end - start, budget)
        is_next = avail >= 2 and rng.random() < 0.5
        if is_next:
            a_len = int(rng.integers(1, avail))
            a = stream.window(start, a_len)
            b = stream.window(start + a_len, avail - a_len)
        else:
            a_len = int(rng.integers(1, max(2, avail)))  # leave room for B
            a = stream.window(start, max(1, min(a_len, content_end - start)))
            b = self._random_span(stream, lo, rng, budget - len(a))
        return self._mask(a, b, rng, label=0 if is_next else 1)

    def _random_span(self, stream: TokenStream, own_lo: int, rng: np.random.Generator, length: int) -> np.ndarray:
        """Up to `length` tokens from a random place in a document other than the one starting at `own_lo`."""
        for _ in range(8):  # a few tries; tiny corpora may have one document
            pos = int(rng.integers(0, stream.n_tokens))
            lo, hi = stream.doc_bounds(pos)
            if lo != own_lo and hi - 1 > lo:
                pos = min(pos, hi - 2)
                return stream.window(pos, max(1, min(length, hi - 1 - pos)))
        raise DataError(
            "BERT next-sentence pairs need at least two non-empty documents in every split; "
            "prepare more documents (or a larger --val-fraction)"
        )

    def _mask(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator, label: int) -> dict[str, Any]:
        ids = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]]).astype(np.int64)
        types = np.concatenate([np.zeros(len(a) + 2, np.int64), np.ones(len(b) + 1, np.int64)])
        labels = np.full(len(ids), -100, dtype=np.int64)
        chosen = self._choose(ids, rng)
        labels[chosen] = ids[chosen]
        r = rng.random(len(chosen))
        ids[chosen[r < 0.8]] = self.mask
        rand = chosen[(r >= 0.8) & (r < 0.9)]
        ids[rand] = rng.choice(self.normal_ids, size=len(rand))
        return {"ids": ids, "types": types, "labels": labels, "nsp": label}

    def _choose(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cand = np.flatnonzero(~np.isin(ids, self.special_ids))
        if len(cand) == 0:
            return cand
        n = max(1, int(round(len(cand) * self.mlm_prob)))
        if not self.whole_word:
            return np.sort(rng.choice(cand, size=n, replace=False))
        # Words: a candidate starts a new word unless its token continues the previous candidate's word.
        starts = ~self.continues_word[ids[cand]] | np.concatenate([[True], np.diff(cand) != 1])
        words = np.split(cand, np.flatnonzero(starts)[1:])
        picked: list[int] = []
        for w in rng.permutation(len(words)):
            if len(picked) >= n:
                break
            picked.extend(words[w].tolist())
        return np.sort(np.array(picked, dtype=np.int64))

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        T = self.seq_len
        out = {
            "input_ids": np.full((len(rows), T), self.pad, np.int64),
            "token_type_ids": np.zeros((len(rows), T), np.int64),
            "attention_mask": np.zeros((len(rows), T), np.int64),
            "mlm_labels": np.full((len(rows), T), -100, np.int64),
        }
        for i, r in enumerate(rows):
            n = len(r["ids"])
            out["input_ids"][i, :n], out["token_type_ids"][i, :n] = r["ids"], r["types"]
            out["attention_mask"][i, :n], out["mlm_labels"][i, :n] = 1, r["labels"]
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        batch["nsp_labels"] = torch.tensor([r["nsp"] for r in rows], dtype=torch.long)
        return batch
