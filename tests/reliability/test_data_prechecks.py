"""Data checks that must happen before step 1, not after the last one (issue 13, item 6, data parts).

Before: `prepare-data` with the default --val-fraction (0.0005) on a 587-document corpus held out no
document, and a run on it trained every step and then failed at the final eval. Now prepare keeps at
least one validation document (and says so), and `data.check_eval(n)` (called by the trainer before
step 1) refuses a split that cannot fill one eval batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # datahelpers

from datahelpers import make_docs, prepare  # noqa: E402

from llmtrain.cli import main as llmtrain_main  # noqa: E402
from llmtrain.data import DataConfig, build_data  # noqa: E402
from llmtrain.data.format import Shard  # noqa: E402
from llmtrain.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from llmtrain.data.tokenizer import train_tokenizer

    return train_tokenizer(make_docs(200, seed=99), "bpe", 300)


def open_data(path: Path, T: int = 16, B: int = 2, dp_size: int = 1):
    return build_data(
        DataConfig(path=str(path)), seq_len=T, seed=0, micro_batch_size=B, grad_accum=1, dp_rank=0, dp_size=dp_size
    )


def test_prepare_keeps_a_validation_document_of_a_small_corpus_with_the_default_fraction(tmp_path, tok, capsys):
    docs = make_docs(587, seed=5)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok.save(tmp_path / "tok")
    rc = llmtrain_main(
        [
            "prepare-data",
            "--input",
            str(tmp_path / "c.jsonl"),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--out",
            str(tmp_path / "d"),
            "--workers",
            "1",
            "--no-progress",
        ]
    )  # default --val-fraction
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert rc == 0 and summary["val"]["docs"] == 1 and summary["train"]["docs"] == 586
    assert (
        err.startswith(
            "notice: --val-fraction 0.0005 of 587 documents held out none, so the last training "
            "document became the validation split"
        )
        and err.count("\n") == 1
    )
    # The held-out document is the corpus' last, and it left the training split (no leak).
    last = np.array(tok.encode(docs[-1]) + [tok.eos_id])
    val = Shard.open(tmp_path / "d" / "val_00000").tokens
    assert np.array_equal(val, last)
    train = Shard.open(tmp_path / "d" / "train_00000")
    assert train.tokens.size == sum(len(tok.encode(d)) + 1 for d in docs[:-1])
    data = open_data(tmp_path / "d", T=8, B=1)
    data.check_eval(1)
    assert data.val_batches(1)[0]["input_ids"].shape == (1, 8)


def test_prepare_with_several_shards_moves_the_document_before_the_last_shard_is_final(tmp_path, tok):
    """The last shard is still open when the corpus ends, also when its last document filled it."""
    docs = make_docs(587, seed=5)
    m = prepare(tok, tmp_path / "d", docs, val_fraction=0.0005, shard_tokens=2000)
    assert m["splits"]["val"]["docs"] == 1 and m["moved_to_val"] == 1
    assert m["splits"]["train"]["docs"] == 586 and len(m["splits"]["train"]["shards"]) > 5
    again = prepare(tok, tmp_path / "d", docs, val_fraction=0.0005, shard_tokens=2000)  # a rerun changes nothing
    assert again["splits"] == m["splits"] and again["new_tokens"] == 0
    exact = sum(len(tok.encode(d)) + 1 for d in docs[:3])  # the third document ends exactly at the shard size
    three = prepare(tok, tmp_path / "e", docs[:3], val_fraction=0.0005, shard_tokens=exact)
    assert [three["splits"][s]["docs"] for s in ("train", "val")] == [2, 1]


def test_check_eval_refuses_before_step_1_a_missing_or_too_small_validation_split(tmp_path, tok):
    prepare(tok, tmp_path / "none", make_docs(60, seed=3), val_fraction=0.0)
    with pytest.raises(DataError, match=r"none: no validation split .* --val-fraction"):
        open_data(tmp_path / "none").check_eval(2)
    prepare(tok, tmp_path / "small", make_docs(587, seed=5), val_fraction=0.0005)  # one held-out document
    data = open_data(tmp_path / "small", T=16, B=8, dp_size=2)
    with pytest.raises(
        DataError,
        match=r"small: the validation split has \d+ sequences of train\.seq_len=16, fewer "
        r"than one eval batch \(train\.micro_batch_size=8 x 2 data-parallel ranks "
        r"= 16\)",
    ):
        data.check_eval(1)
    with pytest.raises(DataError, match=r"train\.eval_batches=0: .* set train\.eval_batches >= 1"):
        open_data(tmp_path / "small").check_eval(0)
    open_data(tmp_path / "small", T=8, B=1).check_eval(1)  # fits


def test_check_eval_of_streaming_data(tmp_path, tok):
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(40, seed=2)))
    tok.save(tmp_path / "tok")
    cfg = DataConfig(stream=str(tmp_path / "s.jsonl"), stream_tokenizer=str(tmp_path / "tok"), stream_val_docs=1)
    data = build_data(cfg, seq_len=64, seed=0, micro_batch_size=8, grad_accum=1, dp_rank=0, dp_size=1)
    with pytest.raises(
        DataError,
        match=r"s\.jsonl: its first data\.stream_val_docs=1 documents give \d+ validation "
        r"sequences, fewer than one global micro-batch",
    ):
        data.check_eval(1)
    with pytest.raises(DataError, match=r"train\.eval_batches=0"):
        data.check_eval(0)


def test_a_checkpoint_trained_with_another_tokenizer_is_named_by_the_comparison_helper(tmp_path, tok):
    """Issue 13, item 6: model.init_from a checkpoint of another tokenizer was accepted (eval refused it).
    The trainer compares the data's tokenizer with the checkpoint's through this helper before step 1."""
    from llmtrain.data import check_same_tokenizer
    from llmtrain.data.tokenizer import train_tokenizer
    from llmtrain.inference import checkpoint_tokenizer

    ckpt = tmp_path / "imported"  # a model directory that carries its own tokenizer/ (import-hf writes one)
    (ckpt / "tokenizer").mkdir(parents=True)
    (ckpt / "config.yaml").write_text("{}\n")
    train_tokenizer(make_docs(100, seed=8), "bpe", 280).save(ckpt / "tokenizer")
    prepare(tok, tmp_path / "d", make_docs(60, seed=3))
    data = open_data(tmp_path / "d")
    with pytest.raises(
        DataError,
        match=rf"model\.init_from={ckpt}: the checkpoint was trained with tokenizer \w+ "
        r".*280 tokens\) but this run's data is tokenized with \w+ .*300 tokens\); "
        r"prepare the data with the checkpoint's tokenizer",
    ):
        check_same_tokenizer(data.tokenizer, checkpoint_tokenizer(ckpt), f"model.init_from={ckpt}")
    tok.save(ckpt / "tokenizer")  # the same tokenizer: accepted
    check_same_tokenizer(data.tokenizer, checkpoint_tokenizer(ckpt), f"model.init_from={ckpt}")
