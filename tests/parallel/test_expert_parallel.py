"""Expert parallel (parallel.ep, llmtrain/parallel/expert_parallel.py) in real runs: a tiny MoE decoder (4 experts,
top 2, capacity 1.0 so some assignments drop, z-loss on) on one rank is this module's own reference; ep2 over
torchrun (gloo all-to-all, ZeRO-2, each rank holding 2 of the 4 experts) follows its losses and gradient norms,
logs the router metrics, and its step-2 checkpoint resumes on one rank (ep1) on the reference curve; ep2 on 4
ranks (two ep groups, dp 4, expert gradients reduced over expert-data-parallel pairs, ZeRO-1, full activation
checkpointing) follows it too; the one-rank run's step-2 checkpoint resumes on ep2 (ZeRO-0) on its curve.

Tolerances: the ZeRO parity tests' 1e-5 on losses and 2e-6 relative on gradient norms (ep computes the same
products on other ranks and sums them in the same order; seen equal to the printed digits)."""

from __future__ import annotations

import pytest
from helpers import assert_losses_match, assert_norms_match, grad_norms, losses, train

from llmtrain.train.metrics import last_by_step, read_metrics

STEPS = 4
TOL = 1e-5
MOE = [
    f"train.max_steps={STEPS}",
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.capacity_factor=1.0",
    "model.moe.z_loss_coef=0.001",
    "train.micro_batch_size=2",  # the same micro-batches on 1, 2 and 4 ranks (router statistics are per micro-batch)
]
RECIPE = "recipes/moe_debug.yaml"


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe1") / "run"
    proc = train(out, *MOE, "checkpoint.interval=2", recipe=RECIPE)
    assert "MoE 4 experts, top 2, ep 1" in proc.stdout
    return out


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2") / "run"
    proc = train(
        out, *MOE, "parallel.ep=2", "parallel.zero_stage=2", "checkpoint.interval=2",
        recipe=RECIPE, launcher="torchrun", nproc=2,
    )  # fmt: skip
    assert "MoE 4 experts, top 2, ep 2" in proc.stdout and "ep groups of 2 adjacent ranks" in proc.stdout
    assert "expert parallel: 2 MoE blocks" in proc.stdout
    # rank 0 holds experts 0-1 only: 2 blocks x (gate, up, down) x 2 experts x 512 x 64, half of the 4 experts
    assert "this rank holds experts [0, 1] of 4: 393,216 of 786,432 expert parameters" in proc.stdout
    return out


@pytest.mark.slow
def test_ep2_matches_one_rank(one_rank, ep2):
    assert_losses_match(losses(ep2), losses(one_rank), TOL)
    assert_norms_match(grad_norms(ep2), grad_norms(one_rank))


@pytest.mark.slow
def test_router_metrics_are_logged(one_rank, ep2):
    for out in (one_rank, ep2):
        records = read_metrics(out / "metrics.jsonl")
        for key in ("lm_loss", "moe_balance_loss", "moe_z_loss", "moe_dropped"):
            values = last_by_step(records, key)
            assert sorted(values) == list(range(1, STEPS + 1)), key
        assert all(0 < v < 0.5 for v in last_by_step(records, "moe_dropped").values())
        assert all(v >= 1.0 for v in last_by_step(records, "moe_balance_loss").values())
    ref, got = (
        last_by_step(read_metrics(one_rank / "metrics.jsonl"), "moe_dropped"),
        last_by_step(read_metrics(ep2 / "metrics.jsonl"), "moe_dropped"),
    )
    assert got == pytest.approx(ref, abs=1e-6)  # the same routing decisions, made on the rank that owns the tokens


@pytest.mark.slow
def test_ep2_checkpoint_resumes_on_one_rank(one_rank, ep2, tmp_path):
    out = tmp_path / "run"
    proc = train(out, *MOE, f"train.resume={ep2 / 'checkpoints' / 'step_00000002'}", recipe=RECIPE)
    assert "resuming across layouts" in proc.stdout
    got = losses(out)
    assert sorted(got) == [3, 4]
    assert_losses_match(got, {s: v for s, v in losses(one_rank).items() if s > 2}, TOL)


@pytest.mark.slow
def test_ep2_over_dp4_zero1_matches_one_rank(one_rank, tmp_path):
    out = tmp_path / "run"
    proc = train(
        out, *MOE, "parallel.ep=2", "parallel.zero_stage=1", "parallel.activation_checkpointing=full",
        recipe=RECIPE, launcher="torchrun", nproc=4,
    )  # fmt: skip
    assert "world 4 (dp 4 x tp 1 x pp 1 | MoE 4 experts, top 2, ep 2)" in proc.stdout
    assert_losses_match(losses(out), losses(one_rank), TOL)
    assert_norms_match(grad_norms(out), grad_norms(one_rank))


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_ep2_zero0(one_rank, tmp_path):
    # ep1 -> ep2: the whole expert stacks of the one-rank checkpoint sliced per rank; ZeRO-0 fp32 (the recipe's
    # stage) reduces expert gradients over the expert-data-parallel group and clips with the global norm
    out = tmp_path / "run"
    proc = train(
        out, *MOE, "parallel.ep=2", "parallel.zero_stage=0", f"train.resume={one_rank / 'checkpoints' / 'step_00000002'}",
        recipe=RECIPE, launcher="torchrun", nproc=2,
    )  # fmt: skip
    assert "resuming across layouts" in proc.stdout
    got = losses(out)
    assert sorted(got) == [3, 4]
    assert_losses_match(got, {s: v for s, v in losses(one_rank).items() if s > 2}, TOL)
    assert_norms_match(grad_norms(out), {s: v for s, v in grad_norms(one_rank).items() if s > 2})
