"""Streaming mode: packed windows straight from a datasets iterable, world-size independent, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datahelpers import make_docs

from llmtrain.data.config import DataConfig


@pytest.fixture(scope="module")
def stream_setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("stream")
    docs = make_docs(200, seed=31)
    (root / "s.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tiny_tokenizer.save(root / "tok")
    return root, docs


def sdata(root, dp_rank=0, dp_size=1, G=1, B=2, workers=1):
    from llmtrain.data import build_data

    cfg = DataConfig(
        stream=str(root / "s.jsonl"), stream_tokenizer=str(root / "tok"), stream_val_docs=20, stream_workers=workers
    )
    return build_data(cfg, seq_len=16, seed=0, micro_batch_size=B, grad_accum=G, dp_rank=dp_rank, dp_size=dp_size)


def test_stream_windows_are_the_packed_token_stream(stream_setup, tiny_tokenizer):
    root, docs = stream_setup
    d = sdata(root, G=3)
    got = torch.cat([mb["input_ids"] for s in range(4) for mb in d.train_batches(s)])
    flat = np.concatenate([tiny_tokenizer.encode(t) + [tiny_tokenizer.eos_id] for t in docs[20:]])
    want = np.stack([flat[i * 16 : i * 16 + 16] for i in range(len(got))])
    assert torch.equal(got, torch.from_numpy(want.astype(np.int64)))
    val = d.val_batches(2)
    vflat = np.concatenate([tiny_tokenizer.encode(t) + [tiny_tokenizer.eos_id] for t in docs[:20]])
    assert torch.equal(val[0]["input_ids"][0], torch.from_numpy(vflat[:16].astype(np.int64)))


def test_stream_resume_on_another_world_size_continues_exactly(stream_setup):
    root, _ = stream_setup
    straight = sdata(root, G=4)
    want = [torch.cat([mb["input_ids"] for mb in straight.train_batches(s)]) for s in range(5)]
    first = sdata(root, G=4)
    for s in range(3):
        first.train_batches(s)
    first.train_batches(3)  # built ahead by the trainer's prefetch; the checkpoint is after step 2
    state = json.loads(json.dumps(first.state_dict()))
    ranks = [sdata(root, dp_rank=r, dp_size=2, G=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for s in (3, 4):
        got = torch.cat([mb["input_ids"] for r in ranks for mb in r.train_batches(s)])
        assert torch.equal(got, want[s])


def test_stream_with_worker_processes_matches(stream_setup):
    root, _ = stream_setup
    a = sdata(root, G=2).train_batches(0)
    b = sdata(root, G=2, workers=2).train_batches(0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_stream_refuses_a_model_vocab_below_the_tokenizer(stream_setup):
    root, _ = stream_setup
    d = sdata(root)
    with pytest.raises(
        ValueError,
        match=r"tok.*: the tokenizer has 300 tokens but model\.vocab_size=256; set "
        r"model\.vocab_size >= 300",
    ):
        d.check_model_vocab(256)
    d.check_model_vocab(300)
