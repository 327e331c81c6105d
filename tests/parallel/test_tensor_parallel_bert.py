"""BERT tensor parallel through the real launcher (tiny bert_debug, fp32): MLM + NSP pre-training at tp2
has the one-rank per-step losses; its step-3 checkpoint resumes on one rank and its final weights
consolidate (and export to Hugging Face) as the one-rank run's; the sequence classifier fine-tunes at tp2
with the one-rank losses; and tp2 x pp2 (4 processes) matches too.

Tolerance: fp32; the sharded matmuls and all-reduces add the same products in another order (~1e-7
relative per op) and the vocabulary-parallel cross-entropy of the masked positions takes its max and
log-sum-exp in two parts. Over 6 steps the losses and their parts stay within 1e-5 of the one-rank
run, the tolerance of the GPT tensor-parallel and ZeRO parity tests (measured: 2e-6 at most, the eval
metrics equal). The gradient norms (before clipping) agree to `assert_norms_match`'s 2e-6 relative: a
shard counted once per rank, or a replicated parameter (pooler, NSP head, ...) counted on every rank,
would move them far more.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_losses_match, assert_norms_match, grad_norms, losses, train
from safetensors.torch import load_file

from llmtrain.parallel.consolidate import load_model_weights
from llmtrain.train.metrics import last_by_step, read_metrics

STEPS = 6
TOL = 1e-5
PRETRAIN = "recipes/bert_debug.yaml"
FINETUNE = "recipes/bert_finetune_debug.yaml"
RUN = (f"train.max_steps={STEPS}", "checkpoint.interval=3", "checkpoint.keep_last=2")
PRETRAIN_METRICS = ("loss", "mlm_loss", "nsp_loss", "nsp_accuracy", "eval_loss", "eval_mlm_loss", "eval_nsp_loss")


def _metrics(out, keys) -> dict[str, dict[int, float]]:
    records = read_metrics(out / "metrics.jsonl")
    return {key: last_by_step(records, key) for key in keys}


def _assert_metrics_match(got_dir, ref_dir, keys) -> None:
    ref, got = _metrics(ref_dir, keys), _metrics(got_dir, keys)
    for key in keys:
        assert ref[key], key  # logged at all
        assert_losses_match(got[key], ref[key], TOL)
    assert_norms_match(grad_norms(got_dir), grad_norms(ref_dir))


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
    """One rank and tp2 (2 processes) for 6 steps, checkpointing at step 3 and at the end."""
    root = tmp_path_factory.mktemp("bert_tp")
    train(root / "one", *RUN, recipe=PRETRAIN)
    proc = train(root / "tp2", *RUN, "parallel.tp=2", recipe=PRETRAIN, launcher="torchrun", nproc=2)
    assert "(dp 1 x tp 2 x pp 1)" in proc.stdout
    return root


def test_bert_tp2_pretraining_matches_one_rank(pretrain):
    """MLM decoder and its output bias vocabulary-parallel, NSP head replicated: loss, both parts, NSP
    accuracy and the final eval (eval_mlm_loss only at step 6) equal the one-rank run."""
    _assert_metrics_match(pretrain / "tp2", pretrain / "one", PRETRAIN_METRICS)
    assert sorted(losses(pretrain / "tp2")) == list(range(1, STEPS + 1))


def test_bert_tp2_checkpoint_resumes_on_one_rank_and_consolidates(pretrain, tmp_path):
    """The tp2 step-3 checkpoint continues on one rank (another layout: weights, Adam moments, LR schedule
    and data position come from the layout-independent files, the vocabulary shards of wte and of the MLM
    bias gathered), and both runs' final weights consolidate to the one-rank run's."""
    out = tmp_path / "resumed"
    proc = train(out, *RUN, f"train.resume={pretrain / 'tp2' / 'checkpoints' / 'step_00000003'}", recipe=PRETRAIN)
    assert "resuming across layouts" in proc.stdout and "resumed from" in proc.stdout
    got = losses(out)
    assert sorted(got) == [4, 5, 6]
    assert_losses_match(got, {s: v for s, v in losses(pretrain / "one").items() if s > 3}, TOL)
    assert_norms_match(grad_norms(out), {s: v for s, v in grad_norms(pretrain / "one").items() if s > 3})

    _, ref = load_model_weights(pretrain / "one")
    for run in (pretrain / "tp2", out):
        _, weights = load_model_weights(run)
        assert sorted(weights) == sorted(ref)
        assert weights["lm_head.weight"] is weights["wte.weight"]  # tied, whole vocabulary
        # the output bias trained (it starts at zero): equal to the one-rank bias, its halves are in place
        assert weights["lm_head.bias"].abs().max() > 1e-3
        for name in ref:
            torch.testing.assert_close(
                weights[name], ref[name], atol=TOL, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
            )

    # Hugging Face export reads the same consolidated weights: the tp2 run exports as the one-rank run
    from llmtrain.interop.cli import export_hf

    a = load_file(str(export_hf(pretrain / "one", tmp_path / "hf_one") / "model.safetensors"))
    b = load_file(str(export_hf(pretrain / "tp2", tmp_path / "hf_tp2") / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=TOL, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_bert_classifier_tp2_matches_one_rank(pretrain, tmp_path):
    """The sequence classifier (no vocabulary head: its logits are plain (B, K) tensors) fine-tuned from the
    tp2 pre-training checkpoint, at one rank and at tp2. Dropout off: the attention dropout of a rank's
    local heads draws other masks than the one-rank run's over all heads."""
    overrides = (f"train.max_steps={STEPS}", f"model.init_from={pretrain / 'tp2'}", "model.dropout=0.0")
    train(tmp_path / "one", *overrides, recipe=FINETUNE)
    proc = train(tmp_path / "tp2", *overrides, "parallel.tp=2", recipe=FINETUNE, launcher="torchrun", nproc=2)
    assert "(dp 1 x tp 2 x pp 1)" in proc.stdout and "model weights initialised from" in proc.stdout
    _assert_metrics_match(tmp_path / "tp2", tmp_path / "one", ("loss", "accuracy", "eval_loss", "eval_accuracy"))


@pytest.mark.slow
def test_bert_tp2_pp2_matches_one_rank(pretrain, tmp_path):
    """4 processes: two pipeline stages of two tensor-parallel ranks each. The word embedding's vocabulary
    shard is tied across the first and last stage, the sharded MLM bias lives on the last."""
    out = tmp_path / "tp2pp2"
    proc = train(
        out,
        *RUN,
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.zero_stage=1",
        "parallel.pipeline_partition=layers",
        recipe=PRETRAIN,
        launcher="torchrun",
        nproc=4,
    )
    assert "(dp 1 x tp 2 x pp 2)" in proc.stdout
    _assert_metrics_match(out, pretrain / "one", PRETRAIN_METRICS)
