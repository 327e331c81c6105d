"""Tokenizers: train byte-level BPE (GPT) or WordPiece (BERT) with HF `tokenizers`, load pretrained files.

A tokenizer on disk is a directory holding one HF `tokenizer.json` (a bare `tokenizer.json` path works
too). Its hash (sha256 of that file's canonical JSON) is written into every prepared dataset's manifest,
so a dataset is never silently read with a different vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from llmtrain.data.tokenize_worker import encoder
from llmtrain.errors import DataError

EOS_GPT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A thin wrapper over an HF `tokenizers.Tokenizer`: encode/decode, EOS id, vocab size and hash."""

    def __init__(self, hf: Any, source: str = "<memory>") -> None:
        self.hf = hf
        self.source = source
        vocab = hf.get_vocab(with_added_tokens=True)
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        # GPT tokenizers separate documents with <|endoftext|>; BERT ones with [SEP].
        eos = EOS_GPT if EOS_GPT in vocab else ("[SEP]" if "[SEP]" in vocab else None)
        if eos is None:
            raise DataError(
                f"{source}: the tokenizer has neither '{EOS_GPT}' nor '[SEP]'; add one of them as "
                "a special token (llmtrain train-tokenizer does) so documents can be separated"
            )
        self.eos_token = eos
        self.eos_id: int = vocab[eos]
        self.kind: str = "wordpiece" if eos == "[SEP]" else "bpe"
        self.specials: dict[str, int] = {t: vocab[t] for t in [EOS_GPT, *BERT_SPECIALS] if t in vocab}
        self.hash: str = hashlib.sha256(hf.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encoder(self.hf)(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(out / TOKENIZER_FILE))
        return out


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer directory, an HF `tokenizer.json`, or GPT-2 `encoder.json` + `vocab.bpe` files."""
    from tokenizers import Tokenizer as HFTokenizer

    p = Path(path)
    if (
        p.is_dir()
        and (p / "encoder.json").exists()
        and (p / "vocab.bpe").exists()
        and not (p / TOKENIZER_FILE).exists()
    ):
        return gpt2_from_files(p / "encoder.json", p / "vocab.bpe")
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not f.exists():
        raise DataError(
            f"{p}: no tokenizer here; expected a directory with {TOKENIZER_FILE} (or encoder.json + "
            f"vocab.bpe), or a {TOKENIZER_FILE} file; create one with `llmtrain train-tokenizer`"
        )
    try:
        hf = HFTokenizer.from_file(str(f))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(
            f"{f}: not a valid HF tokenizer.json ({exc}); re-create it with `llmtrain train-tokenizer`"
        ) from None
    # A model's shipped tokenizer.json may fix a truncation length and padding (all-MiniLM-L6-v2's: 128);
    # documents are encoded whole and cut into samples here, so both go (a no-op, hash unchanged, otherwise).
    hf.no_truncation()
    hf.no_padding()
    return Tokenizer(hf, str(f))


def gpt2_from_files(encoder_json: str | Path, vocab_bpe: str | Path) -> Tokenizer:
    """The original GPT-2 byte-level BPE (50257 tokens) from OpenAI's `encoder.json` and `vocab.bpe`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOS_GPT])  # already id 50256 in encoder.json; this marks it special
    return Tokenizer(hf, str(encoder_json))


def train_tokenizer(
    texts: Iterable[str], kind: Literal["bpe", "wordpiece"], vocab_size: int, special_tokens: list[str] | None = None
) -> Tokenizer:
    """Train byte-level BPE (EOS `<|endoftext|>`) or lower-cased WordPiece ([PAD] [UNK] [CLS] [SEP] [MASK])."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bpe":
        specials = special_tokens or [EOS_GPT]
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        # The full byte alphabet up front: any input text stays encodable, never an unknown token.
        trainer: trainers.Trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    elif kind == "wordpiece":
        specials = special_tokens or BERT_SPECIALS
        hf = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        hf.normalizer = normalizers.BertNormalizer(lowercase=True)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise DataError(f"unknown tokenizer kind '{kind}'; use 'bpe' (GPT) or 'wordpiece' (BERT)")
    hf.train_from_iterator(_nonempty(texts), trainer)
    return Tokenizer(hf, f"<trained {kind}>")


def with_bert_template(hf: Any) -> Any:
    """`hf` (a WordPiece tokenizer with [CLS] and [SEP]) given BERT's post-processor when it has none:
    encoding with special tokens gives `[CLS] A [SEP]`, and for a pair `[CLS] A [SEP] B [SEP]` with B's part
    in segment 1, as Hugging Face's BERT tokenizers do. llmtrain itself always encodes without special tokens
    (BERT samples place [CLS]/[SEP] themselves), so this only matters to users of the exported tokenizer."""
    from tokenizers import processors

    if hf.post_processor is None:
        cls, sep = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
        hf.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    return hf


def _nonempty(texts: Iterable[str]) -> Iterable[str]:
    for t in texts:
        if t:
            yield t


def check_same_tokenizer(data_tok: Tokenizer, other: Tokenizer, where: str) -> None:
    """DataError unless `other` (the tokenizer a checkpoint was trained with) is the data's, by hash: a model
    started from another tokenizer's weights reads every id as a different token. `where` names the setting,
    e.g. "model.init_from=runs/a". For the trainer, before step 1 (`eval` refuses the same mismatch):

        from llmtrain.inference import checkpoint_tokenizer  # the checkpoint's own tokenizer/ or its data's
        check_same_tokenizer(data.tokenizer, checkpoint_tokenizer(path), f"model.init_from={path}")
    """
    if other.hash != data_tok.hash:
        raise DataError(
            f"{where}: the checkpoint was trained with tokenizer {other.hash} ({other.source}, "
            f"{other.vocab_size} tokens) but this run's data is tokenized with {data_tok.hash} "
            f"({data_tok.source}, {data_tok.vocab_size} tokens); prepare the data with the checkpoint's "
            "tokenizer (llmtrain prepare-data --tokenizer), or start from a checkpoint trained on this one"
        )


def tokenizer_meta(tok: Tokenizer) -> dict[str, Any]:
    """What a manifest records about the tokenizer its tokens came from."""
    return {
        "hash": tok.hash,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "kind": tok.kind,
        "file": TOKENIZER_FILE,
    }


def set_tokenizer_threads() -> None:
    """HF tokenizers spawns one thread per core per process; in worker processes that oversubscribes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
