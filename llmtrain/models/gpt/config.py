"""The decoder's config: the common keys plus the GPT-2 / Llama flavour keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from llmtrain.errors import ConfigError, UserError
from llmtrain.models.config import ModelConfig, RopeScaling
from llmtrain.models.gpt.moe import MoEConfig, moe_config
from llmtrain.models.lora import LoraConfig, lora_config, target_suffixes


@dataclass
class GPTConfig(ModelConfig):
    # Use biases in linear layers and LayerNorms (GPT-2 does).
    bias: bool = True
    # Decoder positions: learned (GPT-2 table), rope (rotary, Llama) or sinusoidal (fixed, Vaswani et al.).
    pos: Literal["learned", "rope", "sinusoidal"] = "learned"
    # Decoder normalisation: layernorm (GPT-2) or rmsnorm (Llama); both use model.norm_eps.
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    # Decoder feed-forward: gelu (down(gelu(up x)), GPT-2) or swiglu (down(silu(gate x) * up x), Llama).
    mlp: Literal["gelu", "swiglu"] = "gelu"
    # GELU of mlp=gelu (litgpt's key): tanh (GPT-2's, Hugging Face gelu_new; the default) or none (exact erf
    # GELU, nanoGPT's; faster on CPU).
    gelu_approximate: Literal["tanh", "none"] = "tanh"
    # Key/value heads (grouped-query attention when < n_head); None means n_head.
    n_kv_head: int | None = None
    # Attention head size; None means n_embd // n_head (a pruned model keeps its heads' size with fewer heads).
    head_dim: int | None = None
    # Base of the rotary frequencies (pos=rope); Llama 2 uses 1e4, SmolLM2 1e5.
    rope_theta: float = 10000.0
    # Rotary frequency scaling (pos=rope) for a longer context, as Llama 3.1 configs carry; None = plain rotary.
    rope_scaling: RopeScaling | None = None
    # LoRA adapters on the frozen model (llmtrain/models/lora.py: rank, alpha, dropout, targets); setting it
    # appends the `lora` converter to model.converters. None = no adapters.
    lora: LoraConfig | None = None
    # Mixture-of-experts feed-forward in every block (llmtrain/models/gpt/moe.py: num_experts, top_k,
    # capacity_factor, aux_loss_coef, z_loss_coef, shared_expert); needs model.mlp=swiglu. None = dense MLP.
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # read from a saved config.yaml
            known = {f.name for f in dataclasses.fields(RopeScaling)}
            if set(self.rope_scaling) - known:
                raise UserError(
                    f"model.rope_scaling keys {sorted(set(self.rope_scaling) - known)} are unknown; "
                    f"valid: {', '.join(sorted(known))}"
                )
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.gelu_approximate != "tanh" and self.mlp != "gelu":
            raise ConfigError(
                f"model.gelu_approximate={self.gelu_approximate} applies to model.mlp=gelu only (got "
                f"mlp={self.mlp}); remove model.gelu_approximate"
            )
        self.moe = moe_config(self.moe)
        if self.moe is not None and self.mlp != "swiglu":
            raise ConfigError(
                f"model.moe: experts are SwiGLU MLPs (Mixtral); set model.mlp=swiglu (got {self.mlp}) or remove model.moe"
            )
        # LoRA: the section and the converter go together (either one given brings the other)
        self.lora = lora_config(self.lora)
        if self.lora is None and "lora" in self.converters:
            self.lora = LoraConfig()
        if self.lora is not None:
            target_suffixes(self.lora, self.mlp == "swiglu")  # a target this flavour lacks fails here
            if "lora" not in self.converters:
                self.converters = [*self.converters, "lora"]
            if "quantized_weights" in self.converters[self.converters.index("lora") :]:
                raise UserError(
                    "model.converters: list quantized_weights before lora (QLoRA quantises the base, then adds "
                    "float adapters to it)"
                )
