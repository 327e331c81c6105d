"""Tensor parallel: sharded layers against an unsharded copy (2 processes); per-step loss parity of
tp2 x dp2 (ZeRO-2) and tp2 x pp2 with the pinned one-rank losses through the real launcher; and a
resume across layouts: the tp2 x pp2 ZeRO-1 checkpoint of step 3 continued on dp2 ZeRO-3.

Tolerance: fp32; a sharded matmul or an all-reduce adds the same products in another order (~1e-7
relative per op), and the vocabulary-parallel cross-entropy takes its max and log-sum-exp in two parts.
Over 6 steps the losses stay within 1e-5 of the one-rank run, the tolerance of the ZeRO parity tests
(seen: equal to the 4 printed decimals, gradient norms too). The resumed run restores fp32 weights and
Adam moments exactly, so it keeps that tolerance.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BIN,
    ROOT,
    assert_losses_match,
    assert_norms_match,
    env,
    free_port,
    golden_grad_norms,
    golden_losses,
    grad_norms,
    losses,
    train,
)

from llmtrain.parallel.consolidate import load_model_weights
from llmtrain.train.metrics import last_by_step, read_metrics

STEPS = 6
TOL = 1e-5


def test_sharded_layers_match_unsharded_two_processes():
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(ROOT / "tests" / "parallel" / "tp_layers_worker.py"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # the GPT-2 and the Llama (GQA + SwiGLU gate) flavours; BERT pre-training (MLM decoder and its output
    # bias vocabulary-parallel) with a tied and an untied decoder, and the BERT sequence classifier
    for flavour in ("gelu", "swiglu", "bert tied", "bert untied", "bert classifier"):
        assert f"{flavour}: tensor-parallel layers match the unsharded model on 2 ranks" in proc.stdout


@pytest.mark.slow
def test_tp2_dp2_zero2_matches_one_rank(tmp_path):
    """Covers tp2 alone too: each tensor-parallel pair computes what tp2 x dp1 would on its half batch."""
    out = tmp_path / "run"
    proc = train(
        out,
        f"train.max_steps={STEPS}",
        "parallel.tp=2",
        "parallel.zero_stage=2",
        "train.sample_tokens=4",
        launcher="torchrun",
        nproc=4,
    )
    assert "(dp 2 x tp 2 x pp 1)" in proc.stdout and "sample:" in proc.stdout
    assert_losses_match(losses(out), golden_losses(), TOL)
    assert_norms_match(grad_norms(out), golden_grad_norms())  # DeepSpeed's ZeRO-2 norm over the tp shards


@pytest.fixture(scope="module")
def tp2_pp2(tmp_path_factory):
    """tp2 x pp2 (ZeRO-1, dp 1) for 6 steps, checkpointing at step 3 and at the end."""
    out = tmp_path_factory.mktemp("tp2pp2") / "run"
    proc = train(
        out,
        f"train.max_steps={STEPS}",
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.zero_stage=1",
        "checkpoint.interval=3",
        "checkpoint.keep_last=2",
        launcher="torchrun",
        nproc=4,
    )
    assert "(dp 1 x tp 2 x pp 2)" in proc.stdout
    return out


@pytest.mark.slow
def test_tp2_pp2_matches_one_rank(tp2_pp2):
    assert_losses_match(losses(tp2_pp2), golden_losses(), TOL)
    assert_norms_match(grad_norms(tp2_pp2), golden_grad_norms())


@pytest.mark.slow
def test_resume_tp2_pp2_checkpoint_on_dp2_zero3(tp2_pp2, tmp_path):
    """Another world size, tp, pp and ZeRO stage: steps 4-6 continue the uninterrupted losses, so weights,
    Adam moments, LR schedule and data position all came across."""
    out = tmp_path / "resumed"
    proc = train(
        out,
        f"train.max_steps={STEPS}",
        "parallel.zero_stage=3",
        f"train.resume={tp2_pp2 / 'checkpoints' / 'step_00000003'}",
        launcher="torchrun",
        nproc=2,
    )
    assert "resuming across layouts" in proc.stdout and "resumed from" in proc.stdout
    got = losses(out)
    assert sorted(got) == [4, 5, 6]
    assert_losses_match(got, {s: v for s, v in golden_losses().items() if s > 3}, TOL)
    tokens = last_by_step(read_metrics(out / "metrics.jsonl"), "tokens_seen")
    assert tokens[4] == 4 * 8 * 64  # the data position: 8 sequences of 64 tokens per step

    # The final weights of both runs, consolidated from two different layouts, agree.
    _, a = load_model_weights(tp2_pp2)
    _, b = load_model_weights(out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_attention_dropout_differs_between_tp_ranks_and_repeats_in_recompute():
    """Sharded heads need their own dropout masks per TP rank (else local head i is masked alike on every
    rank), the global RNG must advance alike on every rank, and activation checkpointing must replay the
    masks exactly in backward (the gradients equal those without recompute)."""
    import copy

    from llmtrain.models import ModelConfig, build_model
    from llmtrain.parallel.checkpointing import apply_activation_checkpointing
    from llmtrain.parallel.tensor_parallel import rank_local_dropout

    cfg = ModelConfig(arch="gpt", n_layer=2, n_head=2, n_embd=16, vocab_size=32, block_size=8, dropout=0.3)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    attn = model.blocks[0].attn.train()
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    outs, states = [], []
    for tp_rank in (0, 1):
        torch.manual_seed(1)
        outs.append(rank_local_dropout(attn.attend, attn, tp_rank)(q, k, v))
        states.append(torch.get_rng_state())
    assert not torch.allclose(outs[0], outs[1])
    assert torch.equal(states[0], states[1])
    torch.manual_seed(1)
    assert torch.equal(rank_local_dropout(attn.attend, attn, 0)(q, k, v), outs[0])
    attn.eval()
    assert torch.equal(rank_local_dropout(attn.attend, attn, 1)(q, k, v), attn.attend(q, k, v))

    def grads(recompute: str) -> list[torch.Tensor]:
        m = copy.deepcopy(model).train()
        for block in m.blocks:
            block.attn.attend = rank_local_dropout(block.attn.attend, block.attn, 1)
        apply_activation_checkpointing(m, recompute)
        torch.manual_seed(2)
        ids = torch.randint(0, 32, (2, 8))
        F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
        return [p.grad for p in m.parameters()]

    for mode in ("selective", "full"):
        for a, b in zip(grads("none"), grads(mode)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
