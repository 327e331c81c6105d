"""The decoder family (GPT-2 and Llama flavours): model, config, objective, TP plan, pipeline split, spec."""

from llmtrain.models.gpt.config import GPTConfig
from llmtrain.models.gpt.model import (
    GPT,
    MLP,
    Block,
    CausalSelfAttention,
    KVCache,
    LayerKV,
    SinusoidalPositions,
    apply_rope,
    document_causal_mask,
    make_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from llmtrain.models.gpt.objective import CausalLM

__all__ = [
    "GPT",
    "GPTConfig",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "CausalLM",
    "KVCache",
    "LayerKV",
    "SinusoidalPositions",
    "apply_rope",
    "document_causal_mask",
    "make_norm",
    "rope_cos_sin",
    "rope_inv_freq",
]
