"""Every speed switch of the throughput issue trains to the default's losses on CPU (where it applies)."""

from __future__ import annotations

import pytest
import torch
from helpers import losses, train

from llmtrain.parallel.compile import attention_backend

STEPS = 4


@pytest.fixture(scope="module")
def default_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "run"
    train(out, f"train.max_steps={STEPS}")
    return losses(out)


@pytest.mark.slow
def test_compiled_blocks_with_flash_attention_match_default(tmp_path, default_losses):
    """Inductor fuses and reorders fp32 arithmetic, and the CPU flash kernel sums in another order than
    the math kernel: a few 1e-7 relative per op, well under 1e-4 on the loss after 4 steps."""
    out = tmp_path / "run"
    proc = train(out, f"train.max_steps={STEPS}", "train.compile=true", "train.attention_backend=flash", timeout=600)
    got = losses(out)
    assert sorted(got) == sorted(default_losses)
    for step, loss in default_losses.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), step
    assert "compiled 2 blocks" in proc.stdout


def test_bf16_autocast_tracks_fp32(tmp_path, default_losses):
    """fp32 weights, bf16 matmuls: bf16 keeps 8 mantissa bits (relative error ~4e-3 per product), so the
    loss tracks fp32 to ~1e-3 over a few steps, but is not equal (that would mean autocast was off)."""
    out = tmp_path / "run"
    proc = train(out, f"train.max_steps={STEPS}", "precision=bf16-autocast", "parallel.zero_stage=2")
    got = losses(out)
    for step, loss in default_losses.items():
        assert got[step] == pytest.approx(loss, abs=5e-3), step
    assert any(got[s] != default_losses[s] for s in got)
    assert "bf16-autocast" in proc.stdout


def test_attention_backend_is_enforced():
    q = torch.randn(1, 2, 8, 4)
    with attention_backend("math", torch.device("cpu")):
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    with attention_backend("flash", torch.device("cpu")):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, ref)
    # Only the named kernel is allowed inside (so a call it cannot serve fails rather than falling back).
    with attention_backend("flash", torch.device("cpu")):
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()  # restored on exit
    with pytest.raises(ValueError, match="needs a CUDA GPU"), attention_backend("efficient", torch.device("cpu")):
        pass
    with pytest.raises(ValueError, match="must be one of"), attention_backend("fast", torch.device("cpu")):
        pass
