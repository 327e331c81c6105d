"""Parameter counts of every named size, built on the meta device (no memory)."""

import pytest
import torch

from llmtrain.models import MODEL_SIZES, ModelConfig, build_model

NOMINAL = {"gpt_125m": 125e6, "gpt_350m": 350e6, "gpt_760m": 760e6, "gpt_1b": 1.3e9}


def gpt2_param_formula(c: ModelConfig) -> int:
    d = c.n_embd
    per_block = 12 * d * d + 13 * d  # qkv 3d^2+3d, proj d^2+d, mlp 8d^2+5d, two LayerNorms 4d
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return c.vocab_size * d + c.block_size * d + c.n_layer * per_block + 2 * d + head


@pytest.mark.parametrize("name", [n for n, s in MODEL_SIZES.items() if s["arch"] == "gpt" and "mlp" not in s])
def test_gpt_param_count(name):
    cfg = ModelConfig(**{**MODEL_SIZES[name], "name": name})
    with torch.device("meta"):
        model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == gpt2_param_formula(cfg)
    if name in NOMINAL:
        assert abs(n - NOMINAL[name]) / NOMINAL[name] < 0.03, f"{name}: {n / 1e6:.1f}M"
    else:
        assert 1e6 < n < 10e6  # gpt_debug: a few million


def test_init_is_seeded_and_layout_free():
    cfg = ModelConfig()
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(0)
    a.init_weights()
    with torch.device("meta"):
        b = build_model(cfg)
    b = b.to_empty(device="cpu")
    torch.manual_seed(0)
    b.init_weights()
    for (na, pa), (_nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    assert torch.equal(a.lm_head.weight, a.wte.weight)  # tied
    proj_std = a.blocks[0].attn.proj.weight.std().item()
    assert proj_std < 0.02 / (2 * cfg.n_layer) ** 0.5 * 1.2  # residual projections are scaled down
