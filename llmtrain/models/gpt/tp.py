"""The decoder's tensor-parallel plans (module-name pattern -> style of llmtrain/parallel/tensor_parallel.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from torch import nn

if TYPE_CHECKING:
    from llmtrain.models.gpt.model import GPT

# Order matters: the embedding is sharded before the tied head.
GPT_TP_PLAN: dict[str, str] = {
    "wte": "vocab_embed",
    "blocks.*.attn": "heads",
    "blocks.*.attn.qkv": "column_qkv",
    "blocks.*.attn.proj": "row",
    "blocks.*.mlp.up": "column",
    "blocks.*.mlp.down": "row",
    "lm_head": "vocab_head",
}
# The Llama flavour (SwiGLU): the gate is split like the up projection it multiplies.
LLAMA_TP_PLAN: dict[str, str] = {**GPT_TP_PLAN, "blocks.*.mlp.gate": "column"}


def tp_plan(model: nn.Module) -> dict[str, str]:
    return LLAMA_TP_PLAN if cast("GPT", model).cfg.mlp == "swiglu" else GPT_TP_PLAN
