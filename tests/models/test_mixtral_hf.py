"""Mixtral parity: a random tiny transformers `MixtralForCausalLM` (built from a config, no download) against
llmtrain's mixture-of-experts decoder, weights through llmtrain/interop/mixtral.py both ways: in memory
(transformers 5's fused expert tensors) and through the files (save_pretrained -> import-hf -> export-hf,
written in the per-expert w1/w2/w3 layout -> from_pretrained). fp32; the same tolerance as the Llama parity."""

from __future__ import annotations

import pytest
import torch

from llmtrain.interop import family_for_config, family_for_hf
from llmtrain.models import build_model

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 101


def _hf_mixtral(tied: bool = False):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rope_theta=5000.0, rms_norm_eps=1e-6,
        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=tied, router_aux_loss_coef=0.02,
        sliding_window=None,
    )  # fmt: skip
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers' init leaves the stacked experts tiny; make routing and experts matter
        for name, p in hf.named_parameters():
            if "experts" in name or "mlp.gate" in name:
                p.normal_(0, 0.2)
    return hf


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("tied", [False, True])
def test_random_mixtral_imports_with_logit_parity(tied):
    hf = _hf_mixtral(tied)
    cfg, sd = family_for_hf("mixtral").from_hf(hf.config, hf.state_dict())
    assert cfg.moe is not None and (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.aux_loss_coef) == (4, 2, 0.02)
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)
    ids = torch.randint(0, VOCAB, (2, 32))
    torch.testing.assert_close(_logits(ours, ids), hf(ids).logits.detach(), **TOL)
    # and back: our export loads into transformers with the same logits
    mod = family_for_config(cfg)
    assert mod.__name__ == "llmtrain.interop.mixtral"
    hf_cfg, hf_sd = mod.to_hf(cfg, ours.state_dict())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in hf_sd
    back_cfg, back_sd = mod.from_hf(hf_cfg, hf_sd)
    assert back_cfg == cfg and all(torch.equal(back_sd[k], v) for k, v in sd.items())


def test_mixtral_round_trip_through_directories(tmp_path):
    from llmtrain.interop.cli import export_hf, import_hf
    from llmtrain.parallel.consolidate import load_model_weights

    hf = _hf_mixtral()
    hf.save_pretrained(tmp_path / "hf")
    cfg, sd = load_model_weights(import_hf(tmp_path / "hf", tmp_path / "ours"))
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)
    ids = torch.randint(0, VOCAB, (2, 32))
    expected = hf(ids).logits.detach()
    torch.testing.assert_close(_logits(ours, ids), expected, **TOL)
    back = transformers.MixtralForCausalLM.from_pretrained(str(export_hf(tmp_path / "ours", tmp_path / "back")))
    torch.testing.assert_close(back.eval()(ids).logits.detach(), expected, **TOL)


def test_dense_llama_flavour_still_exports_as_llama():
    """A dense Llama-flavour model still exports as Llama, not Mixtral."""
    hf = _hf_mixtral()
    cfg, _ = family_for_hf("mixtral").from_hf(hf.config, hf.state_dict())
    import dataclasses

    assert family_for_config(dataclasses.replace(cfg, moe=None)).__name__ == "llmtrain.interop.llama"
