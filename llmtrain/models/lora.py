"""LoRA (Hu et al. 2021): low-rank adapters on a frozen base, as the model converter `lora`.

Each targeted linear `y = W x + b` (W: out x in) becomes

    y = W x + b + (alpha / r) * B A dropout(x)        A: r x in (normal init), B: out x r (zeros)

so the converted model computes exactly what the base did until B trains. The converter freezes every
parameter of the model (`requires_grad_(False)`: embeddings, norms, biases, the base weights) and adds
`lora_a` / `lora_b` to each target, keeping the target's own names: `blocks.0.attn.qkv.weight` is still the
base weight and `blocks.0.attn.qkv.lora_a` / `.lora_b` sit beside it. Only the adapters reach the optimizer.

Configured by `model.lora` (decoder family); setting it appends `lora` to `model.converters` (so
`model.converters: [lora]` alone also works, with the defaults below). Targets, by the decoder's module
names (llmtrain/models/gpt/model.py) and what they are in Hugging Face's twins:

    target  our module(s)            GPT-2 (GPT2LMHeadModel)   Llama (LlamaForCausalLM)
    qkv     blocks.*.attn.qkv        attn.c_attn               self_attn.q_proj, k_proj, v_proj (*)
    proj    blocks.*.attn.proj       attn.c_proj               self_attn.o_proj
    gate    blocks.*.mlp.gate        -                         mlp.gate_proj  (Llama flavour only)
    up      blocks.*.mlp.up          mlp.c_fc                  mlp.up_proj
    down    blocks.*.mlp.down        mlp.c_proj                mlp.down_proj
    fc      = up, down (and gate in the Llama flavour): every feed-forward linear
    mlp     = fc;  attn = qkv, proj;  all = every linear of every block

(*) our q, k and v are one fused projection with one adapter: its A is shared by q, k and v and its B
stacks their rows, which a PEFT adapter writes as three adapters with the same A (exact, see
llmtrain/interop/peft.py). The output head and the embeddings are never adapted.

With a quantised base (a `QuantLinear` of llmtrain/compress/quant/linear.py: QLoRA) the adapter is added
to the quantised layer's own forward, in float. Merging (`merge_lora`) folds W + (alpha / r) B A into a
plain float model without the converter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.models.converters import register_converter

# target name -> module suffixes inside a block (gate only where the MLP has one)
_SINGLE = {
    "qkv": ("attn.qkv",),
    "proj": ("attn.proj",),
    "gate": ("mlp.gate",),
    "up": ("mlp.up",),
    "down": ("mlp.down",),
}
_GROUPS = {
    "fc": ("gate", "up", "down"),
    "mlp": ("gate", "up", "down"),
    "attn": ("qkv", "proj"),
    "all": ("qkv", "proj", "gate", "up", "down"),
}
TARGETS = (*_SINGLE, *_GROUPS)
_HF_NAMES = {"q_proj", "k_proj", "v_proj", "c_attn"}  # a user thinking in Hugging Face names gets a hint


@dataclass
class LoraConfig:
    """LoRA adapters on a frozen base (llmtrain/models/lora.py)."""

    # Rank r of each adapter (A: r x in, B: out x r).
    rank: int = 8
    # The adapter's output is scaled by alpha / rank (PEFT's lora_alpha).
    alpha: float = 16.0
    # Dropout on the adapter's input only (the base sees x unchanged), as PEFT's lora_dropout.
    dropout: float = 0.0
    # Which linears of each block get adapters: qkv, proj, gate, up, down, or the groups fc (= mlp: every
    # feed-forward linear), attn (qkv, proj), all.
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc"])

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"model.lora.rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"model.lora.alpha must be > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.targets, list) or not self.targets:
            raise ConfigError(
                f"model.lora.targets must be a non-empty list (e.g. [qkv, proj, fc]), got {self.targets!r}"
            )
        for t in self.targets:
            if t not in TARGETS:
                hint = " (q, k and v are one fused projection here: use qkv)" if t in _HF_NAMES else ""
                raise ConfigError(f"model.lora.targets: unknown target {t!r}{hint}; valid: {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_config(value: Any) -> LoraConfig | None:
    """`model.lora` as read from YAML or a saved config.yaml (a mapping) or already built."""
    if value is None or isinstance(value, LoraConfig):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"model.lora must be a mapping (rank, alpha, dropout, targets), got {value!r}")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    if set(value) - known:
        raise ConfigError(
            f"model.lora keys {sorted(set(value) - known)} are unknown; valid: {', '.join(sorted(known))}"
        )
    return LoraConfig(**value)


def target_suffixes(lora: LoraConfig, swiglu: bool) -> list[str]:
    """The module-name suffixes inside a block that `lora.targets` selects (in block order)."""
    wanted: set[str] = set()
    for t in lora.targets:
        if t == "gate" and not swiglu:
            raise ConfigError("model.lora.targets: 'gate' needs the Llama flavour (model.mlp=swiglu); remove it")
        wanted.update(_GROUPS.get(t, (t,)))
    if not swiglu:
        wanted.discard("gate")
    return [s for name in _SINGLE if name in wanted for s in _SINGLE[name]]


# ---------------------------------------------------------------------------------------------
# The adapted linear


class LoRAMixin:
    """Adds `lora_a`, `lora_b` to a linear layer class (nn.Linear or a subclass, e.g. a quantised one):
    forward = the class's own forward + scale * B A dropout(x). The layer keeps its names and type."""

    lora_a: nn.Parameter
    lora_b: nn.Parameter
    lora_scale: float
    lora_dropout: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)  # type: ignore[misc]
        return base + lora_delta(x, self.lora_a, self.lora_b, self.lora_scale, self.lora_dropout)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.lora_a.shape[0]}, lora_scale={self.lora_scale:g}"  # type: ignore[misc]


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: nn.Module) -> torch.Tensor:
    """scale * B A dropout(x): (..., in) -> (..., out), computed in the adapters' dtype."""
    h = F.linear(dropout(x).to(a.dtype), a)  # (..., r)
    return (scale * F.linear(h, b)).to(x.dtype)  # (..., out)


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if issubclass(cls, LoRAMixin):
        raise ConfigError(f"model.converters: lora is applied twice to a {cls.__name__}; list it once")
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRAMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def add_adapter(linear: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
    """Give `linear` (in place) the adapters A (rank x in, from the global RNG) and B (out x rank, zeros),
    on the device of its weight; float32 unless the weight is a floating type of its own."""
    weight = linear.weight
    device = weight.device
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    a = torch.empty(rank, linear.in_features, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own init (PEFT's too); a no-op on meta
    b = torch.zeros(linear.out_features, rank, device=device, dtype=dtype)
    linear.__class__ = _lora_class(type(linear))
    linear.register_parameter("lora_a", nn.Parameter(a))
    linear.register_parameter("lora_b", nn.Parameter(b))
    setattr(linear, "lora_scale", alpha / rank)
    setattr(linear, "lora_dropout", nn.Dropout(dropout) if dropout > 0 else nn.Identity())


def is_lora(module: nn.Module) -> bool:
    return isinstance(module, LoRAMixin)


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_lora(m)]


# ---------------------------------------------------------------------------------------------
# The converter


def apply_lora(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Freeze `model` and add adapters to the targeted linears of every block; returns their names."""
    cfg = model.cfg
    suffixes = target_suffixes(lora, getattr(cfg, "mlp", "gelu") == "swiglu")
    model.requires_grad_(False)
    done = []
    blocks = cast(nn.ModuleList, model.blocks)
    for i, block in enumerate(blocks):
        for suffix in suffixes:
            linear = block.get_submodule(suffix)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"LoRA target blocks.{i}.{suffix} is a {type(linear).__name__}, not a linear layer")
            add_adapter(linear, lora.rank, lora.alpha, lora.dropout)
            done.append(f"blocks.{i}.{suffix}")
    return done


def lora_converter(model_cfg: Any) -> Any:
    """The `lora` converter factory (llmtrain/models/converters.py): settings from `model.lora`."""
    lora = getattr(model_cfg, "lora", None) or LoraConfig()

    def convert(model: nn.Module) -> None:
        apply_lora(model, lora)

    return convert


def merge_in_place(model: nn.Module) -> None:
    """The converter's way back (so `model.init_from` reads a LoRA checkpoint): every adapted linear becomes
    its own base class again, its weight W + (alpha / r) B A; a quantised base (QLoRA) becomes a plain float
    nn.Linear holding its dequantised weight plus the adapter. Trainability is left as the base had it."""
    for name, module in list(model.named_modules()):
        if not is_lora(module):
            continue
        a, b = module.get_parameter("lora_a"), module.get_parameter("lora_b")
        scale = cast(float, getattr(module, "lora_scale"))
        base_cls = type(module).__mro__[2]  # LoRA<cls> -> (LoRAMixin, cls)
        del module._parameters["lora_a"], module._parameters["lora_b"]
        del module._modules["lora_dropout"]
        module.__dict__.pop("lora_scale", None)
        module.__class__ = base_cls
        with torch.no_grad():
            merged = merged_weight(module.weight, a, b, scale)
            if base_cls is nn.Linear:  # a new tensor: the weight loaded into the module is not modified
                module.weight = nn.Parameter(merged.to(module.weight.dtype), module.weight.requires_grad)
                continue
            plain = nn.Linear(module.in_features, module.out_features, module.bias is not None, device=a.device)
            plain.weight.copy_(merged)
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)


register_converter("lora", lora_converter, unconvert=merge_in_place)


# ---------------------------------------------------------------------------------------------
# Merging


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A, in float32."""
    return weight.float() + scale * (b.float() @ a.float())


def merge_lora(model_cfg: Any, state_dict: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config without LoRA, plain float state dict) of a LoRA model's state dict: each adapted weight becomes
    W + (alpha / r) B A and the adapters are dropped. A quantised base (QLoRA) is dequantised, so the result
    is always a float model without converters. Configs without LoRA come back unchanged. `state_dict` is
    not modified."""
    from llmtrain.models.converters import build_converted_model, unconvert

    if getattr(model_cfg, "lora", None) is None:
        return model_cfg, state_dict
    with torch.device("meta"):
        model = build_converted_model(model_cfg)
    model.load_state_dict(state_dict, assign=True)
    if not unconvert(model, model_cfg):  # LoRA's merge, then the other converters' way back
        raise ConfigError(
            f"cannot merge: a converter of model.converters={model_cfg.converters} has no way back to a plain model"
        )
    plain: dict[str, Any] = {
        "lora": None,
        "converters": [],
        **({"weight_quant": None} if hasattr(model_cfg, "weight_quant") else {}),
    }
    return dataclasses.replace(model_cfg, **plain), {k: v.detach().float() for k, v in model.state_dict().items()}
