"""ZeRO-0 gradient all-reduce overlapped with backward (llmtrain/parallel/grad_overlap.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import grad_norms, losses, train
from torch import nn

from llmtrain.parallel import grad_overlap


class _Engine:
    """What GradOverlap reads of a DeepSpeed engine: the accumulation boundary and the no_sync flag."""

    def __init__(self) -> None:
        self.boundary = False
        self.inside_no_sync_ctxt = False

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.boundary


class _Done:
    def wait(self) -> None:
        pass


@pytest.fixture
def launched(monkeypatch):
    """dist.all_reduce of a 2-rank world whose other rank holds the same gradients (sum = 2x), recording
    which buffer each call got and whether it came during backward."""
    calls: list[tuple[torch.Tensor, bool]] = []

    def all_reduce(tensor, async_op=False):
        assert async_op
        calls.append((tensor, _in_backward[0]))
        tensor.mul_(2)
        return _Done()

    monkeypatch.setattr(grad_overlap.dist, "all_reduce", all_reduce)
    return calls


_in_backward = [False]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _backward(model: nn.Module, x: torch.Tensor, overlap: grad_overlap.GradOverlap) -> None:
    _in_backward[0] = True
    try:
        model(x).square().mean().backward()
    finally:
        _in_backward[0] = False
    overlap.finish()  # where DeepSpeed's engine calls allreduce_gradients


def test_buckets_reduce_during_backward_at_the_boundary_only(launched):
    model, ref = _model(), _model()
    unused = nn.Parameter(torch.ones(5))  # backward never reaches it: DeepSpeed reduces zeros for it
    params = [unused, *model.parameters()]  # reversed: its bucket is the last one
    engine = _Engine()
    overlap = grad_overlap.GradOverlap(engine, params, world=2, bucket_mb=300 * 4 / 2**20)  # ~300 floats
    # reverse parameter order, bounded size: [4.bias 4.weight 2.bias] [2.weight 0.bias] [0.weight unused]
    order = [p for b in overlap.buckets for p in b.params]
    assert order == list(reversed(params))
    assert [b.flat.numel() for b in overlap.buckets] == [67, 272, 101]

    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    _backward(model, x1, overlap)  # micro-step 1 of 2: accumulate only
    assert launched == [] and all(p.grad is None or p.grad._base is None for p in params)
    engine.boundary = True
    _backward(model, x2, overlap)
    # every bucket reduced once, in index order; all but the one holding `unused` before backward ended
    assert [t.data_ptr() for t, _ in launched] == [b.flat.data_ptr() for b in overlap.buckets]
    assert [during for _, during in launched] == [True, True, False]

    for x in (x1, x2):
        ref(x).square().mean().backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, r.grad)  # (2 g) * 1/2 on the 2-rank world above
        assert p.grad._base is not None  # a view into its bucket: no copy back
    assert torch.equal(unused.grad, torch.zeros(5))

    launched.clear()  # the next step starts clean: nothing reduced before its boundary
    for p in params:
        p.grad = None
    engine.boundary = False
    _backward(model, x1, overlap)
    assert launched == []


def test_no_sync_backward_is_not_reduced(launched):
    model = _model()
    engine = _Engine()
    engine.boundary, engine.inside_no_sync_ctxt = True, True
    overlap = grad_overlap.GradOverlap(engine, list(model.parameters()), world=2, bucket_mb=1.0)
    _backward(model, torch.randn(2, 6), overlap)
    assert launched == []


class _FakeEngine:
    """The engine methods `why_not` reads, for a ZeRO stage, fp32."""

    gradient_average = True
    communication_data_type = torch.float32

    def __init__(self, stage: int) -> None:
        self.stage = stage

    def zero_optimization_stage(self) -> int:
        return self.stage

    def fp16_enabled(self) -> bool:
        return False

    bfloat16_enabled = torch_autocast_enabled = fp16_enabled

    def postscale_gradients(self) -> bool:
        return True

    def gradient_predivide_factor(self) -> float:
        return 1.0


@pytest.mark.parametrize(
    "recipe,overrides,stage,world,why",
    [
        ("gpt_debug", (), 0, 2, None),
        ("gpt_debug", ("parallel.grad_overlap_mb=0",), 0, 2, "grad_overlap_mb=0"),
        ("gpt_debug", (), 2, 2, "ZeRO-2 reduces gradients itself"),
        ("gpt_debug", (), 0, 1, "one data-parallel replica"),
        ("gpt_debug", ("parallel.tp=2",), 0, 4, "tp, pp, cp, ep or MoE"),
        ("gpt_debug", ("parallel.pp=2",), 0, 4, "tp, pp, cp, ep or MoE"),
        ("moe_debug", (), 0, 2, "tp, pp, cp, ep or MoE"),  # expert gradients reduce over their own groups
    ],
)
def test_applies_to_zero0_fp32_plain_data_parallel_only(monkeypatch, recipe, overrides, stage, world, why):
    from helpers import ROOT

    from llmtrain.config import derive, load_config

    monkeypatch.setattr(grad_overlap.dist, "get_world_size", lambda: world)
    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml", ["train.global_batch_size=32", *overrides])
    reason = grad_overlap.why_not(_FakeEngine(stage), cfg, derive(cfg, world))
    assert reason == why if why is None else why in reason


@pytest.mark.slow
def test_two_ranks_overlapped_equals_deepspeed_reduction(tmp_path):
    """dp 2 with accumulation 2, small buckets (several all-reduces during backward) and full activation
    checkpointing (hooks fire during recompute): the same per-step losses and gradient norms, bit for bit,
    as DeepSpeed's own all-reduce after backward (a sum of two values does not depend on the bucketing)."""
    common = ["train.max_steps=4", "train.global_batch_size=16", "parallel.activation_checkpointing=full"]
    on = train(tmp_path / "on", *common, "parallel.grad_overlap_mb=0.05", launcher="torchrun", nproc=2)
    off = train(tmp_path / "off", *common, "parallel.grad_overlap_mb=0", launcher="torchrun", nproc=2)
    assert "gradient all-reduce overlapped with backward" in on.stdout
    assert "gradient all-reduce overlapped" not in off.stdout
    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    assert grad_norms(tmp_path / "on") == grad_norms(tmp_path / "off")
