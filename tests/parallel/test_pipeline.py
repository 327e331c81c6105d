"""Pipeline parallel through the real launchers: per-step losses equal the one-rank run's.

Same tiny model, seed and tokens per step as the pinned one-rank losses (tests/golden, checked against
a live one-rank run by tests/test_train.py). The one-rank run sums two micro-batch
gradients of 4 sequences; pp2 runs the same 8 sequences through DeepSpeed's 1F1B schedule; pp2 x dp2 takes
2 x 2 micro-batches of 2 on each replica and all-reduces. fp32 throughout: only the order of the
gradient sums differs (local accumulation vs all-reduce, ~1e-7 relative per step), so 6 steps agree to
well within 1e-5, the tolerance of the ZeRO parity tests.
"""

from __future__ import annotations

import pytest
from helpers import assert_losses_match, assert_norms_match, golden_grad_norms, golden_losses, grad_norms, losses, train

STEPS = 6


@pytest.mark.slow
def test_pp2_matches_one_rank(tmp_path):
    out = tmp_path / "run"
    proc = train(
        out,
        f"train.max_steps={STEPS}",
        "parallel.pp=2",
        "parallel.activation_checkpointing=selective",
        "parallel.pipeline_partition=layers",
        "train.sample_tokens=4",
        launcher="torchrun",
        nproc=2,
    )
    assert "(dp 1 x tp 1 x pp 2)" in proc.stdout and "layout: stage 0: rank 0; stage 1: rank 1" in proc.stdout
    # one block per stage (layers: embed, positions, block 0 | block 1, final norm, head)
    assert (
        "partition by layers of 6 layers" in proc.stdout and "stage 0: layers 0-2; stage 1: layers 3-5" in proc.stdout
    )
    assert "sample:" in proc.stdout  # generation in lockstep: logits passed stage to stage, then broadcast
    assert_losses_match(losses(out), golden_losses(), 1e-5)
    assert_norms_match(grad_norms(out), golden_grad_norms())  # every stage's gradients, the tied wte once


@pytest.mark.slow
def test_pp2_dp2_zero1_matches_one_rank(tmp_path):
    out = tmp_path / "run"
    proc = train(
        out,
        f"train.max_steps={STEPS}",
        "parallel.pp=2",
        "parallel.zero_stage=1",
        "train.micro_batch_size=2",
        "parallel.activation_checkpointing=full",
        launcher="torchrun",
        nproc=4,
    )
    assert "(dp 2 x tp 1 x pp 2)" in proc.stdout and "partition by parameters" in proc.stdout
    assert_losses_match(losses(out), golden_losses(), 1e-5)
    assert_norms_match(grad_norms(out), golden_grad_norms())


@pytest.mark.slow
def test_llama_pp2_matches_one_rank(tmp_path):
    """The Llama flavour (rotary positions inside the blocks, RMSNorm, SwiGLU, grouped-query attention) with
    an untied output head, as llama_1b, split by parameters. No golden file: the one-rank run of the same
    config is the reference; same tolerance and reasoning as above (measured: equal losses)."""
    llama = (
        f"train.max_steps={STEPS}",
        "model.n_head=4",
        "model.n_kv_head=2",
        "model.intermediate_size=128",
        "model.tie_embeddings=false",
    )
    train(tmp_path / "one", *llama, recipe="recipes/llama_debug.yaml")
    proc = train(
        tmp_path / "pp2", *llama, "parallel.pp=2", recipe="recipes/llama_debug.yaml", launcher="torchrun", nproc=2
    )
    assert "llama_debug" in proc.stdout and "(dp 1 x tp 1 x pp 2)" in proc.stdout
    assert "partition by parameters of 6 layers (embed, positions, 2 blocks, final norm, head)" in proc.stdout
    ref = losses(tmp_path / "one")
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert_losses_match(losses(tmp_path / "pp2"), ref, 1e-5)
