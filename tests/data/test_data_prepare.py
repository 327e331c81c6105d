"""prepare-data: inputs through HF datasets streaming, workers, restart, and every bad input's error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from datahelpers import make_docs, prepare

from llmtrain.data.cli import main as data_cli
from llmtrain.data.config import DataConfig
from llmtrain.data.format import HEADER, Shard, read_manifest
from llmtrain.data.reader import iter_texts


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path


def test_every_input_kind_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(20, seed=2)
    write_jsonl(tmp_path / "a.jsonl", docs)
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d)
    (tmp_path / "loader").mkdir()  # a directory of data files is a `datasets` loader name too
    shutil.copy(tmp_path / "a.parquet", tmp_path / "loader" / "train.parquet")
    assert list(iter_texts(str(tmp_path / "a.jsonl"))) == docs
    assert list(iter_texts(str(tmp_path / "a.parquet"))) == docs
    assert list(iter_texts(str(tmp_path / "txt"))) == docs  # one document per file
    assert list(iter_texts(str(tmp_path / "loader"))) == docs


def test_cli_prepares_with_worker_processes_identically(tmp_path, tiny_tokenizer):
    docs = make_docs(300, seed=4)
    write_jsonl(tmp_path / "c.jsonl", docs, field="body")
    tiny_tokenizer.save(tmp_path / "tok")
    args = [
        "prepare-data",
        "--input",
        str(tmp_path / "c.jsonl"),
        "--text-field",
        "body",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--shard-tokens",
        "4000",
        "--val-fraction",
        "0.05",
        "--no-progress",
    ]
    assert data_cli([*args, "--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    one = prepare(tiny_tokenizer, tmp_path / "w1", docs, shard_tokens=4000, val_fraction=0.05)
    two = read_manifest(tmp_path / "w2")
    assert two["splits"] == one["splits"] and len(two["splits"]["train"]["shards"]) > 3
    for name in two["splits"]["train"]["shards"] + two["splits"]["val"]["shards"]:
        assert (tmp_path / "w1" / f"{name}.bin").read_bytes() == (tmp_path / "w2" / f"{name}.bin").read_bytes()


def test_interrupted_prepare_restarts_after_its_finished_shards(tmp_path, tiny_tokenizer):
    docs = make_docs(300, seed=6)
    whole = prepare(tiny_tokenizer, tmp_path / "whole", docs, shard_tokens=3000, batch_docs=16)

    def dying():
        for i, d in enumerate(docs):
            if i == 200:
                raise KeyboardInterrupt  # the user hits Ctrl-C mid-way
            yield d

    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_tokenizer, tmp_path / "cut", dying(), shard_tokens=3000, batch_docs=16)
    assert not (tmp_path / "cut" / "manifest.json").exists()  # never looks complete
    done = len(list((tmp_path / "cut").glob("chunk_*.json")))
    assert done > 0
    again = prepare(tiny_tokenizer, tmp_path / "cut", docs, shard_tokens=3000, batch_docs=16)
    assert again["splits"] == whole["splits"]
    assert again["new_tokens"] < sum(whole["splits"][s]["tokens"] for s in ("train", "val"))  # skipped work
    for name in whole["splits"]["train"]["shards"]:
        assert (tmp_path / "whole" / f"{name}.bin").read_bytes() == (tmp_path / "cut" / f"{name}.bin").read_bytes()


# -- bad input: one clear ValueError naming the file and the fix ----------------------------------


def test_missing_text_field_names_the_file_and_the_fields(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "m.jsonl", ["a b c"], field="body")
    with pytest.raises(
        ValueError, match=r"m\.jsonl: its records have no field 'text' \(fields: body, n\); pass --text-field"
    ):
        prepare(tiny_tokenizer, tmp_path / "o", iter_texts(str(tmp_path / "m.jsonl")))


def test_empty_corpus_is_an_error(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "e.jsonl", ["", ""])
    with pytest.raises(ValueError, match="corpus is empty"):
        prepare(tiny_tokenizer, tmp_path / "o", iter_texts(str(tmp_path / "e.jsonl")), label=str(tmp_path / "e.jsonl"))
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(ValueError, match="none.jsonl: the corpus is empty"):
        prepare(
            tiny_tokenizer,
            tmp_path / "o2",
            iter_texts(str(tmp_path / "none.jsonl")),
            label=str(tmp_path / "none.jsonl"),
        )


@pytest.fixture()
def copy_of(tmp_path, tiny_dataset):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_dataset, dst)
    return dst


def open_data(path, T=16):
    from llmtrain.data import build_data

    return build_data(
        DataConfig(path=str(path)), seq_len=T, seed=0, micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=1
    )


def test_bad_magic(copy_of):
    f = copy_of / "train_00000.bin"
    raw = bytearray(f.read_bytes())
    raw[:8] = b"GARBAGE!"
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train_00000\.bin: bad magic .* run `llmtrain prepare-data` again"):
        open_data(copy_of)


def test_truncated_shard(copy_of):
    f = copy_of / "train_00001.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"train_00001\.bin: size .* does not match its header .* truncated"):
        open_data(copy_of)


def test_index_not_matching_its_shard(copy_of):
    shutil.copy(copy_of / "train_00002.idx", copy_of / "train_00000.idx")
    with pytest.raises(ValueError, match=r"train_00000\.idx: index says \d+ tokens but train_00000\.bin holds"):
        open_data(copy_of)


def test_missing_manifest_means_incomplete(copy_of):
    (copy_of / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"manifest\.json: no manifest.*interrupted `llmtrain prepare-data`"):
        open_data(copy_of)


def test_tokenizer_not_matching_the_manifest(copy_of, tmp_path):
    from llmtrain.data.tokenizer import train_tokenizer

    train_tokenizer(make_docs(50, seed=7), "bpe", 280).save(copy_of)  # someone swapped tokenizer.json
    with pytest.raises(ValueError, match=r"tokenizer\.json: tokenizer hash \w+ differs from .*manifest\.json"):
        open_data(copy_of)


def test_model_vocab_smaller_than_the_manifest_vocab(tiny_dataset):
    d = open_data(tiny_dataset)
    with pytest.raises(ValueError, match=r"manifest\.json: .* 300 tokens .* model\.vocab_size=256"):
        d.check_model_vocab(256)
    d.check_model_vocab(320)


def test_shard_header_layout_is_32_bytes(tiny_dataset):
    assert HEADER.size == 32
    s = Shard.open(tiny_dataset / "train_00000")
    assert s.tokens.dtype == np.uint16 and int(s.ends[-1]) == len(s.tokens)


def test_manifest_records_tokenizer_counts_dtype_and_source(tiny_dataset, tiny_tokenizer):
    m = read_manifest(tiny_dataset)
    assert m["tokenizer"]["hash"] == tiny_tokenizer.hash and m["tokenizer"]["vocab_size"] == 300
    assert m["dtype"] == "uint16" and m["source"] == {"test": str(tiny_dataset)} and m["input_docs"] == 400
    shards = [Shard.open(tiny_dataset / s) for s in m["splits"]["train"]["shards"]]
    assert m["splits"]["train"]["tokens"] == sum(len(s.tokens) for s in shards)
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 400


def test_vocab_above_uint16_is_stored_as_uint32(tmp_path):
    from llmtrain.data.format import ShardWriter, token_dtype

    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    w = ShardWriter(tmp_path / "train_00000", token_dtype(100_000))
    w.add(np.array([99_999, 65_536, 7, 0]))
    w.add(np.array([70_000, 0]))
    w.close()
    s = Shard.open(tmp_path / "train_00000")
    assert s.tokens.dtype == np.uint32 and s.tokens.tolist() == [99_999, 65_536, 7, 0, 70_000, 0]
    assert s.ends.tolist() == [4, 6]
    assert (tmp_path / "train_00000.bin").stat().st_size == HEADER.size + 6 * 4
