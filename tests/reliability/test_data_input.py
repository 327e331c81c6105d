"""Bad corpora given to prepare-data (issue 13, item 7, data parts).

Before: a file that is not UTF-8 ended prepare-data with a UnicodeDecodeError traceback from inside
`datasets`/pyarrow; JSONL records without the text field became empty documents, dropped without a word.
Now: one line naming the file, where, and the fix (exit 2); records without the field are counted and
reported at the end, or refused with --on-missing-text error.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # datahelpers

from datahelpers import make_docs  # noqa: E402

from llmtrain.cli import main as llmtrain_main  # noqa: E402
from llmtrain.data.format import read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from llmtrain.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(make_docs(200, seed=99), "bpe", 300).save(out)
    return out


def prepare(capsys, tok_dir: Path, out: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    args = ["prepare-data", "--tokenizer", str(tok_dir), "--out", str(out), "--workers", "1", "--no-progress", *extra]
    for i in inputs:
        args += ["--input", str(i)]
    rc = llmtrain_main(args)
    stdout, stderr = capsys.readouterr()
    return rc, stdout, stderr


def latin1_lines(n_good: int) -> bytes:
    good = "".join(json.dumps({"text": d}) + "\n" for d in make_docs(n_good, seed=3)).encode()
    return good + b'{"text": "caf\xe9 au lait"}\n'  # latin-1 e-acute: not UTF-8


@pytest.mark.parametrize("kind", ["jsonl", "txt", "jsonl.gz"])
def test_non_utf8_input_is_one_line_naming_the_file_where_and_the_fix(tmp_path, tok_dir, capsys, kind):
    raw = latin1_lines(30)
    if kind == "txt":
        raw = "\n".join(make_docs(30, seed=3)).encode() + b"\ncaf\xe9 au lait\n"
    path = tmp_path / f"corpus.{kind}"
    path.write_bytes(gzip.compress(raw) if kind.endswith(".gz") else raw)
    rc, out, err = prepare(
        capsys, tok_dir, tmp_path / "o", path, extra=("--sample-by", "line") if kind == "txt" else ()
    )
    assert rc == 2 and out == "" and "Traceback" not in err and err.count("\n") == 1, err
    offset = raw.index(b"\xe9")
    assert err.startswith(f"error: {path}: not UTF-8 text (invalid byte at offset {offset}, line 31)")
    assert f"iconv -f cp1252 -t utf-8 {path}" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_train_tokenizer_on_non_utf8_input_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_bytes(latin1_lines(5))
    rc = llmtrain_main(["train-tokenizer", "--input", str(path), "--vocab-size", "300", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}: not UTF-8 text"), err


def test_records_without_the_text_field_are_counted_and_reported_or_refused(tmp_path, tok_dir, capsys):
    docs = make_docs(20, seed=4)
    lines = [
        json.dumps({"text": d, "id": i}) if i % 4 else json.dumps({"body": d, "id": i})  # 0, 4, ... lack it
        for i, d in enumerate(docs)
    ]
    lines[1] = json.dumps({"text": None, "id": 1})  # a null text counts as missing
    lines[2] = json.dumps({"text": "", "id": 2})  # an empty text is an empty document, counted apart
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    rc, out, err = prepare(capsys, tok_dir, tmp_path / "o", tmp_path / "c.jsonl")
    summary = json.loads(out)
    assert rc == 0 and summary["input"] == {"records": 20, "missing_text_field": 6, "empty_text": 1}
    assert (
        summary["train"]["docs"] + summary["val"]["docs"]
        == 13
        == read_manifest(tmp_path / "o")["splits"]["train"]["docs"]
        + read_manifest(tmp_path / "o")["splits"]["val"]["docs"]
    )
    notices = [ln for ln in err.splitlines() if "records had no" in ln]
    assert notices == [
        f"notice: 6 of 20 records had no 'text' field (or a null one) and were skipped (the first: "
        f"{tmp_path / 'c.jsonl'} record 0); pass --on-missing-text error to refuse such input"
    ]
    rc, out, err = prepare(capsys, tok_dir, tmp_path / "o2", tmp_path / "c.jsonl", extra=("--on-missing-text", "error"))
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'c.jsonl'}: record 0 (0-based) has no 'text' field (or it is null)")
