"""Model configs and named sizes.

A recipe picks a size with `model.name` and may override any field; `apply_model_preset` merges the
named size under the recipe's keys, so precedence stays CLI > YAML > named size > defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from llmtrain.errors import UserError


@dataclass
class RopeScaling:
    """Rotary frequency scaling for a longer context than pre-training (transformers' `rope_scaling` keys);
    the defaults are Llama 3.1's."""

    # linear (every frequency / factor) or llama3 (Llama 3.1: low ones / factor, high ones kept, a ramp between).
    rope_type: Literal["linear", "llama3"] = "llama3"
    # Context extension factor the rotary frequencies are divided by (linear: all; llama3: the low ones).
    factor: float = 8.0
    # llama3: wavelengths longer than original_max_position_embeddings / low_freq_factor are divided by factor.
    low_freq_factor: float = 1.0
    # llama3: wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept as they are.
    high_freq_factor: float = 4.0
    # llama3: the context length the model was pre-trained with (Llama 3.1: 8192).
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise UserError(f"model.rope_scaling.rope_type must be 'linear' or 'llama3', got {self.rope_type!r}")
        if not self.factor > 0:
            raise UserError(f"model.rope_scaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not (
            0 < self.low_freq_factor < self.high_freq_factor and self.original_max_position_embeddings > 0
        ):
            raise UserError(
                "model.rope_scaling (llama3) needs 0 < low_freq_factor < high_freq_factor and "
                f"original_max_position_embeddings > 0, got {self}"
            )


@dataclass
class WeightQuant:
    """Weight-only integer quantisation of a model's linear layers (written by `llmtrain quantize` with
    `model.converters: [quantized_weights]`; the grid is llmtrain/compress/quant/grid.py)."""

    # Bits per weight: 8 (int8, symmetric) or 4 (two per byte, asymmetric with a zero point).
    bits: int = 8
    # Input columns sharing one scale; 0 = one scale per output row.
    group_size: int = 128
    # Symmetric grid (no zero point); None = symmetric for 8 bits, asymmetric for 4.
    symmetric: bool | None = None
    # Module names of linear layers kept in float (those tied to an embedding are always kept).
    skip: list[str] = field(default_factory=list)


class _ByArch(type):
    """`ModelConfig(**keys)` builds the config class of the family named by `keys["arch"]` (default gpt),
    so code and saved config.yaml files that name only ModelConfig keep working; a family's own class
    (`GPTConfig(...)`, `dataclasses.replace`) is built as itself."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is ModelConfig:
            family_class, kwargs = config_class_for(kwargs)
            return family_class(*args, **kwargs)
        return super().__call__(*args, **kwargs)


@dataclass
class ModelConfig(metaclass=_ByArch):
    """The keys every family has; each family's config class (its folder's config.py) adds its own."""

    # Named size this config starts from (see MODEL_SIZES); other model.* keys override it.
    name: str = "gpt_debug"
    # Model family (llmtrain/models/registry.py): 'gpt' (decoder, causal LM) or 'bert' (encoder, masked
    # LM + next-sentence prediction, or a sequence classifier).
    arch: str = "gpt"
    # Number of transformer blocks.
    n_layer: int = 4
    # Attention heads per block.
    n_head: int = 6
    # Hidden width (d_model).
    n_embd: int = 192
    # Embedding rows; must be >= the tokenizer's vocabulary (padded sizes are faster on GPU).
    vocab_size: int = 8192
    # Maximum sequence length (number of learned positions).
    block_size: int = 256
    # Dropout on attention, residual and embedding outputs (0 for pre-training, as is usual now).
    dropout: float = 0.0
    # Tie the output head to the token embedding.
    tie_embeddings: bool = True
    # Std of the normal init; residual output projections are scaled by 1/sqrt(2*n_layer).
    init_std: float = 0.02
    # Checkpoint or run directory whose weights initialise the model (fresh optimizer and step 0).
    init_from: str | None = None
    # Model converters applied in this order to the plain model after init_from (llmtrain/models/converters.py).
    converters: list[str] = field(default_factory=list)
    # Integer weights of the linear layers (the quantized_weights converter; `llmtrain quantize` sets it); None = float.
    weight_quant: WeightQuant | None = None
    # Epsilon of the normalisation layers (BERT uses 1e-12; 1e-5 is torch's LayerNorm default).
    norm_eps: float = 1e-5
    # Feed-forward hidden width; None means 4 * n_embd.
    intermediate_size: int | None = None


# Keys that one ModelConfig held for every family until each family got its own class, with the value
# they had when unused: a config.yaml written then lists them, and they load when they hold that value.
LEGACY_DEFAULTS: dict[str, Any] = {
    "bias": True,
    "pos": "learned",
    "norm": "layernorm",
    "mlp": "gelu",
    "n_kv_head": None,
    "head_dim": None,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "type_vocab_size": 2,
    "num_labels": 0,
}


def config_class_for(raw: dict[str, Any], error: type[Exception] = ValueError) -> tuple[type, dict[str, Any]]:
    """(the family's config class, `raw` without legacy keys at their old value) for a model mapping.
    A key another family uses is an error naming the key, the family and the fix."""
    from llmtrain.models.registry import FAMILIES, family_of

    family = family_of(raw.get("arch", ModelConfig.arch), error)
    own = {f.name for f in dataclasses.fields(family.config_class)}
    out = {}
    for key, value in raw.items():
        if key in own or (key in LEGACY_DEFAULTS and value == LEGACY_DEFAULTS[key]):
            if key in own:
                out[key] = value
            continue
        users = [f.name for f in FAMILIES.values() if key in {g.name for g in dataclasses.fields(f.config_class)}]
        if users:
            raise error(
                f"model.{key} is a key of model.arch={'/'.join(users)}; model.arch={family.name} does not "
                f"use it: remove model.{key} (or pick a {'/'.join(users)} size with model.name)"
            )
        out[key] = value  # unknown to every family: the strict loader names the nearest valid key
    return family.config_class, out


def model_config_from_dict(raw: dict[str, Any], where: str) -> ModelConfig:
    """The model config saved in `where` (a config.yaml); ValueError naming the file for unknown keys."""
    cls, keys = config_class_for(raw)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise UserError(f"{where}: model keys {unknown} are unknown to this version of llmtrain")
    return cls(**keys)


# What makes a decoder Llama-style; the sizes below add their shapes.
_LLAMA: dict[str, Any] = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-5)

# Named sizes. GPT-3 paper table 2.1 shapes at seq 2048, GPT-2 vocab padded to a multiple of 64.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "gpt_debug": dict(arch="gpt", n_layer=4, n_head=6, n_embd=192, vocab_size=8192, block_size=256),
    "gpt_125m": dict(arch="gpt", n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=2048),
    "gpt_350m": dict(arch="gpt", n_layer=24, n_head=16, n_embd=1024, vocab_size=50304, block_size=2048),
    "gpt_760m": dict(arch="gpt", n_layer=24, n_head=16, n_embd=1536, vocab_size=50304, block_size=2048),
    # GPT-3 XL width and depth (~1.3B); 16 heads of 128.
    "gpt_1b": dict(arch="gpt", n_layer=24, n_head=16, n_embd=2048, vocab_size=50304, block_size=2048),
    # Llama-style decoders: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases.
    # llama_135m / llama_360m are SmolLM2's shapes (49,152-token vocabulary, tied); llama_1b is TinyLlama-1.1B's.
    "llama_debug": dict(
        arch="gpt",
        **_LLAMA,
        n_layer=4,
        n_head=6,
        n_kv_head=2,
        n_embd=192,
        intermediate_size=512,
        vocab_size=8192,
        block_size=256,
    ),
    "llama_135m": dict(
        arch="gpt",
        **_LLAMA,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embd=576,
        intermediate_size=1536,
        vocab_size=49152,
        block_size=2048,
        rope_theta=100000.0,
    ),
    "llama_360m": dict(
        arch="gpt",
        **_LLAMA,
        n_layer=32,
        n_head=15,
        n_kv_head=5,
        n_embd=960,
        intermediate_size=2560,
        vocab_size=49152,
        block_size=2048,
        rope_theta=100000.0,
    ),
    "llama_1b": dict(
        arch="gpt",
        **_LLAMA,
        n_layer=22,
        n_head=32,
        n_kv_head=4,
        n_embd=2048,
        intermediate_size=5632,
        vocab_size=32000,
        block_size=2048,
        tie_embeddings=False,
    ),
    # BERT (Devlin et al. 2018): base ~110M and large ~340M with the 30,522-token uncased vocabulary.
    "bert_debug": dict(arch="bert", n_layer=4, n_head=4, n_embd=128, vocab_size=8192, block_size=128, norm_eps=1e-12),
    "bert_base": dict(
        arch="bert", n_layer=12, n_head=12, n_embd=768, vocab_size=30522, block_size=512, norm_eps=1e-12, dropout=0.1
    ),
    "bert_large": dict(
        arch="bert", n_layer=24, n_head=16, n_embd=1024, vocab_size=30522, block_size=512, norm_eps=1e-12, dropout=0.1
    ),
}


def apply_model_preset(raw: dict[str, Any], error: type[Exception] = ValueError) -> dict[str, Any]:
    """Return `raw` with `model` = the named size's fields updated by the recipe's model keys."""
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise error(f"'model' must be a mapping, got {model!r}")
    name = model.get("name", ModelConfig.name)
    if name not in MODEL_SIZES:
        near = difflib.get_close_matches(str(name), MODEL_SIZES, n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"choose one of {', '.join(MODEL_SIZES)}"
        raise error(f"unknown model.name '{name}'; {hint}")
    return {**raw, "model": {**MODEL_SIZES[name], **model, "name": name}}
