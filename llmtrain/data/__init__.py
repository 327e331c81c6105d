"""Data: the bundled corpus, tokenizers, prepared token shards and the loaders the trainer calls.

`import llmtrain.data` is light (no torch, numpy or datasets): the heavy parts load on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmtrain.data.config import DataConfig, SourceConfig

if TYPE_CHECKING:
    from llmtrain.data.contract import RunData
    from llmtrain.data.tokenizer import Tokenizer

__all__ = ["DataConfig", "SourceConfig", "build_data", "check_same_tokenizer", "load_tokenizer", "resolve_sources"]


def build_data(
    cfg: DataConfig, *, seq_len: int, seed: int, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int
) -> RunData:
    """The data of a run (DEVELOPERS.md, "Data contract"); prepares the bundled corpus on first use."""
    from llmtrain.data.build import build_data as _build

    return _build(
        cfg,
        seq_len=seq_len,
        seed=seed,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer directory, HF tokenizer.json, or GPT-2 encoder.json + vocab.bpe directory."""
    from llmtrain.data.tokenizer import load_tokenizer as _load

    return _load(path)


def check_same_tokenizer(data_tok: Tokenizer, other: Tokenizer, where: str) -> None:
    """DataError unless `other` (a checkpoint's tokenizer) is the data's; see llmtrain.data.tokenizer."""
    from llmtrain.data.tokenizer import check_same_tokenizer as _check

    _check(data_tok, other, where)


def resolve_sources(cfg: DataConfig) -> list[tuple[str, float]]:
    """(dataset directory, weight) pairs the config names; 'bundled' is prepared on first use."""
    from llmtrain.data.build import resolve_sources as _resolve

    return [(str(p), w) for p, w in _resolve(cfg)]
