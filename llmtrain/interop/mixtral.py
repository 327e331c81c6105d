"""Mixtral <-> the decoder's mixture-of-experts flavour (Llama blocks whose MLP is `model.moe`, moe.py).

Attention, norms and embeddings are Llama's (llama.py's names). Each block's sparse MLP:

    ours                              Mixtral (transformers 4.x / files on the Hub)   transformers 5 (in memory)
    mlp.router.weight (E, C)          block_sparse_moe.gate.weight                    mlp.gate.weight
    mlp.experts.gate[e] (H, C)        block_sparse_moe.experts.{e}.w1.weight          mlp.experts.gate_up_proj[e, :H]
    mlp.experts.up[e] (H, C)          block_sparse_moe.experts.{e}.w3.weight          mlp.experts.gate_up_proj[e, H:]
    mlp.experts.down[e] (C, H)        block_sparse_moe.experts.{e}.w2.weight          mlp.experts.down_proj[e]

Exports write the per-expert layout (what transformers 4.x, 5 (converted on load), llama.cpp and vLLM read);
imports take either. Routing is Mixtral's (softmax, top-k, renormalised), so logits agree. Mixtral's
`router_aux_loss_coef` is model.moe.aux_loss_coef; it has no z-loss, capacity or shared expert (an export
of a model with a shared expert is refused; capacity and z-loss are training settings and are dropped).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmtrain.errors import UserError
from llmtrain.interop import llama, size_name
from llmtrain.models.gpt.config import GPTConfig
from llmtrain.models.gpt.moe import MoEConfig

HF_MODEL_TYPES = ("mixtral",)
HF_ARCHITECTURE = "MixtralForCausalLM"

_DENSE = ("mlp.gate.weight", "mlp.up.weight", "mlp.down.weight")


def exports(c: GPTConfig) -> bool:
    return c.pos == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu" and getattr(c, "moe", None) is not None


def to_hf(c: GPTConfig, sd: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import MixtralConfig

    moe = c.moe
    if moe is None or not exports(c):
        raise UserError("Mixtral export needs model.moe with model.pos=rope, norm=rmsnorm and mlp=swiglu")
    if moe.shared_expert:
        raise UserError("Mixtral export: Mixtral has no shared expert; set model.moe.shared_expert=false")
    if c.bias:
        raise UserError("Mixtral export: Mixtral has no biases; set model.bias=false")
    cfg = MixtralConfig(
        **llama.decoder_hf_kwargs(c),
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef,
        sliding_window=None,
    )
    if c.rope_scaling is not None:
        raise UserError("Mixtral export: model.rope_scaling is not written for Mixtral; remove it")
    dense = {k: v for k, v in sd.items() if not any(f".mlp.{n}" in k for n in ("router", "experts"))}
    stub = {f"blocks.{i}.{n}": torch.empty(0) for i in range(c.n_layer) for n in _DENSE}
    _, out = llama.to_hf(dataclasses.replace(c, moe=None), {**dense, **stub})
    for i in range(c.n_layer):
        pre, ours = f"model.layers.{i}.", f"blocks.{i}.mlp."
        for n in ("gate_proj", "up_proj", "down_proj"):
            del out[pre + f"mlp.{n}.weight"]
        moe_pre = pre + "block_sparse_moe."
        out[moe_pre + "gate.weight"] = sd[ours + "router.weight"]
        for e in range(moe.num_experts):
            for w, name in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                out[moe_pre + f"experts.{e}.{w}.weight"] = sd[ours + f"experts.{name}"][e].contiguous()
    return cfg, out


def from_hf(cfg: Any, sd: dict[str, torch.Tensor]) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    E, H = cfg.num_local_experts, cfg.intermediate_size
    stub: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}.mlp."
        stub.update({pre + f"{n}_proj.weight": torch.empty(0) for n in ("gate", "up", "down")})
    c, out = llama.from_hf(cfg, {**sd, **stub})
    if getattr(cfg, "sliding_window", None):
        raise UserError(
            f"Mixtral import: sliding_window={cfg.sliding_window} attention is not implemented in llmtrain "
            "(full causal attention only)"
        )
    for i in range(c.n_layer):
        for n in _DENSE:
            del out[f"blocks.{i}.{n}"]
        ours, legacy, v5 = f"blocks.{i}.mlp.", f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        if legacy + "gate.weight" in sd:
            out[ours + "router.weight"] = sd[legacy + "gate.weight"].float()
            for w, name in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                out[ours + f"experts.{name}"] = torch.stack(
                    [sd[legacy + f"experts.{e}.{w}.weight"].float() for e in range(E)]
                )
        else:
            out[ours + "router.weight"] = sd[v5 + "gate.weight"].float()
            gate_up = sd[v5 + "experts.gate_up_proj"].float()  # (E, 2H, C): [gate; up]
            out[ours + "experts.gate"], out[ours + "experts.up"] = gate_up[:, :H].clone(), gate_up[:, H:].clone()
            out[ours + "experts.down"] = sd[v5 + "experts.down_proj"].float()
    moe = MoEConfig(
        num_experts=E,
        top_k=cfg.num_experts_per_tok,
        capacity_factor=0.0,
        aux_loss_coef=float(getattr(cfg, "router_aux_loss_coef", 0.01)),
        z_loss_coef=0.0,
    )
    c = dataclasses.replace(c, moe=moe)
    return dataclasses.replace(c, name=size_name(c, "llama_debug")), out
