"""Bad input through the commands users run: one `error:` line naming the file and the fix, exit 2, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from datahelpers import make_docs
from helpers import ROOT, env, train

from llmtrain.cli import main as llmtrain_main


def run_llmtrain(*args: str) -> subprocess.CompletedProcess:
    """The installed `llmtrain` console script, as a user types it."""
    llmtrain = str(ROOT / ".venv" / "bin" / "llmtrain") if (ROOT / ".venv" / "bin" / "llmtrain").exists() else None
    cmd = [llmtrain] if llmtrain else [sys.executable, "-m", "llmtrain.cli"]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_console_script_lists_the_data_commands_and_reports_a_missing_text_field(tmp_path, tiny_tokenizer):
    (tmp_path / "m.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    tiny_tokenizer.save(tmp_path / "tok")
    proc = run_llmtrain(
        "prepare-data",
        "--input",
        str(tmp_path / "m.jsonl"),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--out",
        str(tmp_path / "o"),
        "--workers",
        "1",
        "--no-progress",
    )
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "m.jsonl" in line and "no field 'text'" in line and "--text-field" in line


def test_llmtrain_cli_errors_for_empty_corpus_and_bad_tokenizer(tmp_path, tiny_tokenizer, capsys):
    tiny_tokenizer.save(tmp_path / "tok")
    (tmp_path / "empty.txt").write_text("")
    rc = llmtrain_main(
        [
            "prepare-data",
            "--input",
            str(tmp_path / "empty.txt"),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "empty.txt" in line and "corpus is empty" in line
    rc = llmtrain_main(
        [
            "prepare-data",
            "--input",
            str(tmp_path / "empty.txt"),
            "--tokenizer",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "o2"),
            "--no-progress",
        ]
    )
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "nowhere" in line
    (tmp_path / "docs.txt").write_text("")
    rc = llmtrain_main(
        [
            "train-tokenizer",
            "--input",
            str(tmp_path / "docs.txt"),
            "--kind",
            "wordpiece",
            "--vocab-size",
            "100",
            "--out",
            str(tmp_path / "t"),
        ]
    )
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "docs.txt" in line and "corpus is empty" in line


def test_launcher_refuses_a_truncated_shard_and_a_model_vocab_below_the_tokenizer(tmp_path, tiny_dataset):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dataset, bad)
    f = bad / "train_00001.bin"
    f.write_bytes(f.read_bytes()[:-6])
    proc = train(tmp_path / "run1", f"data.path={bad}", "train.max_steps=1", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "train_00001.bin" in line and "truncated" in line and "llmtrain prepare-data" in line

    # The tiny dataset's tokenizer has 300 tokens; a 256-row embedding cannot take its ids.
    proc = train(
        tmp_path / "run2", f"data.path={tiny_dataset}", "model.vocab_size=256", "train.max_steps=1", check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "manifest.json" in line and "model.vocab_size=256" in line and "set model.vocab_size >= 300" in line
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_prepare_restart_skips_finished_shards_through_the_cli(tmp_path, tiny_tokenizer, capsys):
    """A second run over a complete dataset tokenizes nothing and leaves the shards as they were."""
    (tmp_path / "c.txt").write_text("\n".join(make_docs(120, seed=8)))
    tiny_tokenizer.save(tmp_path / "tok")
    args = [
        "prepare-data",
        "--input",
        str(tmp_path / "c.txt"),
        "--sample-by",
        "line",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--out",
        str(tmp_path / "o"),
        "--workers",
        "1",
        "--shard-tokens",
        "1500",
    ]
    assert llmtrain_main(args) == 0
    out = capsys.readouterr()
    first = json.loads(out.out)
    assert "tokenizing" in out.err and "tok/s" in out.err  # the progress bar shows tokens/s
    shard = (tmp_path / "o" / "train_00000.bin").read_bytes()
    assert llmtrain_main([*args, "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert first["shards"] > 2 and again["shards"] == first["shards"] and again["train"] == first["train"]
    assert again["tokens_per_s"] == 0 and (tmp_path / "o" / "train_00000.bin").read_bytes() == shard


@pytest.mark.parametrize("command", ["train-tokenizer", "prepare-data"])
def test_data_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        llmtrain_main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and f"usage: llmtrain {command}" in out and "--input" in out and "--out" in out
