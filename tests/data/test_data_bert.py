"""BERT samples: pair layout, NSP labels, masked-LM statistics, whole-word masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datahelpers import make_docs, prepare

from llmtrain.data.config import DataConfig


@pytest.fixture(scope="module")
def wp_dataset(tmp_path_factory):
    from llmtrain.data.tokenizer import train_tokenizer

    docs = make_docs(300, seed=21, min_words=40, max_words=200)
    tok = train_tokenizer(docs, "wordpiece", 80)  # small vocab: many words split into ##pieces
    out = tmp_path_factory.mktemp("bert") / "wp"
    prepare(tok, out, docs, val_fraction=0.1, shard_tokens=20000)
    return out


def bert(path, whole_word=False, dp_rank=0, dp_size=1, B=50, G=1):
    from llmtrain.data import build_data

    cfg = DataConfig(path=str(path), sample_kind="bert", whole_word_mask=whole_word)
    return build_data(cfg, seq_len=64, seed=5, micro_batch_size=B, grad_accum=G, dp_rank=dp_rank, dp_size=dp_size)


def batches(d, steps=20):
    out = [mb for s in range(steps) for mb in d.train_batches(s)]
    return {k: torch.cat([mb[k] for mb in out]) for k in out[0]}


def test_pair_layout_and_nsp_labels(wp_dataset):
    d = bert(wp_dataset)
    b = batches(d)
    ids, types, att, mlm, nsp = (
        b[k] for k in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels")
    )
    assert ids.shape == (1000, 64) and nsp.shape == (1000,)
    assert (ids[:, 0] == d.cls).all()
    orig = torch.where(mlm != -100, mlm, ids)
    for i in range(len(ids)):
        n = int(att[i].sum())
        assert (orig[i, n:] == d.pad).all() and (att[i, :n] == 1).all()
        seps = (orig[i, :n] == d.sep).nonzero().flatten().tolist()
        assert seps[-1] == n - 1 and len(seps) == 2
        assert (types[i, : seps[0] + 1] == 0).all() and (types[i, seps[0] + 1 : n] == 1).all()
    assert abs(nsp.float().mean().item() - 0.5) < 0.05  # 1000 samples: std 0.016


def test_true_next_segment_follows_a_in_the_corpus(wp_dataset):
    d = bert(wp_dataset, B=10)
    b = d.train_batches(0)[0]
    _, starts = d.starts(np.arange(10))
    stream = d.sources[0].train
    orig = torch.where(b["mlm_labels"] != -100, b["mlm_labels"], b["input_ids"])
    checked = 0
    for i in range(10):
        if b["nsp_labels"][i] != 0:
            continue
        row = orig[i, : int(b["attention_mask"][i].sum())].tolist()
        a_b = [t for t in row[1:-1] if t != d.sep]  # A then B without the separators
        candidates = [int(starts[i]), stream.doc_bounds(int(starts[i]))[0]]
        assert any(stream.window(c, len(a_b)).tolist() == a_b for c in candidates)
        checked += 1
    assert checked > 0


def test_mlm_statistics_15_percent_with_80_10_10(wp_dataset):
    d = bert(wp_dataset)
    b = batches(d)
    ids, mlm = b["input_ids"], b["mlm_labels"]
    special = torch.isin(torch.where(mlm != -100, mlm, ids), torch.from_numpy(d.special_ids))
    chosen = mlm != -100
    assert abs(chosen.sum().item() / (~special).sum().item() - 0.15) < 0.01
    masked = (ids[chosen] == d.mask).float().mean().item()
    kept = (ids[chosen] == mlm[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1 - 0.1 / len(d.normal_ids)) < 0.02
    assert not (chosen & special).any()


def test_whole_word_masking_takes_every_piece_of_a_word(wp_dataset):
    d = bert(wp_dataset, whole_word=True)
    b = batches(d, steps=4)
    orig = torch.where(b["mlm_labels"] != -100, b["mlm_labels"], b["input_ids"])
    chosen = (b["mlm_labels"] != -100).numpy()
    cont = d.continues_word[orig.numpy()]
    assert cont.sum() > 100  # the small vocab really splits words
    # A continuation piece is chosen exactly when the piece before it is (unless [CLS]/[SEP] precede it:
    # a segment may start inside a word, and that fragment is a word of its own).
    prev_normal = ~np.isin(orig.numpy()[:, :-1], d.special_ids)
    inner = cont[:, 1:] & prev_normal
    assert (chosen[:, 1:][inner] == chosen[:, :-1][inner]).all()


def test_bert_order_is_world_size_independent_and_val_works(wp_dataset):
    one = bert(wp_dataset, B=4, G=2).train_batches(3)
    two = [bert(wp_dataset, dp_rank=r, dp_size=2, B=4).train_batches(3)[0] for r in range(2)]
    for k in one[0]:
        assert torch.equal(torch.cat([mb[k] for mb in one]), torch.cat([mb[k] for mb in two]))
    v = bert(wp_dataset, B=4).val_batches(2)
    assert len(v) == 2 and v[0]["input_ids"].shape == (4, 64)


def test_bert_needs_a_wordpiece_tokenizer(tiny_dataset):
    with pytest.raises(ValueError, match=r"tokenizer\.json: BERT samples need the special tokens .* --kind wordpiece"):
        bert(tiny_dataset)
