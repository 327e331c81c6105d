"""Hugging Face parity: randomly initialised transformers GPT-2 / Llama models (built from configs, no
download) against llmtrain's decoder, weights through llmtrain.interop in both directions. fp32; the two
sides run the same ops in the same order except for fused-vs-split projections and SDPA-vs-eager
attention, which move results by ~1e-7, so logits and every hidden state must agree within 1e-5."""

from __future__ import annotations

import pytest
import torch

from llmtrain.interop import family_for_config, family_for_hf
from llmtrain.models import ModelConfig, build_model

transformers = pytest.importorskip("transformers")  # the hf extra; dev installs it

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 101  # not a multiple of 64


def _hf_gpt2(tied: bool):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                  tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg)


def _hf_llama(tied: bool):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def _ours_with_hidden(model, ids):
    """Logits and the hidden states transformers reports: embeddings, each block's output but the last,
    and the final norm's output."""
    seen = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))]
    hooks += [b.register_forward_hook(lambda m, a, o: seen.append(o)) for b in model.blocks[:-1]]
    hooks.append(model.ln_f.register_forward_hook(lambda m, a, o: seen.append(o)))
    logits = model(ids)
    for h in hooks:
        h.remove()
    return logits, seen


def _assert_parity(hf, ours, ids):
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        logits, hidden = _ours_with_hidden(ours, ids)
    assert len(hidden) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(hidden, ref.hidden_states)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"hidden state {i}: {m}")
    torch.testing.assert_close(logits, ref.logits, **TOL)


@pytest.mark.parametrize("family,tied", [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)])
def test_parity_both_directions(family, tied):
    torch.manual_seed(0)
    hf = (_hf_gpt2 if family == "gpt2" else _hf_llama)(tied).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: perturb them so they are tested
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, VOCAB, (2, 32))

    # transformers -> llmtrain
    fam = family_for_hf(hf.config.model_type)
    cfg, sd = fam.from_hf(hf.config, hf.state_dict())
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)  # strict: every name mapped
    assert (ours.lm_head.weight is ours.wte.weight) == tied
    if family == "llama":
        assert cfg.n_kv_head == 2 and cfg.rope_theta == 5000.0 and cfg.pos == "rope"
    _assert_parity(hf, ours, ids)

    # llmtrain -> transformers: a fresh llmtrain model, exported
    torch.manual_seed(1)
    mine = build_model(cfg).eval()
    mine.init_weights()
    hf_cfg, hf_sd = family_for_config(cfg).to_hf(cfg, mine.state_dict())
    back = type(hf)(hf_cfg).eval()
    missing, unexpected = back.load_state_dict(hf_sd, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    if tied:
        back.tie_weights()
    _assert_parity(back, mine, ids)


def test_llama_head_dim_other_than_width_over_heads():
    """A pruned model keeps its head size with fewer heads (model.head_dim): Llama's head_dim carries it."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=48, head_dim=16, vocab_size=VOCAB, block_size=16,
                      pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, intermediate_size=40)
    mine = build_model(cfg).eval()
    mine.init_weights()
    hf_cfg, hf_sd = family_for_config(cfg).to_hf(cfg, mine.state_dict())
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(hf_sd, strict=False)
    hf.tie_weights()
    _assert_parity(hf, mine, torch.randint(0, VOCAB, (2, 16)))
    assert family_for_hf("llama").from_hf(hf_cfg, hf.state_dict())[0].head_dim == 16


def test_configs_without_a_twin_are_refused():
    with pytest.raises(ValueError, match="no Hugging Face twin"):
        family_for_config(ModelConfig(pos="sinusoidal"))
    with pytest.raises(ValueError, match="cannot be imported"):
        family_for_hf("mamba")
