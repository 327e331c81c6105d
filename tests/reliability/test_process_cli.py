"""What a newcomer meets at the command line: whole --help descriptions, pointers instead of dead ends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import BIN, ROOT, TINY, TRAIN, env, free_port

from llmtrain.cli import build_parser, main


def test_every_sub_command_help_has_a_whole_description():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert len(sub.choices) >= 13
    for name, parser in sub.choices.items():
        text = " ".join((parser.description or "").split())
        assert len(text) > 30 and text[-1] in ".?!)", f"llmtrain {name} --help: {text!r}"


HELP_WITHOUT_TORCH = """
import contextlib, io, runpy, sys
sys.argv = ["llmtrain", "--help"]
with contextlib.redirect_stdout(io.StringIO()) as top:
    try:
        runpy.run_module("llmtrain.cli", run_name="__main__")  # python -m llmtrain.cli --help
    except SystemExit:
        pass
from llmtrain.cli import build_parser
parser = build_parser()
commands = next(a for a in parser._actions if a.dest == "command").choices
for name in commands:
    with contextlib.redirect_stdout(io.StringIO()) as page:
        try:
            parser.parse_args([name, "--help"])
        except SystemExit:
            pass
    assert page.getvalue().startswith("usage: llmtrain " + name), name
heavy = sorted(m for m in ("torch", "numpy", "deepspeed", "safetensors", "tokenizers", "yaml") if m in sys.modules)
print(len(commands), "commands", "quantize" in top.getvalue(), heavy)
"""


def test_help_pages_import_no_torch():
    """`llmtrain --help` and every `llmtrain COMMAND --help` build the parser without torch, so help is instant."""
    proc = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, _, listed, heavy = proc.stdout.split(maxsplit=3)
    assert int(n) >= 13 and listed == "True" and heavy.strip() == "[]", proc.stdout


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["eval"]])
def test_a_transformers_directory_points_to_import_hf(tmp_path, capsys, command):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (hf / "model.safetensors").write_bytes(b"")
    assert main([command[0], str(hf), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"llmtrain import-hf {hf} OUT" in err


def test_a_layout_error_under_torchrun_is_one_line_without_child_failed_traceback(tmp_path):
    cmd = [
        str(BIN / "python"),
        str(ROOT / "launchers" / "torchrun.py"),
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        TRAIN,
        str(ROOT / "recipes/gpt_debug.yaml"),
        *TINY,
        f"out_dir={tmp_path / 'run'}",
        "parallel.tp=3",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "parallel.tp*parallel.pp = 3*1" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
