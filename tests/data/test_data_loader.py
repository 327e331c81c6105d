"""The causal loader: world-size-independent order, exact resume, packing, shard format errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datahelpers import make_docs, prepare

from llmtrain.data.config import DataConfig
from llmtrain.data.format import Shard, read_manifest


def data(path, dp_rank=0, dp_size=1, G=1, B=2, T=16, seed=3, **kw):
    from llmtrain.data import build_data

    cfg = DataConfig(path=str(path), **kw)
    return build_data(cfg, seq_len=T, seed=seed, micro_batch_size=B, grad_accum=G, dp_rank=dp_rank, dp_size=dp_size)


def global_batch(path, step, dp_size, G, B=2, **kw):
    """The concatenation over ranks of every rank's micro-batches of `step`."""
    rows = []
    for r in range(dp_size):
        for mb in data(path, r, dp_size, G, B, **kw).train_batches(step):
            rows.append(mb["input_ids"])
    return torch.cat(rows)


def test_token_counts_equal_raw_tokenizer_plus_eos(tmp_path, tiny_tokenizer):
    docs = make_docs(50, seed=5) + [""]  # an empty document adds nothing
    m = prepare(tiny_tokenizer, tmp_path / "d", docs, val_fraction=0.0, shard_tokens=500)
    raw = sum(len(tiny_tokenizer.encode(d)) + 1 for d in docs if d)
    assert m["splits"]["train"]["tokens"] == raw and m["splits"]["train"]["docs"] == 50
    assert len(m["splits"]["train"]["shards"]) > 1  # bounded shard size
    stream = np.concatenate([Shard.open(tmp_path / "d" / s).tokens for s in m["splits"]["train"]["shards"]])
    want = np.concatenate([tiny_tokenizer.encode(d) + [tiny_tokenizer.eos_id] for d in docs if d])
    np.testing.assert_array_equal(stream, want)
    assert read_manifest(tmp_path / "d")["dtype"] == "uint16"


@pytest.mark.parametrize("dp_size", [2, 4])
def test_sample_order_is_independent_of_world_size(tiny_dataset, dp_size):
    for step in (0, 7):
        one = global_batch(tiny_dataset, step, 1, G=4)
        many = global_batch(tiny_dataset, step, dp_size, G=4 // dp_size)
        assert torch.equal(one, many)


def test_labels_are_next_tokens(tiny_dataset):
    mb = data(tiny_dataset).train_batches(0)[0]
    assert mb["input_ids"].dtype == torch.long and mb["input_ids"].shape == (2, 16)
    assert torch.equal(mb["input_ids"][:, 1:], mb["labels"][:, :-1])


def test_resume_with_another_world_size_continues_exactly(tiny_dataset):
    straight = [global_batch(tiny_dataset, s, 1, G=4) for s in range(6)]
    first = data(tiny_dataset, 0, 1, G=4)
    for s in range(3):
        first.train_batches(s)
    state = first.state_dict()
    rows = {s: [] for s in range(3, 6)}
    for r in range(2):
        d = data(tiny_dataset, r, 2, G=2)
        d.load_state_dict(state)
        for s in range(3, 6):
            rows[s] += [mb["input_ids"] for mb in d.train_batches(s)]
    for s in range(3, 6):
        assert torch.equal(torch.cat(rows[s]), straight[s])


def test_an_epoch_covers_every_window_once(tiny_dataset):
    d = data(tiny_dataset, B=1)
    n = d.n_train[0]
    starts = d.window_starts(0, np.arange(n))
    assert sorted(starts.tolist()) == [i * 16 for i in range(n)]
    again = d.window_starts(0, np.arange(n, 2 * n))  # the next epoch is another permutation
    assert sorted(again.tolist()) == sorted(starts.tolist()) and not np.array_equal(again, starts)


def test_val_batches_are_deterministic_and_split_over_ranks(tiny_dataset):
    a = data(tiny_dataset, 0, 2).val_batches(3)
    b = data(tiny_dataset, 1, 2).val_batches(3)
    one = data(tiny_dataset, 0, 1, B=4).val_batches(3)
    assert len(a) == len(b) == 3
    for i in range(3):
        assert torch.equal(torch.cat([a[i]["input_ids"], b[i]["input_ids"]]), one[i]["input_ids"])
    assert torch.equal(data(tiny_dataset).val_batches(2)[1]["labels"], data(tiny_dataset).val_batches(2)[1]["labels"])


def test_doc_mask_positions_restart_after_eos(tiny_dataset):
    d = data(tiny_dataset, doc_mask=True, T=64)
    mb = d.train_batches(0)[0]
    eos = d.tokenizer.eos_id
    ids, pos, docs = mb["input_ids"], mb["position_ids"], mb["doc_ids"]
    assert (pos[:, 0] == 0).all() and pos.max() < 64  # a document cut by the window start restarts too
    for row in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            new_doc = ids[row, t - 1].item() == eos
            assert (pos[row, t].item() == 0) == new_doc
            assert docs[row, t].item() == docs[row, t - 1].item() + int(new_doc)
    assert (mb["labels"][ids == eos] == -100).all()


def test_resume_with_another_global_batch_continues_at_the_next_sample(tiny_dataset):
    a = data(tiny_dataset, G=2)  # 4 samples per step
    for s in range(3):
        a.train_batches(s)  # the trainer may also build step 3 early: that must not move the position
    a.train_batches(3)
    b = data(tiny_dataset, G=4)  # 8 samples per step from now on
    b.load_state_dict(a.state_dict())
    assert b.step_start(3) == 12 and b.step_start(4) == 20
    whole = data(tiny_dataset, B=1).samples(np.arange(12, 20))["tokens"][:, :-1]
    assert torch.equal(torch.cat([mb["input_ids"] for mb in b.train_batches(3)]), torch.from_numpy(whole))


def test_windows_across_shard_boundaries_match_the_token_stream(tiny_dataset):
    d = data(tiny_dataset, B=1)
    stream = d.sources[0].train
    assert len(stream.shards) > 3  # many windows straddle two shards
    flat = np.concatenate([s.tokens for s in stream.shards]).astype(np.int64)
    n = d.n_train[0]
    got = d.samples(np.arange(n))["tokens"]
    _, starts = d.starts(np.arange(n))
    np.testing.assert_array_equal(got, np.stack([flat[s : s + 17] for s in starts]))


def test_cached_epoch_permutation_equals_the_per_sample_one(tiny_dataset, monkeypatch):
    import llmtrain.data.loader as loader

    d = data(tiny_dataset)
    g = np.arange(0, 3 * d.n_train[0], 7)  # batches inside an epoch and straddling two
    cached = d.starts(g)[1]
    assert len(d._perm_cache) == 2  # this epoch and the one before are kept
    monkeypatch.setattr(loader, "PERM_CACHE_MAX", 0)  # what a large source does: no table
    np.testing.assert_array_equal(data(tiny_dataset).starts(g)[1], cached)
