"""Context parallel (parallel.cp): ring attention against full attention on one process (the ring simulated
with one thread per rank), the whole decoder on simulated ranks against its one-rank loss and gradients, the
layout checks, then real runs through torchrun: cp2 and tp2 x cp2 against the pinned one-rank golden
losses, a cp2 checkpoint resumed on one rank and that run's checkpoint resumed at cp2 with Ulysses, and
cp2 x dp2 (ZeRO-3, activation checkpointing, RoPE, packed documents crossing the chunk borders) against the
one-rank run of the same config.

Tolerances: the simulated ring in float64 equals full attention to rounding (1e-12); in float32 the ring adds
the same products in another order (scores per chunk pair, softmax sums merged by log-sum-exp), ~1e-7
relative per op, so the model-level losses and gradients agree to 1e-5 and the runs keep the ZeRO parity
tests' 1e-5 on losses and 2e-6 relative on gradient norms (seen: equal to the printed digits).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ROOT,
    TINY,
    assert_losses_match,
    assert_norms_match,
    golden_grad_norms,
    golden_losses,
    grad_norms,
    losses,
    train,
)

from llmtrain.config import ConfigError, derive, load_config
from llmtrain.models import ModelConfig, build_model
from llmtrain.models.gpt.model import document_causal_mask
from llmtrain.models.gpt.objective import CausalLM
from llmtrain.parallel.context_parallel import (
    ContextParallel,
    ContextParallelObjective,
    RingPlan,
    apply_context_parallel,
    local_index,
    ring_attention,
    ulysses_attention,
)
from llmtrain.parallel.layout import Coords, ParallelDims

STEPS = 6
TOL = 1e-5


class ThreadRing:
    """The ring's shift between threads of one process: each puts its tensor in the next rank's slot."""

    def __init__(self, n: int):
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n)

    def shift_for(self, r: int):
        def shift(t: torch.Tensor, channel: int):  # exchanged at once; the caller's wait just returns it
            self.slots[(r + 1) % self.n] = t.clone()
            self.barrier.wait()
            got = self.slots[r]
            self.barrier.wait()
            return lambda: got

        return shift

    def exchange_for(self, r: int):
        """The all-to-all: piece j goes to rank j; returns the piece each rank sent to r."""

        def exchange(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
            self.slots[r] = [p.clone() for p in pieces]
            self.barrier.wait()
            got = [self.slots[src][r] for src in range(self.n)]
            self.barrier.wait()
            return got

        return exchange


def run_ranks(cp: int, work) -> list:
    """work(rank, shift) on cp threads at once; their results in rank order (a failure is re-raised)."""
    ring, results, errors = ThreadRing(cp), [None] * cp, []

    def run(r):
        try:
            results[r] = work(r, ring)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            ring.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(cp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def test_local_chunks_balance_the_causal_work():
    # 8 chunks of 4 over cp=4: rank r holds chunks r and 7 - r
    assert local_index(32, 1, 4).tolist() == [4, 5, 6, 7, 24, 25, 26, 27]
    every = torch.cat([local_index(32, r, 4) for r in range(4)])
    assert sorted(every.tolist()) == list(range(32))
    # each rank's queries see the same number of keys (the causal triangle's work, split evenly)
    work = [sum(int(i) + 1 for i in local_index(32, r, 4)) for r in range(4)]
    assert len(set(work)) == 1


@pytest.mark.parametrize("method", ["ring", "ulysses"])
@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_on_simulated_ranks_equals_full_attention(method, cp, packed):
    """Forward and backward in float64, grouped-query heads (Ulysses at cp4: the 2 kv heads repeated to
    split over 4 ranks); packed documents crossing chunk borders."""
    B, nh, nkv, T, hs = 2, 4, 2, 32, 8
    g = torch.Generator().manual_seed(cp)
    q = torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, nkv, T, hs, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, nkv, T, hs, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64)
    docs = torch.tensor([[0] * 5 + [1] * 20 + [2] * 7, [0] * 13 + [1] * 19]) if packed else None
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    if docs is None:
        want = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    else:
        want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=document_causal_mask(docs))
    want.backward(dout)

    attend = build_model(ModelConfig(arch="gpt", n_layer=1, n_head=4, n_embd=32, vocab_size=8)).blocks[0].attn.attend

    def work(r, ring):
        idx = local_index(T, r, cp)
        ql, kl, vl = (x.detach()[:, :, idx].clone().requires_grad_() for x in (q, k, v))
        if method == "ring":
            out = ring_attention(ql, kl, vl, RingPlan(r, cp, ring.shift_for(r), docs))
        else:
            out = ulysses_attention(ql, kl, vl, r, cp, ring.exchange_for(r), attend, docs)
        out.backward(dout[:, :, idx])
        return idx, out.detach(), ql.grad, kl.grad, vl.grad

    got = [torch.zeros_like(x) for x in (want, q, k, v)]
    for idx, *parts in run_ranks(cp, work):
        for whole, part in zip(got, parts):
            whole[:, :, idx] = part
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, (want, q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def _tiny(pos: str) -> torch.nn.Module:
    extra = dict(norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False) if pos == "rope" else {}
    cfg = ModelConfig(
        arch="gpt", n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=64, dropout=0.0, pos=pos, **extra
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    return model


@pytest.mark.parametrize("pos, method", [("learned", "ring"), ("rope", "ring"), ("rope", "ulysses")])
def test_decoder_on_simulated_ranks_equals_one_rank(pos, method):
    """The whole model with packed documents (position_ids restart, doc_ids cross chunk borders) and labels
    partly ignored: the mean of the cp ranks' losses is the one-rank loss, the mean of their gradients (what
    DeepSpeed's average over the cp ranks makes) the one-rank gradient."""
    cp, T = 2, 32
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, T), generator=g)
    labels = torch.randint(0, 64, (2, T), generator=g)
    labels[0, :7] = -100  # a prompt: fewer scored tokens on rank 0's front chunk
    doc_ids = torch.tensor([[0] * 11 + [1] * 14 + [2] * 7, [0] * 3 + [1] * 29])
    position_ids = torch.cat([torch.arange(n) for n in (11, 14, 7)] + [torch.arange(n) for n in (3, 29)]).view(2, T)
    batch = {"input_ids": ids, "labels": labels, "doc_ids": doc_ids, "position_ids": position_ids}
    model = _tiny(pos)
    loss = CausalLM()(model, batch)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}

    models = [_tiny(pos) for _ in range(cp)]  # built here: seeding torch's global RNG is not per thread

    def work(r, ring):
        local = models[r]
        cp_state = ContextParallel(r, cp, ring.shift_for(r), method, ring.exchange_for(r))
        apply_context_parallel(local, cp_state)
        rank_loss = ContextParallelObjective(CausalLM(), cp_state)(local, batch)
        rank_loss.backward()
        return rank_loss.detach(), {n: p.grad for n, p in local.named_parameters()}

    results = run_ranks(cp, work)
    torch.testing.assert_close(sum(r[0] for r in results) / cp, loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in want.items():
        mean = sum(r[1][name] for r in results) / cp
        torch.testing.assert_close(mean, grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_layout_puts_cp_between_dp_and_tp():
    dims = ParallelDims.for_world(8, tp=2, cp=2)
    assert (dims.dp, dims.cp, dims.tp) == (2, 2, 2) and dims.shape == (1, 2, 2, 2)
    for rank in range(8):  # rank = ((pipe * dp + data) * cp + context) * tp + model
        c = dims.coords(rank)
        assert rank == ((c.pp * dims.dp + c.dp) * dims.cp + c.cp) * dims.tp + c.tp == dims.rank_of(c)
    assert dims.coords(5) == Coords(dp=1, pp=0, tp=1, cp=0)
    assert dims.as_dict() == {"tp": 2, "pp": 1, "dp": 2, "cp": 2}
    # DeepSpeed's data-parallel groups (gradient average, ZeRO partitions): every dp x cp rank of one tp index
    from llmtrain.parallel.engine import process_topology

    assert process_topology(dims).get_axis_comm_lists("data") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert process_topology(dims).get_axis_comm_lists("model") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ParallelDims.for_world(4).as_dict() == {"tp": 1, "pp": 1, "dp": 4}  # older checkpoints compare equal


BASE = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.seq_len=64"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.cp=3"], r"train.seq_len=64 is not divisible by 2\*parallel.cp = 6"),
        (["parallel.cp=2", "parallel.pp=2"], "parallel.cp=2 needs parallel.pp=1: pipeline stages pass only"),
        (
            ["parallel.cp=4", "parallel.cp_method=ulysses", "train.seq_len=64", "model.n_head=6"],
            r"model.n_head=6 \(per tensor-parallel rank: 6\) is not divisible by parallel.cp=4",
        ),
        (["parallel.cp=2", "model.dropout=0.1"], "parallel.cp=2 needs model.dropout=0"),
        (["parallel.cp=2", "train.objective=dpo"], "parallel.cp=2 needs train.objective=family"),
        (["parallel.cp=2", "model.name=bert_debug", "data.sample_kind=bert"], "the ring attention is causal"),
    ],
)
def test_unsupported_cp_layouts_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + overrides)


def test_cp_support_is_what_the_family_declares(monkeypatch):
    """No type check: a family without `context_parallel` is refused by config, and the runner refuses an
    objective without per-token logits to split."""
    import dataclasses
    from types import SimpleNamespace

    from llmtrain.errors import UserError
    from llmtrain.models import registry
    from llmtrain.parallel.context_parallel import ContextParallel, ContextParallelObjective

    monkeypatch.setitem(registry.FAMILIES, "gpt", dataclasses.replace(registry.FAMILIES["gpt"], context_parallel=False))
    with pytest.raises(ConfigError, match="parallel.cp=2 needs a family that declares context_parallel"):
        load_config(None, [*BASE, "parallel.cp=2"])
    monkeypatch.undo()
    assert load_config(None, [*BASE, "parallel.cp=2"]).parallel.cp == 2
    cp = ContextParallel(0, 2, lambda *a: None)
    with pytest.raises(UserError, match="SimpleNamespace has none; set parallel.cp=1"):
        ContextParallelObjective(SimpleNamespace(), cp)


def test_world_must_hold_whole_cp_rings():
    cfg = load_config(None, [*BASE, "parallel.cp=2"])
    assert derive(cfg, 4).dims == ParallelDims(dp=2, cp=2) and derive(cfg, 4).dp_size == 2
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by parallel.tp\*parallel.pp\*parallel.cp"):
        derive(cfg, 3)


def test_plan_counts_activations_per_cp_rank():
    """gpt_1b (micro 8, seq 2048, 24 layers of width 2048): with cp2 each GPU holds 1024 tokens of each
    sequence, and the ring stores no attention matrix (even with --no-flash)."""
    from llmtrain.plan import GiB, format_plan, make_plan

    recipe = ROOT / "recipes" / "gpt_1b.yaml"
    one = make_plan(load_config(recipe), "gpt_1b", 1, 8, 80, flash=False)
    two = make_plan(load_config(recipe, ["parallel.cp=2"]), "gpt_1b", 1, 8, 80, flash=False)
    s, b, h = 2048 // 2, 8, 2048
    assert two.activations_gib["none"] == pytest.approx(24 * s * b * h * 34 / GiB)
    assert two.activations_gib["full"] == pytest.approx(one.activations_gib["full"] / 2)
    assert two.activations_gib["logits"] == pytest.approx(one.activations_gib["logits"] / 2)
    assert (two.dp, two.cp) == (4, 2)
    assert two.model_states_gib == pytest.approx(one.model_states_gib)  # ZeRO-1 partitions over dp x cp = 8
    assert "(dp 4 x tp 1 x pp 1 x cp 2)" in format_plan(two)


def test_bad_cp_layout_exits_2_before_anything_runs(tmp_path, capsys):
    from llmtrain.cli import main

    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / "gpt_debug.yaml"), *TINY, f"out_dir={out}", "parallel.cp=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.seq_len=64 is not divisible by 2*parallel.cp = 6")
    assert not out.exists()


# ---- real runs (torchrun over gloo) ----


@pytest.fixture(scope="module")
def cp2(tmp_path_factory):
    """cp2 (ZeRO-2, selective activation checkpointing: the ring recomputed in backward) for the golden 6
    steps, checkpointing at step 3; ends with a text sample (whole sequences on every rank)."""
    out = tmp_path_factory.mktemp("cp2") / "run"
    proc = train(
        out,
        f"train.max_steps={STEPS}",
        "parallel.cp=2",
        "parallel.zero_stage=2",
        "parallel.activation_checkpointing=selective",
        "checkpoint.interval=3",
        "train.sample_tokens=4",
        launcher="torchrun",
        nproc=2,
    )
    assert "(dp 1 x tp 1 x pp 1 x cp 2 (ring, 32 tokens per rank))" in proc.stdout
    assert "cp rings of 2" in proc.stdout and "sample:" in proc.stdout
    return out


@pytest.mark.slow
def test_cp2_matches_one_rank_golden(cp2):
    assert_losses_match(losses(cp2), golden_losses(), TOL)
    assert_norms_match(grad_norms(cp2), golden_grad_norms())


@pytest.fixture(scope="module")
def resumed(cp2, tmp_path_factory):
    """cp2's step-3 checkpoint continued on one rank to step 6, checkpointing every step."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    proc = train(
        out,
        f"train.max_steps={STEPS}",
        f"train.resume={cp2 / 'checkpoints' / 'step_00000003'}",
        "checkpoint.interval=1",
        "checkpoint.keep_last=3",
    )
    assert "resuming across layouts" in proc.stdout and "parallel.cp 2 -> 1" in proc.stdout
    return out


@pytest.mark.slow
def test_cp2_checkpoint_resumes_on_one_rank(resumed):
    got = losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert_losses_match(got, {s: v for s, v in golden_losses().items() if s > 3}, TOL)


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_cp2_ulysses(resumed, tmp_path):
    """And back: the one-rank step-4 checkpoint continued at cp2 with Ulysses (the all-to-all over heads; TINY
    has 2 heads, one per rank) and ZeRO-1 follows the golden curve."""
    out = tmp_path / "run"
    proc = train(
        out, f"train.max_steps={STEPS}", f"train.resume={resumed / 'checkpoints' / 'step_00000004'}",
        "parallel.cp=2", "parallel.cp_method=ulysses", "parallel.zero_stage=1", launcher="torchrun", nproc=2,
    )  # fmt: skip
    assert "x cp 2 (ulysses, 32 tokens per rank)" in proc.stdout and "resuming across layouts" in proc.stdout
    assert_losses_match(losses(out), {s: v for s, v in golden_losses().items() if s > 4}, TOL)


@pytest.mark.slow
def test_cp2_dp2_zero3_packed_documents_rope_match_one_rank(tmp_path):
    """Llama flavour (RoPE on the chunks' own positions, one kv head), seq 256, short documents packed across
    the chunk borders (data.doc_mask), full activation checkpointing, ZeRO-3 over dp x cp = 4 ranks."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from datahelpers import make_docs, prepare

    from llmtrain.data.tokenizer import train_tokenizer

    data = tmp_path / "docs"
    prepare(train_tokenizer(make_docs(100, seed=99), "bpe", 300), data, make_docs(300, seed=1, max_words=60))
    common = [
        "train.max_steps=3",
        "train.seq_len=256",
        f"data.path={data}",
        "data.doc_mask=true",
        "model.n_kv_head=1",
    ]
    one = train(tmp_path / "one", *common, recipe="recipes/llama_debug.yaml")
    four = train(
        tmp_path / "four",
        *common,
        "parallel.cp=2",
        "parallel.zero_stage=3",
        "parallel.activation_checkpointing=full",
        recipe="recipes/llama_debug.yaml",
        launcher="torchrun",
        nproc=4,
    )
    assert "(dp 2 x tp 1 x pp 1 x cp 2" in four.stdout and "(dp 1 x tp 1 x pp 1)" in one.stdout
    assert_losses_match(losses(tmp_path / "four"), losses(tmp_path / "one"), TOL)
    assert_norms_match(grad_norms(tmp_path / "four"), grad_norms(tmp_path / "one"))


@pytest.mark.slow
def test_tp2_cp2_matches_one_rank_golden(tmp_path):
    """Tensor parallel inside each cp rank: heads and vocabulary split over tp, the ring over the ranks of one
    tp index; DeepSpeed's grid averages gradients over dp x cp = 2 ranks (ZeRO-1), the golden's first 3 steps
    and the end-of-run sample from whole sequences."""
    out = tmp_path / "run"
    proc = train(
        out, "train.max_steps=3", "parallel.cp=2", "parallel.tp=2", "parallel.zero_stage=1", "train.sample_tokens=4",
        launcher="torchrun", nproc=4,
    )  # fmt: skip
    assert "(dp 1 x tp 2 x pp 1 x cp 2 (ring" in proc.stdout and "sample:" in proc.stdout
    assert_losses_match(losses(out), {s: v for s, v in golden_losses().items() if s <= 3}, TOL)
    assert_norms_match(grad_norms(out), {s: v for s, v in golden_grad_norms().items() if s <= 3})
