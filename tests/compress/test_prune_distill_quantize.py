"""The README's prune -> distil -> quantise walk-through (Quantisation section) on tiny shapes: each step reads
what the one before wrote, with the README's recipes and commands (only sizes and step counts shrunk)."""

from __future__ import annotations

import subprocess
import sys

import torch
from helpers import ROOT, TINY, env, losses

from llmtrain.models import build_model

RECIPES = ROOT / "recipes"


def test_prune_then_distil_then_quantise(tmp_path, capsys):
    from llmtrain.cli import main
    from llmtrain.compress.cli import write_model
    from llmtrain.config import load_config
    from llmtrain.parallel.consolidate import load_model_weights

    # the teacher: a seeded tiny gpt_debug (the README trains one; its weights do not matter here)
    cfg = load_config(RECIPES / "gpt_debug.yaml", TINY)
    torch.manual_seed(0)
    teacher = build_model(cfg.model)
    teacher.init_weights()
    write_model(tmp_path / "teacher", cfg, teacher, {})

    small = ["prune.n_head=1", "prune.n_embd=32", "prune.intermediate_size=64"]
    few = ["prune.calib_batches=2", "prune.eval_batches=2", "prune.micro_batch_size=2"]
    pruned = tmp_path / "pruned"
    prune = ["prune", str(tmp_path / "teacher"), "--recipe", str(RECIPES / "prune_gpt_debug.yaml"), "--out"]
    assert main([*prune, str(pruned), *small, *few]) == 0

    # the README's distil command with the pruned shape restated (n_layer, n_head, intermediate_size) and
    # the tiny run's sizes
    student = tmp_path / "distill_pruned"
    distil = [sys.executable, str(ROOT / "launchers" / "distill.py"), str(RECIPES / "distill_gpt_debug.yaml")]
    distil += [*TINY, "model.n_layer=2", "model.n_head=1", "model.n_embd=32", "model.intermediate_size=64"]
    distil += [f"model.init_from={pruned}", f"distill.teacher={tmp_path / 'teacher'}", f"out_dir={student}"]
    distil += ["train.max_steps=2", "train.eval_batches=1", "checkpoint.interval=0"]
    proc = subprocess.run(distil, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"model weights initialised from {pruned}" in proc.stdout and sorted(losses(student)) == [1, 2]

    capsys.readouterr()
    quantized = tmp_path / "distill_pruned_int4"
    quantize = ["quantize", str(student), "--recipe", str(RECIPES / "quantize_gpt_debug.yaml"), "--out"]
    assert main([*quantize, str(quantized), "--group-size", "32", "--calib-batches", "2", "--eval-batches", "1"]) == 0
    assert "int4 gptq, group size 32" in capsys.readouterr().out
    qcfg, weights = load_model_weights(quantized)
    assert (qcfg.n_layer, qcfg.n_head, qcfg.n_embd, qcfg.intermediate_size) == (2, 1, 32, 64)
    assert qcfg.converters == ["quantized_weights"] and weights["blocks.0.mlp.down.weight_q"].dtype == torch.uint8
