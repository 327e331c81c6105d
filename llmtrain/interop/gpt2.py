"""GPT-2 <-> the GPT-2 flavour of llmtrain's decoder (learned positions, LayerNorm, GELU, biases).

GELU: GPT-2's tanh form (model.gelu_approximate=tanh) is transformers' activation_function "gelu_new" (or
"gelu_pytorch_tanh"); the exact one (none) is "gelu".

transformers' GPT-2 stores linear weights as Conv1D (in, out); ours are nn.Linear (out, in): transposed.
A model with fixed sinusoidal positions (model.pos=sinusoidal) exports too: GPT-2 adds `wpe[p]` to the token
embedding as we add the sinusoid of p, so its position table holds the sinusoids of 0 .. block_size-1 (the
same function on every position the model accepts; the exported table is then a learned one, and import-hf
reads the export back as model.pos=learned).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from llmtrain.errors import UserError
from llmtrain.interop import size_name
from llmtrain.models.gpt import SinusoidalPositions
from llmtrain.models.gpt.config import GPTConfig

HF_MODEL_TYPES = ("gpt2",)
HF_ARCHITECTURE = "GPT2LMHeadModel"

# transformers' activation_function -> model.gelu_approximate; export writes the first name of each
_ACTIVATIONS: dict[str, Literal["tanh", "none"]] = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

# our block name -> (HF block name, is a Conv1D weight)
_BLOCK = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.up.weight": ("mlp.c_fc.weight", True),
    "mlp.up.bias": ("mlp.c_fc.bias", False),
    "mlp.down.weight": ("mlp.c_proj.weight", True),
    "mlp.down.bias": ("mlp.c_proj.bias", False),
}
_TOP = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
}


def exports(c: GPTConfig) -> bool:
    return (
        c.pos in ("learned", "sinusoidal")
        and c.norm == "layernorm"
        and c.mlp == "gelu"
        and (c.n_kv_head or c.n_head) == c.n_head
        and c.head_dim in (None, c.n_embd // c.n_head)
    )


def to_hf(c: GPTConfig, sd: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import GPT2Config

    if not exports(c):
        raise UserError(
            "GPT-2 export needs model.pos=learned or sinusoidal, norm=layernorm, mlp=gelu, "
            "n_kv_head=n_head and head_dim=n_embd/n_head"
        )
    if not c.bias:
        raise UserError("GPT-2 has biases everywhere; export a model trained with model.bias=true")
    cfg = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.intermediate_size,
        activation_function=next(k for k, v in _ACTIVATIONS.items() if v == c.gelu_approximate),
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )
    if c.pos == "sinusoidal":  # no parameter of ours: the table of the positions the model accepts
        with torch.no_grad():
            sd = {**sd, "wpe.weight": SinusoidalPositions(c.n_embd)(torch.arange(c.block_size))}  # (block_size, C)
    out = {hf: sd[ours] for ours, hf in _TOP.items()}
    for i in range(c.n_layer):
        for ours, (hf, conv) in _BLOCK.items():
            t = sd[f"blocks.{i}.{ours}"]
            out[f"transformer.h.{i}.{hf}"] = t.t().contiguous() if conv else t
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return cfg, out


def from_hf(cfg: Any, sd: dict[str, torch.Tensor]) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    if cfg.activation_function not in _ACTIVATIONS:
        raise UserError(
            f"GPT-2 import: activation_function '{cfg.activation_function}' is not supported; llmtrain's GPT-2 "
            f"flavour runs {', '.join(_ACTIVATIONS)} (model.gelu_approximate tanh or none)"
        )
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(cfg, "scale_attn_weights", True):
        raise UserError("GPT-2 import: only the standard 1/sqrt(head size) attention scaling is supported")
    sd = {k.removeprefix("transformer.") if k.startswith("transformer.") else k: v for k, v in sd.items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    c = GPTConfig(
        name="gpt_debug",
        arch="gpt",
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        vocab_size=cfg.vocab_size,
        block_size=cfg.n_positions,
        dropout=0.0,
        bias=True,
        tie_embeddings=tied,
        norm_eps=cfg.layer_norm_epsilon,
        intermediate_size=cfg.n_inner,
        gelu_approximate=_ACTIVATIONS[cfg.activation_function],
    )
    out = {ours: sd[hf.removeprefix("transformer.")].float() for ours, hf in _TOP.items()}
    for i in range(c.n_layer):
        for ours, (hf, conv) in _BLOCK.items():
            t = sd[f"h.{i}.{hf}"].float()
            out[f"blocks.{i}.{ours}"] = t.t().contiguous() if conv else t
    out["lm_head.weight"] = out["wte.weight"] if tied else sd["lm_head.weight"].float()
    return dataclasses.replace(c, name=size_name(c, "gpt_debug")), out
