"""Llama <-> the Llama flavour of llmtrain's decoder (rotary, RMSNorm, SwiGLU, grouped-query attention).

Both sides rotate the half-split layout (dim i pairs with dim i + hs/2, transformers' rotate_half), so q
and k rows copy as they are; only q, k, v are fused into one `qkv` here ([q; k; v] by rows). Rotary
scaling: transformers' `rope_scaling` (v5: `rope_parameters`) of type linear or llama3 is model.rope_scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmtrain.errors import UserError
from llmtrain.interop import size_name
from llmtrain.models.config import RopeScaling
from llmtrain.models.gpt.config import GPTConfig

HF_MODEL_TYPES = ("llama",)
HF_ARCHITECTURE = "LlamaForCausalLM"

# our block name -> HF layer name (weights are both nn.Linear (out, in))
_BLOCK = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_BLOCK_BIAS = {
    "attn.proj.bias": "self_attn.o_proj.bias",
    "mlp.gate.bias": "mlp.gate_proj.bias",
    "mlp.up.bias": "mlp.up_proj.bias",
    "mlp.down.bias": "mlp.down_proj.bias",
}
_TOP = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}


def exports(c: GPTConfig) -> bool:  # a mixture-of-experts model is Mixtral's (mixtral.py)
    return c.pos == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu" and getattr(c, "moe", None) is None


def decoder_hf_kwargs(c: GPTConfig) -> dict[str, Any]:
    """The config keys a Llama-shaped transformers decoder (Llama, Mixtral) takes from ours."""
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size or 4 * c.n_embd,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head or c.n_head,
        head_dim=c.head_dim or c.n_embd // c.n_head,
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings,
        hidden_act="silu",
        attention_dropout=c.dropout,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def to_hf(c: GPTConfig, sd: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig

    if not exports(c):
        raise UserError("Llama export needs model.pos=rope, norm=rmsnorm and mlp=swiglu")
    n_kv, hs = c.n_kv_head or c.n_head, c.head_dim or c.n_embd // c.n_head
    # transformers' LlamaConfig signature lacks rope_theta / rope_scaling, which its __init__ takes (**kwargs)
    cfg = LlamaConfig(  # type: ignore[call-arg]
        **decoder_hf_kwargs(c),
        attention_bias=c.bias,
        mlp_bias=c.bias,
        rope_scaling=_hf_rope_scaling(c.rope_scaling),
    )
    out = {hf: sd[ours] for ours, hf in _TOP.items()}
    names = {**_BLOCK, **(_BLOCK_BIAS if c.bias else {})}
    for i in range(c.n_layer):
        pre = f"model.layers.{i}."
        for ours, hf in names.items():
            out[pre + hf] = sd[f"blocks.{i}.{ours}"]
        for kind in ("weight", "bias") if c.bias else ("weight",):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].split([c.n_head * hs, n_kv * hs, n_kv * hs])
            out[pre + f"self_attn.q_proj.{kind}"] = q.contiguous()
            out[pre + f"self_attn.k_proj.{kind}"] = k.contiguous()
            out[pre + f"self_attn.v_proj.{kind}"] = v.contiguous()
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return cfg, out


def _hf_rope_scaling(r: RopeScaling | None) -> dict[str, Any] | None:
    """transformers' `rope_scaling` dict (the keys its validation asks for: `rope_type`, since 4.45)."""
    if r is None:
        return None
    if r.rope_type == "linear":
        return {"rope_type": "linear", "factor": r.factor}
    return {
        "rope_type": "llama3",
        "factor": r.factor,
        "low_freq_factor": r.low_freq_factor,
        "high_freq_factor": r.high_freq_factor,
        "original_max_position_embeddings": r.original_max_position_embeddings,
    }


def rope_of(cfg: Any) -> tuple[float, RopeScaling | None]:
    """The rotary base and scaling of a transformers Llama config; refuses what llmtrain does not implement."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UserError(
            f"Llama import: rope scaling '{kind}' is not implemented in llmtrain (plain rotary, "
            "linear and llama3 scaling only)"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(
            "Llama import: partial_rotary_factor other than 1 is not implemented (llmtrain rotates "
            "every dimension of a head)"
        )
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    theta = float(theta if theta is not None else 10000.0)
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(params["factor"]))
    return theta, RopeScaling(
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings") or cfg.max_position_embeddings
        ),
    )


def from_hf(cfg: Any, sd: dict[str, torch.Tensor]) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    if cfg.hidden_act != "silu":
        raise UserError(f"Llama import: activation '{cfg.hidden_act}' is not the SiLU of SwiGLU")
    hs = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bias = bool(getattr(cfg, "attention_bias", False))
    if bool(getattr(cfg, "mlp_bias", False)) != bias:
        raise UserError("Llama import: attention_bias and mlp_bias differ; llmtrain has one model.bias switch")
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    theta, scaling = rope_of(cfg)
    c = GPTConfig(
        name="llama_debug",
        arch="gpt",
        n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads,
        n_embd=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        block_size=cfg.max_position_embeddings,
        dropout=0.0,
        bias=bias,
        tie_embeddings=tied,
        norm_eps=cfg.rms_norm_eps,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        intermediate_size=cfg.intermediate_size,
        n_kv_head=n_kv,
        rope_theta=theta,
        rope_scaling=scaling,
        head_dim=None if hs * cfg.num_attention_heads == cfg.hidden_size else hs,
    )
    out = {ours: sd[hf].float() for ours, hf in _TOP.items()}
    names = {**_BLOCK, **(_BLOCK_BIAS if bias else {})}
    for i in range(c.n_layer):
        pre = f"model.layers.{i}."
        for ours, hf in names.items():
            out[f"blocks.{i}.{ours}"] = sd[pre + hf].float()
        for kind in ("weight", "bias") if bias else ("weight",):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd[pre + f"self_attn.{p}_proj.{kind}"].float() for p in "qkv"]
            )  # rows [q; k; v]
    out["lm_head.weight"] = out["wte.weight"] if tied else sd["lm_head.weight"].float()
    return dataclasses.replace(c, name=size_name(c, "llama_debug")), out
