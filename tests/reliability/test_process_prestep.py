"""Checks before step 1: numbers that can only be a mistake are one line (exit 2) before anything runs."""

from __future__ import annotations

import pytest

from llmtrain.cli import main

RECIPE = "recipes/gpt_debug.yaml"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.eval_batches=0", "train.eval_batches must be >= 1; got 0"),
        ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0; got -5"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0; got -1.0 (0 disables it)"),
        ("optim.lr=nan", "optim.lr must be >= 0 and finite; got nan"),
        ("optim.beta2=1.5", "optim.beta2 must be in [0, 1); got 1.5"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1]; got 2.0"),
        ("checkpoint.interval=-1", "checkpoint.interval must be >= 0; got -1 (0 disables it)"),
    ],
)
def test_invalid_numbers_are_refused_before_anything_runs(override, message, capsys, tmp_path):
    assert main(["train", RECIPE, override, f"out_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()
