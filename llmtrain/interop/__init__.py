"""Hugging Face interop: llmtrain models <-> `transformers` models, one module per Hugging Face twin.

Each model family's spec lists its adapter modules (`hf_adapters`: `gpt2.py` and `llama.py` for the
decoder, `mixtral.py` for its mixture-of-experts flavour, `bert.py` for the encoder); each defines:

    HF_MODEL_TYPES: tuple[str, ...]      # transformers `config.model_type` values it imports
    def exports(model_cfg: ModelConfig) -> bool:          # whether to_hf handles this config of its family
    def to_hf(model_cfg, state_dict) -> (transformers.PretrainedConfig, hf_state_dict)
    def from_hf(hf_config, hf_state_dict) -> (ModelConfig, state_dict)
    HF_ARCHITECTURE: str                 # transformers class written into an export's config.json

State dicts hold fp32 CPU tensors by name. `from_hf` returns every name of the llmtrain model's
`state_dict()` (a tied head appears as the embedding's tensor), so `model.load_state_dict(sd)` is strict;
`to_hf` leaves out tied duplicates, as `save_pretrained` does. A config that has no Hugging Face twin
raises ValueError naming the model.* key. The BERT family (bert.py) follows the same interface: its
`to_hf` gives a `BertConfig` whose export `BertForPreTraining.from_pretrained` loads.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from llmtrain.errors import UserError

if TYPE_CHECKING:
    from llmtrain.models.config import ModelConfig


def _modules(adapters: tuple[str, ...] | None = None) -> list[ModuleType]:
    """The adapter modules of every model family (its spec's `hf_adapters`), or of the ones given."""
    if adapters is None:
        from llmtrain.models.registry import FAMILIES

        adapters = tuple(a for f in FAMILIES.values() for a in f.hf_adapters)
    mods = []
    for name in adapters:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return mods


def family_for_config(model_cfg: ModelConfig) -> ModuleType:
    """The adapter module of `model_cfg`'s family that exports it; ValueError when none does."""
    from llmtrain.models.registry import family_of

    family = family_of(model_cfg)
    for mod in _modules(family.hf_adapters):
        if mod.exports(model_cfg):
            return mod
    raise UserError(
        f"model.arch={family.name} with pos={getattr(model_cfg, 'pos', None)}, norm={getattr(model_cfg, 'norm', None)}, "
        f"mlp={getattr(model_cfg, 'mlp', None)} has no Hugging Face twin; exportable are GPT-2 (learned or "
        f"sinusoidal positions, layernorm, gelu, bias), Llama (rope, rmsnorm, swiglu) and Mixtral (Llama with model.moe) "
        f"decoders and BERT"
    )


def family_for_hf(model_type: str) -> ModuleType:
    """The family module that imports a transformers `model_type`; ValueError when none does."""
    mods = _modules()
    for mod in mods:
        if model_type in mod.HF_MODEL_TYPES:
            return mod
    known = sorted(t for m in mods for t in m.HF_MODEL_TYPES)
    raise UserError(f"Hugging Face model_type '{model_type}' cannot be imported; known: {', '.join(known)}")


def size_name(model_cfg: ModelConfig, default: str) -> str:
    """The named size (MODEL_SIZES) whose fields all equal `model_cfg`'s, else `default`: an imported
    SmolLM2-135M reads as llama_135m in logs and configs."""
    from llmtrain.models.config import MODEL_SIZES

    # rotary models have no position table: their block_size is a window, not part of the shape
    skip = {"block_size"} if getattr(model_cfg, "pos", "learned") == "rope" else set()
    for name, fields in MODEL_SIZES.items():
        if all(getattr(model_cfg, k) == v for k, v in fields.items() if k not in skip):
            return name
    return default
