"""The decoder family's flavours: Llama shapes and parameter counts, rotary and sinusoidal positions,
grouped-query attention."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmtrain.models import MODEL_SIZES, ModelConfig, build_model
from llmtrain.models.gpt import apply_rope, rope_cos_sin

# Published parameter counts of the models whose shapes the Llama sizes copy.
LLAMA_PUBLISHED = {"llama_135m": 134_515_008, "llama_360m": 361_821_120, "llama_1b": 1_100_048_384}


def llama_param_formula(c: ModelConfig) -> int:
    d, hs, kv = c.n_embd, c.n_embd // c.n_head, c.n_kv_head or c.n_head
    per_block = d * (c.n_head + 2 * kv) * hs + d * d + 3 * d * c.intermediate_size + 2 * d
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return c.vocab_size * d + c.n_layer * per_block + d + head


@pytest.mark.parametrize("name", [n for n, s in MODEL_SIZES.items() if s.get("mlp") == "swiglu"])
def test_llama_param_count(name):
    cfg = ModelConfig(**{**MODEL_SIZES[name], "name": name})
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(cfg).parameters())
    assert n == llama_param_formula(cfg)
    assert n == LLAMA_PUBLISHED.get(name, n)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    scores = []
    for start in (0, 7, 100):
        cos, sin = rope_cos_sin(start, 4, 16, 10000.0, torch.device("cpu"), torch.float32)
        qr = apply_rope(q.expand(1, 1, 4, 16), cos, sin)[0, 0, 3]  # query at start + 3
        kr = apply_rope(k.expand(1, 1, 4, 16), cos, sin)[0, 0, 1]  # key at start + 1
        scores.append(qr @ kr)
    torch.testing.assert_close(scores[1], scores[0])
    torch.testing.assert_close(scores[2], scores[0])
    assert not torch.allclose(qr @ kr, q[0, 0, 0] @ k[0, 0, 0])  # the rotation did something


@pytest.mark.parametrize("pos", ["rope", "sinusoidal"])
def test_position_options_have_no_position_table(pos):
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=16, pos=pos)
    model = build_model(cfg)
    model.init_weights()
    assert not any("wpe" in n for n, _ in model.named_parameters())
    ids = torch.randint(0, 64, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 64)
    # Without positions the last token's output would not depend on the order of the ones before it.
    swapped = torch.cat([ids[:, 1:2], ids[:, :1], ids[:, 2:]], dim=1)
    assert not torch.allclose(model(swapped)[:, -1], logits[:, -1])


def test_gqa_equals_mha_with_shared_kv_heads():
    """A 2-kv-head model equals the 4-head model whose k/v heads are each copied to the query heads they serve."""
    base = dict(
        n_layer=1,
        n_head=4,
        n_embd=32,
        vocab_size=64,
        block_size=16,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        intermediate_size=40,
    )
    torch.manual_seed(0)
    gqa = build_model(ModelConfig(**base, n_kv_head=2))
    gqa.init_weights()
    mha = build_model(ModelConfig(**base))
    state = gqa.state_dict()
    w = state["blocks.0.attn.qkv.weight"]
    q, k, v = w.split([32, 16, 16])
    expand = lambda t: t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)  # noqa: E731
    state["blocks.0.attn.qkv.weight"] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(mha(ids), gqa(ids), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=20, top_p=0.9)])
def test_kv_cache_generation_equals_recomputation(flavour, sampling):
    """Past block_size too: the cache restarts from the cropped window, as the uncached path does."""
    from llmtrain.models.generation import generate

    extra = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2) if flavour == "llama" else {}
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=24, **extra)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.init_weights()
    prompt = torch.randint(0, 50, (2, 5))
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(3)
        outs.append(generate(model, prompt, 30, cfg.block_size, generator=gen, use_cache=use_cache, **sampling))
    assert outs[0].shape == (2, 35)
    assert torch.equal(outs[0], outs[1])


def test_cached_logits_equal_full_forward():
    cfg = ModelConfig(
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        vocab_size=50,
        block_size=32,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.init_weights()
    ids = torch.randint(0, 50, (2, 20))
    full = model(ids)
    cache = model.new_cache()
    pieces = [model(ids[:, :7], cache), model(ids[:, 7:12], cache)]  # a multi-token step after a prefix
    pieces += [model(ids[:, t : t + 1], cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20


def test_gelu_approximate_picks_the_mlp_gelu():
    """model.gelu_approximate: tanh (GPT-2's, the default) or none (exact erf GELU) in the GELU MLP."""
    base = dict(n_layer=1, n_head=4, n_embd=32, vocab_size=64, block_size=16)
    assert ModelConfig(**base).gelu_approximate == "tanh"
    x = 30 * torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))  # pre-activations of a few units
    out = {}
    for approx in ("tanh", "none"):
        torch.manual_seed(1)
        model = build_model(ModelConfig(**base, **({} if approx == "tanh" else {"gelu_approximate": approx})))
        model.init_weights()
        mlp = model.blocks[0].mlp
        with torch.no_grad():
            out[approx] = mlp(x)
            ref = mlp.down(F.gelu(mlp.up(x), approximate="tanh") if approx == "tanh" else F.gelu(mlp.up(x)))
        torch.testing.assert_close(out[approx], ref, rtol=0, atol=0)
    assert (out["tanh"] - out["none"]).abs().max().item() > 1e-5  # the two GELUs differ there


def test_gelu_approximate_config():
    """Only the GELU MLP has the key: with mlp=swiglu a non-default value is one line naming it; a saved
    config.yaml from before the key loads with the tanh GELU it was trained with."""
    from llmtrain.config import load_config
    from llmtrain.errors import ConfigError
    from llmtrain.models.config import model_config_from_dict

    root = Path(__file__).resolve().parents[2]
    exact = load_config(root / "recipes/gpt_debug.yaml", ["model.gelu_approximate=none"]).model
    assert exact.gelu_approximate == "none"
    with pytest.raises(ConfigError, match=r"^model\.gelu_approximate=none applies to model\.mlp=gelu only.*remove"):
        load_config(root / "recipes/llama_debug.yaml", ["model.gelu_approximate=none"])
    with pytest.raises(ConfigError, match="gelu_approximate"):
        load_config(root / "recipes/gpt_debug.yaml", ["model.gelu_approximate=erf"])
    saved = dataclasses.asdict(load_config(root / "recipes/gpt_debug.yaml").model)
    del saved["gelu_approximate"]
    assert model_config_from_dict(saved, "config.yaml").gelu_approximate == "tanh"
