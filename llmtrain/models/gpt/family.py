"""The decoder family's spec: what the framework needs to know about `model.arch=gpt`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from llmtrain.models.gpt.config import GPTConfig
from llmtrain.models.gpt.model import GPT
from llmtrain.models.gpt.moe import active_numel
from llmtrain.models.gpt.objective import CausalLM
from llmtrain.models.gpt.pipeline import gpt_split
from llmtrain.models.gpt.tp import tp_plan
from llmtrain.models.spec import ModelFamily, NamedParams

if TYPE_CHECKING:
    from llmtrain.data.config import DataConfig


def _check(m: GPTConfig, data: DataConfig, pp: int) -> list[str]:
    return []  # every decoder shape trains on causal batches, on every layout


def _tp_heads(m: GPTConfig) -> dict[str, int]:
    heads = {"model.n_head": m.n_head}
    if m.n_kv_head:
        heads["model.n_kv_head"] = m.n_kv_head
    return heads


def _matmul_params_per_token(named: NamedParams, seq_len: int, data: DataConfig | None) -> float:
    """Every (active) parameter but the lookups: a position table, and a token embedding that is not also the
    output head (untied `wte`: only `lm_head` multiplies). A tied head is listed once, as wte.weight."""
    sizes = {name: active_numel(p) for name, p in named}  # a token runs through top_k of E experts
    lookups = {n for n in sizes if "wpe" in n or "position" in n}
    if "lm_head.weight" in sizes:
        lookups |= {n for n in sizes if n.endswith("wte.weight")}
    return float(sum(size for name, size in sizes.items() if name not in lookups))


def _no_decay(name: str, p: Any) -> bool:
    # matrices decay; norms, biases and the learned position table (`wpe`, also under pipeline names) do not
    return p.ndim < 2 or "wpe" in name


def _forward_inputs(model: nn.Module, batch: dict) -> Any:
    return model(batch["input_ids"])


# Per parameter-name suffix inside a block: the axis kind of each dimension (None = keep whole).
# C hidden, Q query-head rows, KV key/value-head rows, QKV fused rows, F MLP channels.
_PRUNE_BLOCK_AXES: dict[str, tuple[str | None, ...]] = {
    "attn.qkv.weight": ("QKV", "C"),
    "attn.qkv.bias": ("QKV",),
    "attn.q.weight": ("Q", "C"),
    "attn.q.bias": ("Q",),
    "attn.k.weight": ("KV", "C"),
    "attn.k.bias": ("KV",),
    "attn.v.weight": ("KV", "C"),
    "attn.v.bias": ("KV",),
    "attn.proj.weight": ("C", "Q"),
    "attn.proj.bias": ("C",),
    "mlp.up.weight": ("F", "C"),
    "mlp.up.bias": ("F",),
    "mlp.gate.weight": ("F", "C"),
    "mlp.gate.bias": ("F",),
    "mlp.down.weight": ("C", "F"),
    "mlp.down.bias": ("C",),
}
_PRUNE_TOP_AXES: dict[str, tuple[str | None, ...]] = {
    "wte.weight": (None, "C"),
    "wpe.weight": (None, "C"),
    "lm_head.weight": (None, "C"),
}

FAMILY = ModelFamily(
    name="gpt",
    config_class=GPTConfig,
    build=GPT,
    objective=CausalLM,
    sample_kinds=("causal",),
    generative=True,
    tp_plan=tp_plan,
    tp_heads=_tp_heads,
    pipeline_split=gpt_split,
    check=_check,
    forward_inputs=_forward_inputs,
    matmul_params_per_token=_matmul_params_per_token,
    no_decay=_no_decay,
    prune_block_axes=_PRUNE_BLOCK_AXES,
    prune_top_axes=_PRUNE_TOP_AXES,
    hf_adapters=("llmtrain.interop.gpt2", "llmtrain.interop.llama", "llmtrain.interop.mixtral"),
    context_parallel=True,
)
