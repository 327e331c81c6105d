"""Error policy of the `llmtrain` command: the user's mistakes are one line (exit 2), bugs keep their traceback."""

from __future__ import annotations

import pytest

import llmtrain.config
from llmtrain.cli import main
from llmtrain.errors import CheckpointError, DataError, UserError


def test_user_errors_are_one_line_and_other_value_errors_keep_their_traceback(tmp_path, capsys, monkeypatch):
    assert issubclass(llmtrain.config.ConfigError, UserError)
    assert issubclass(CheckpointError, UserError) and issubclass(DataError, UserError)
    assert main(["config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe file not found:") and err.count("\n") == 1 and "Traceback" not in err

    def buggy(*args, **kwargs):  # a bug deep inside a command, not a mistake in the user's input
        raise ValueError("not enough values to unpack")

    monkeypatch.setattr(llmtrain.config, "load_config", buggy)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        main(["config", str(tmp_path / "missing.yaml")])
    monkeypatch.setattr(llmtrain.config, "load_config", lambda *a: (_ for _ in ()).throw(DataError("d.bin: bad")))
    assert main(["config", "x.yaml"]) == 2
    assert capsys.readouterr().err == "error: d.bin: bad\n"


def test_missing_or_empty_checkpoint_paths_stay_one_line(tmp_path, capsys):
    """Checkpoint paths the user types (eval, generate, consolidate, init_from) raise CheckpointError."""
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint path {tmp_path / 'nothing'} does not exist")
    assert main(["consolidate", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} holds no complete checkpoint") and err.count("\n") == 1
