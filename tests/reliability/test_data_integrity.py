"""Prepared shards are verified: flipped bytes and out-of-vocabulary token ids are one line naming the shard.

Issue 13, item 2: the manifest records a digest per 1 MiB block of every shard file; every run checks
headers and sizes and hashes the blocks (all of them up to 256 MiB, a sample above); `llmtrain verify`
hashes all of them. Datasets prepared before checksums existed still train, with a one-line notice.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # datahelpers

from datahelpers import make_docs, prepare  # noqa: E402
from helpers import train  # noqa: E402

from llmtrain.cli import main as llmtrain_main  # noqa: E402
from llmtrain.data import DataConfig, build_data  # noqa: E402
from llmtrain.data.format import HEADER, shard_checksums  # noqa: E402
from llmtrain.errors import DataError  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from llmtrain.data.tokenizer import train_tokenizer

    tok = train_tokenizer(make_docs(200, seed=99), "bpe", VOCAB)
    out = tmp_path_factory.mktemp("integrity") / "ds"
    prepare(tok, out, make_docs(400, seed=1))
    return out


@pytest.fixture()
def copy(tmp_path, dataset) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "copy"))


def open_data(path: Path, batch: int = 2, **kw):
    return build_data(
        DataConfig(path=str(path), **kw), seq_len=16, seed=0, micro_batch_size=batch, grad_accum=1, dp_rank=0, dp_size=1
    )


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def flip(file: Path, offset: int) -> None:
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 0x10
    file.write_bytes(bytes(raw))


def set_token(file: Path, index: int, value: int) -> None:
    """Write token `value` at `index` of a uint16 shard, and record the new checksums (as a shard made with
    another tokenizer would carry): only the token-range check can catch it."""
    raw = bytearray(file.read_bytes())
    raw[HEADER.size + 2 * index : HEADER.size + 2 * index + 2] = np.uint16(value).tobytes()
    file.write_bytes(bytes(raw))
    manifest = json.loads((file.parent / "manifest.json").read_text())
    manifest["checksums"]["files"].update(shard_checksums(file.with_suffix("")))
    (file.parent / "manifest.json").write_text(json.dumps(manifest))


def verify(capsys, *args: str) -> tuple[int, str, str]:
    rc = llmtrain_main(["verify", "--no-progress", *args])
    out, err = capsys.readouterr()
    return rc, out.strip(), err.strip()


def test_manifest_records_a_checksum_per_shard_file_and_verify_passes(dataset, capsys):
    manifest = json.loads((dataset / "manifest.json").read_text())
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert set(manifest["checksums"]["files"]) == {f"{s}{ext}" for s in shards for ext in (".bin", ".idx")}
    assert (
        manifest["checksums"]["files"]["train_00000.bin"] == shard_checksums(dataset / "train_00000")["train_00000.bin"]
    )
    rc, out, err = verify(capsys, str(dataset))
    assert rc == 0 and err == "" and out.count("\n") == 0
    assert out.startswith(f"ok: {dataset}: {2 * len(shards)} shard files") and "matches its checksum" in out


def test_a_flipped_byte_inside_a_shard_is_refused_at_start_and_by_verify(copy, capsys):
    flip(copy / "train_00001.bin", HEADER.size + 101)  # a token, not the header: sizes and headers stay valid
    with pytest.raises(
        DataError,
        match=r"train_00001\.bin: block 0 .* does not match its checksum in .*manifest"
        r"\.json: the shard is corrupt",
    ):
        open_data(copy)
    rc, out, err = verify(capsys, str(copy))
    assert rc == 2 and out == "" and err.count("\n") == 0
    assert err.startswith(f"error: {copy / 'train_00001.bin'}: block 0") and "prepare-data" in err


def test_a_token_id_beyond_the_vocabulary_names_the_shard_at_start_in_verify_and_in_the_loader(copy, capsys):
    set_token(copy / "train_00002.bin", 7, VOCAB)
    msg = rf"train_00002\.bin: token id {VOCAB} at token 7 is outside the tokenizer's {VOCAB}-token vocabulary"
    with pytest.raises(DataError, match=msg):
        open_data(copy)
    rc, _, err = verify(capsys, str(copy))
    assert rc == 2 and err.count("\n") == 0 and f"train_00002.bin: token id {VOCAB} at token 7" in err
    # With the start-up check off, the loader still refuses the batch that holds it: never an IndexError.
    data = open_data(copy, batch=256, verify="off")
    with pytest.raises(DataError, match=msg + ".*llmtrain verify"):
        for step in range(data.n_train[0] // 256 + 1):  # one epoch: every window of the train split
            data.train_batches(step)


def test_a_run_on_a_shard_with_out_of_range_ids_stops_before_step_1_with_one_line(tmp_path, copy):
    """Before: an id >= model.vocab_size reached the embedding as an IndexError traceback after start-up."""
    set_token(copy / "train_00000.bin", 3, 65535)
    proc = train(tmp_path / "run", f"data.path={copy}", "train.max_steps=2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "train_00000.bin: token id 65535 at token 3" in line and "IndexError" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_dataset_prepared_without_checksums_trains_with_one_notice_until_verify_records_them(copy, capsys):
    manifest = json.loads((copy / "manifest.json").read_text())
    recorded = manifest.pop("checksums")
    (copy / "manifest.json").write_text(json.dumps(manifest))  # as an older llmtrain wrote it
    open_data(copy).train_batches(0)
    err = capsys.readouterr().err
    notices = [ln for ln in err.splitlines() if ln.strip()]
    assert len(notices) == 1 and notices[0].startswith(f"notice: {copy / 'manifest.json'} records no shard checksums")
    assert f"llmtrain verify --add-checksums {copy}" in notices[0]
    rc, out, _ = verify(capsys, str(copy))
    assert rc == 0 and "no checksums recorded" in out and "--add-checksums" in out
    rc, out, _ = verify(capsys, "--add-checksums", str(copy))
    assert rc == 0 and "checksums recorded" in out
    assert json.loads((copy / "manifest.json").read_text())["checksums"] == recorded
    open_data(copy)
    assert capsys.readouterr().err == ""


def test_large_datasets_hash_a_sample_at_start_and_verify_hashes_every_block(tmp_path, monkeypatch, dataset):
    """Above FULL_CHECK_BYTES the start-up check hashes SAMPLE_BLOCKS block(s) per shard file; verify all.
    Blocks of 1 KiB (instead of 1 MiB) give the tiny shards several blocks each."""
    import llmtrain.data.format as fmt
    import llmtrain.data.prepare as prep
    from llmtrain.data import verify as ver
    from llmtrain.data.tokenizer import load_tokenizer

    monkeypatch.setattr(fmt, "BLOCK_SIZE", 1024)
    monkeypatch.setattr(prep, "BLOCK_SIZE", 1024)
    monkeypatch.setattr(ver, "FULL_CHECK_BYTES", 0)
    out = tmp_path / "blocks"
    prepare(load_tokenizer(dataset), out, make_docs(400, seed=1))
    report = open_data(out).sources[0].integrity
    n_files = len(ver.shard_files(json.loads((out / "manifest.json").read_text())))
    assert report.blocks == n_files * ver.SAMPLE_BLOCKS < report.total_blocks  # a sample, ~6 KB of ~113 KB
    sampled = ver.sample_blocks("train_00003.bin", -(-(out / "train_00003.bin").stat().st_size // 1024))
    other = next(i for i in range(1, 4) if i not in sampled)
    flip(out / "train_00003.bin", other * 1024 + 40)  # a block the start-up sample does not read
    open_data(out)
    with pytest.raises(DataError, match=rf"train_00003\.bin: block {other} "):
        open_data(out, verify="full")
    flip(out / "train_00003.bin", sampled[0] * 1024 + 40)  # the block it does read
    with pytest.raises(DataError, match=rf"train_00003\.bin: block {sampled[0]} "):
        open_data(out)


def test_verify_checks_checkpoint_run_and_model_directories_against_their_checksums(tmp_path, capsys):
    from llmtrain.integrity import write_checksums

    run = tmp_path / "run"
    for step in (10, 20):
        d = run / "checkpoints" / f"step_{step:08d}"
        (d / "universal").mkdir(parents=True)
        (d / "universal" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (d / "config.yaml").write_text("model: {}\n")
        write_checksums(d)
    rc, out, err = verify(capsys, str(run))
    assert rc == 0 and err == "" and out.startswith(f"ok: {run}: 2 checkpoints, 4 files") and "sha256" in out
    rc, out, _ = verify(capsys, str(run / "checkpoints" / "step_00000020"))
    assert rc == 0 and out.startswith(f"ok: {run / 'checkpoints' / 'step_00000020'}: 2 files")
    flip(run / "checkpoints" / "step_00000010" / "universal" / "model.safetensors", 1000)
    rc, out, err = verify(capsys, str(run))
    bad = run / "checkpoints" / "step_00000010" / "universal" / "model.safetensors"
    assert rc == 2 and out == "" and err.count("\n") == 0 and err.startswith(f"error: {bad} does not match its sha256")
    rc, _, err = verify(capsys, str(tmp_path / "nothing"))
    assert rc == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = verify(capsys, str(tmp_path / "empty"))
    assert rc == 2 and "neither a prepared dataset" in err


def test_verify_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        llmtrain_main(["verify", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: llmtrain verify") and "--add-checksums" in out
    assert "Exit status 0 when all is intact, 2" in " ".join(out.split())
