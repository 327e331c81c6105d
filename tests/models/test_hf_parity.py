"""Hugging Face parity: randomly initialised transformers GPT-2 / Llama models (built from configs, no
download) against llmtrain's decoder, weights through llmtrain.interop in both directions. fp32; the two
sides run the same ops in the same order except for fused-vs-split projections and SDPA-vs-eager
attention, which move results by ~1e-7, so logits and every hidden state must agree within 1e-5."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmtrain.interop import family_for_config, family_for_hf
from llmtrain.models import ModelConfig, RopeScaling, build_model

transformers = pytest.importorskip("transformers")  # the hf extra; dev installs it

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 101  # not a multiple of 64


def _hf_gpt2(tied: bool):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=48,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=tied,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _hf_llama(tied: bool, rope_scaling: dict | None = None, max_positions: int = 32):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
    )
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
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i: f"hidden state {i}: {m}")
    torch.testing.assert_close(logits, ref.logits, **TOL)


@pytest.mark.parametrize("family,tied", [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)])
def test_parity_both_directions(family, tied):
    torch.manual_seed(0)
    hf = (_hf_gpt2 if family == "gpt2" else _hf_llama)(tied).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: perturb them so they are tested
        for _name, p in hf.named_parameters():
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
    cfg = ModelConfig(
        n_layer=1,
        n_head=2,
        n_kv_head=1,
        n_embd=48,
        head_dim=16,
        vocab_size=VOCAB,
        block_size=16,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        intermediate_size=40,
    )
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
        family_for_config(ModelConfig(pos="rope"))  # rotary positions with GPT-2's LayerNorm and GELU
    with pytest.raises(ValueError, match="no Hugging Face twin"):
        family_for_config(ModelConfig(pos="sinusoidal", norm="rmsnorm", mlp="swiglu", bias=False))
    with pytest.raises(ValueError, match="cannot be imported"):
        family_for_hf("mamba")


# head size 16 at rope_theta 5000: wavelengths 6, 18, 53, 153, 444, 1288, 3738, 10845 positions. With a
# pre-training context of 256 (extended 8x to 2048), llama3 keeps the first three (< 256/4), divides the last
# four (> 256/1) by the factor and blends the fourth: every branch of the rule is exercised.
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
}


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_llama_rope_scaling_parity_both_directions(kind):
    """transformers' rope_scaling (linear, llama3) is model.rope_scaling: logits and hidden states agree within
    1e-5 on import and on export, and the scaling matters (without it the logits move by far more)."""
    torch.manual_seed(0)
    hf = _hf_llama(False, dict(ROPE_SCALINGS[kind]), max_positions=2048).eval()
    with torch.no_grad():  # sharper attention than HF's init gives, so that positions move the logits visibly
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    ids = torch.randint(0, VOCAB, (2, 32))

    cfg, sd = family_for_hf("llama").from_hf(hf.config, hf.state_dict())
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == kind and cfg.rope_theta == 5000.0
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)
    _assert_parity(hf, ours, ids)
    plain = build_model(dataclasses.replace(cfg, rope_scaling=None)).eval()
    plain.load_state_dict(sd)
    with torch.no_grad():
        assert (plain(ids) - ours(ids)).abs().max() > 1e-2  # 1000x the parity tolerance

    torch.manual_seed(1)
    mine = build_model(cfg).eval()
    mine.init_weights()
    hf_cfg, hf_sd = family_for_config(cfg).to_hf(cfg, mine.state_dict())
    back = transformers.LlamaForCausalLM(hf_cfg).eval()
    back.load_state_dict(hf_sd)
    _assert_parity(back, mine, ids)


def test_llama3_rope_scaling_through_export_and_import_dirs(tmp_path):
    """The scaling survives the files: a saved transformers directory -> import-hf (config.yaml) ->
    load_model_weights -> export-hf (config.json) -> from_pretrained, logits equal all the way."""
    from llmtrain.interop.cli import export_hf, import_hf
    from llmtrain.parallel.consolidate import load_model_weights

    torch.manual_seed(0)
    hf = _hf_llama(True, dict(ROPE_SCALINGS["llama3"]), max_positions=2048).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg, sd = load_model_weights(import_hf(tmp_path / "hf", tmp_path / "ours"))
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 256)
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)
    ids = torch.randint(0, VOCAB, (2, 32))
    _assert_parity(hf, ours, ids)
    back = transformers.LlamaForCausalLM.from_pretrained(str(export_hf(tmp_path / "ours", tmp_path / "back"))).eval()
    _assert_parity(back, ours, ids)


def test_rope_scaling_config_is_checked():
    with pytest.raises(ValueError, match="needs model.pos=rope"):
        build_model(ModelConfig(rope_scaling=RopeScaling("linear", 2.0)))
    with pytest.raises(ValueError, match="rope_type must be"):
        RopeScaling("yarn")
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        RopeScaling("llama3", 8.0, 4.0, 1.0)
    cfg = ModelConfig(pos="rope", rope_scaling={"rope_type": "linear", "factor": 2.0})  # as read from config.yaml
    assert cfg.rope_scaling == RopeScaling("linear", 2.0)
    from llmtrain.config import load_config

    cfg = load_config(
        None, ["model.name=llama_debug", "model.rope_scaling.rope_type=linear", "model.rope_scaling.factor=2"]
    ).model
    assert cfg.rope_scaling == RopeScaling("linear", 2.0)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig(pos="rope", rope_scaling={"type": "linear"})
    hf_cfg = transformers.LlamaConfig(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    )
    with pytest.raises(ValueError, match="'yarn' is not implemented"):
        family_for_hf("llama").from_hf(hf_cfg, {})


def test_gpt2_export_of_sinusoidal_positions():
    """Fixed sinusoidal positions export as GPT-2's position table (their values at 0 .. block_size-1): the
    same logits, also with packed-document position ids, and import-hf reads it back as learned positions."""
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=48, vocab_size=VOCAB, block_size=32, pos="sinusoidal")
    mine = build_model(cfg).eval()
    mine.init_weights()
    hf_cfg, hf_sd = family_for_config(cfg).to_hf(cfg, mine.state_dict())
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    ids = torch.randint(0, VOCAB, (2, 32))
    _assert_parity(hf, mine, ids)
    pos = torch.cat([torch.arange(12), torch.arange(20)]).expand(2, 32)  # two documents packed in a row
    with torch.no_grad():
        torch.testing.assert_close(mine(ids, position_ids=pos), hf(ids, position_ids=pos).logits, **TOL)

    back_cfg, back_sd = family_for_hf("gpt2").from_hf(hf.config, hf.state_dict())
    assert back_cfg.pos == "learned"
    back = build_model(back_cfg).eval()
    back.load_state_dict(back_sd)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), mine(ids), **TOL)


def test_gpt2_exact_gelu_both_directions():
    """activation_function="gelu" (exact) is model.gelu_approximate=none both ways, "gelu_new" the default
    tanh. The feed-forward weights are scaled up so that pre-activations reach a few units, where the two
    GELUs differ: the same weights with the tanh GELU are off by more than 5x the tolerance."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=16,
            n_embd=32,
            n_layer=2,
            n_head=4,
            activation_function="gelu",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
    ).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
                p.mul_(20)
    ids = torch.randint(0, VOCAB, (2, 16))

    cfg, sd = family_for_hf("gpt2").from_hf(hf.config, hf.state_dict())
    assert cfg.gelu_approximate == "none"
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)
    _assert_parity(hf, ours, ids)
    tanh = build_model(dataclasses.replace(cfg, gelu_approximate="tanh")).eval()
    tanh.load_state_dict(sd)
    with torch.no_grad():
        assert (tanh(ids) - hf(ids).logits).abs().max().item() > 5 * TOL["atol"]

    hf_cfg, hf_sd = family_for_config(cfg).to_hf(cfg, ours.state_dict())
    assert hf_cfg.activation_function == "gelu"
    back = transformers.GPT2LMHeadModel(hf_cfg).eval()
    back.load_state_dict(hf_sd, strict=False)
    back.tie_weights()
    _assert_parity(back, ours, ids)
    assert family_for_config(tanh.cfg).to_hf(tanh.cfg, sd)[0].activation_function == "gelu_new"


def test_gpt2_import_refuses_other_activations():
    with pytest.raises(ValueError, match="activation_function 'relu' is not supported.*gelu_approximate"):
        family_for_hf("gpt2").from_hf(transformers.GPT2Config(activation_function="relu"), {})
