"""The classifier task's passages (data.sample_kind=source_class) built with a model's own tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datahelpers import make_docs

from llmtrain.data.config import DataConfig
from llmtrain.errors import DataError


def _classes(**kw):
    from llmtrain.data import build_data

    cfg = DataConfig(tokenizer="wordpiece", sample_kind="source_class", **kw)
    return build_data(cfg, seq_len=32, seed=3, micro_batch_size=6, grad_accum=1, dp_rank=0, dp_size=1)


def test_a_shipped_tokenizer_json_is_read_without_its_truncation_and_padding(tmp_path):
    """all-MiniLM-L6-v2's tokenizer.json fixes truncation and padding at 128: documents are encoded whole."""
    from llmtrain.data.tokenizer import load_tokenizer, train_tokenizer

    tok = train_tokenizer(make_docs(100, seed=4), "wordpiece", 200)
    spec = json.loads(tok.hf.to_str())
    spec["truncation"] = {"max_length": 8, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    spec["padding"] = {
        "strategy": {"Fixed": 8},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "[PAD]",
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    shipped = load_tokenizer(tmp_path)
    text = " ".join(make_docs(3, seed=5))
    assert len(tok.encode(text)) > 8
    assert shipped.encode(text) == tok.encode(text) and shipped.encode_batch(["a"]) == tok.encode_batch(["a"])
    assert shipped.hash == tok.hash  # the same vocabulary is the same tokenizer


def test_tokenizer_path_gives_the_bundled_passages_when_it_is_the_bundled_tokenizer(tmp_path):
    """A copy of the bundled WordPiece given as a model's tokenizer: same ids, same batches (the
    passages are built into their own cache folder, named by the tokenizer's hash)."""
    from llmtrain.data.bundled import bundled_tokenizer_dir

    bundled = _classes()
    shutil.copy(bundled_tokenizer_dir(DataConfig(tokenizer="wordpiece")) / "tokenizer.json", tmp_path)
    own = _classes(tokenizer_path=str(tmp_path))
    for a, b in [
        (bundled.train_batches(0)[0], own.train_batches(0)[0]),
        (bundled.val_batches(1)[0], own.val_batches(1)[0]),
    ]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    own.check_model_vocab(bundled.vocab_size)
    with pytest.raises(DataError, match=r"data.tokenizer_path=.* has 8192 tokens but model.vocab_size=30522"):
        own.check_model_vocab(30522)  # a model reads only its own tokenizer: sizes must agree
    bundled.check_model_vocab(30522)  # the bundled tokenizer may sit in a larger embedding table


def test_tokenizer_path_needs_bert_specials_and_the_classifier_task(tmp_path):
    from llmtrain.data import build_data
    from llmtrain.data.tokenizer import train_tokenizer

    train_tokenizer(make_docs(50, seed=6), "bpe", 300).save(tmp_path)
    with pytest.raises(DataError, match=r"need the special tokens \[PAD\], \[UNK\], \[CLS\], \[SEP\]"):
        _classes(tokenizer_path=str(tmp_path))
    with pytest.raises(DataError, match="data.tokenizer_path is read by data.sample_kind=source_class only"):
        build_data(
            DataConfig(tokenizer_path=str(tmp_path)),
            seq_len=32,
            seed=0,
            micro_batch_size=2,
            grad_accum=1,
            dp_rank=0,
            dp_size=1,
        )
