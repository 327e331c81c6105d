"""Model converters: named transformations of the plain model, listed in `model.converters`.

A converter swaps or adds modules of the plain single-device model (quantised linears, LoRA adapters,
MoE layers) before any parallelism is applied. The order is fixed, everywhere a model is built:

    build_model -> init_weights -> model.init_from -> converters (in list order)
      -> tensor parallel -> activation checkpointing -> compile -> engine (ZeRO / pipeline)

so a converter sees a plain, initialised model with its pre-trained weights (LoRA on a base), and every
parallel layout sees the converted one. Parameters a converter adds are ordinary parameters of the plain
model: they get plain names (`blocks.0.attn.qkv.lora_a`), train, go into the layout-independent
checkpoint and come back through `load_model_weights`, because every reader rebuilds the model from the
checkpoint's config.yaml, which lists the same converters (`build_converted_model`).

Register a converter under a name; `model.converters: [name, ...]` picks it:

    def factory(model_cfg) -> Callable[[nn.Module], None]:   # reads its settings from the model config
        def convert(model): ...                               # in place, on the plain model
        return convert
    register_converter("my_lora", factory)

A name `package.module:factory` needs no registration: it is imported and registered on first use (so
launcher processes find it without importing it themselves).

What a converter must do:
- Work in place and on the meta device too (readers build the model on "meta" to learn its names and
  shapes): create new tensors on the device and dtype of the ones they sit beside, and initialise them
  from `torch`'s global RNG (the trainer seeds it), so every rank and layout gets the same values.
- Keep the names of what it replaces: a quantised linear that subclasses `nn.Linear` keeps `.weight`, so
  `model.init_from`, the tensor-parallel plans (which match module names and accept `nn.Linear`
  subclasses) and pruning still find it.
- Follow the training step, if its forward changes with it (QAT's fake quantisation from `quant.start_step`),
  through `add_step_hook(model, hook)`: the trainer calls `hook(step)` before every optimizer step with the
  0-based index of that step, and once before the first one (after a resume: the index of the last step
  run), so the state is a function of the step and a resume restores it without checkpointing anything.
  Modules whose forward a tensor-parallel layer replaces keep a `weight_transform` (see tensor_parallel.py).
- Freeze with `requires_grad_(False)`: the optimizer leaves frozen parameters out, and the layout-independent
  checkpoint stores them as weights only, or, when the model came from `model.init_from`, not at all: a
  pointer to that base (llmtrain/parallel/universal.py) from which resumes and readers rebuild them
  (LoRA: llmtrain/models/lora.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from llmtrain.errors import UserError

if TYPE_CHECKING:
    from llmtrain.models.config import ModelConfig

Convert = Callable[[nn.Module], None]
ConverterFactory = Callable[[Any], Convert]  # model config -> convert(model), in place

_REGISTRY: dict[str, ConverterFactory] = {}
_UNCONVERT: dict[str, Convert] = {}

# Converters that ship with llmtrain: the module registers them when imported, on first use of the name.
BUILTIN: dict[str, str] = {"quantized_weights": "llmtrain.compress.quant.linear", "lora": "llmtrain.models.lora"}


def register_converter(name: str, factory: ConverterFactory, unconvert: Convert | None = None) -> None:
    """Make `factory` available as `model.converters: [name]`. Registering another factory under a
    taken name is an error (two plugins must not silently replace each other). `unconvert(model)`, if
    given, turns a converted model back into the plain one in place (e.g. dequantised linears), so
    `model.init_from` can read a converted checkpoint."""
    if _REGISTRY.get(name, factory) is not factory:
        raise ValueError(f"a model converter named {name!r} is already registered ({_REGISTRY[name]!r})")
    _REGISTRY[name] = factory
    if unconvert is not None:
        _UNCONVERT[name] = unconvert


def unconvert(model: nn.Module, model_cfg: ModelConfig) -> bool:
    """Undo `model_cfg.converters` on `model` in reverse order (in place); False, untouched, when one of
    them registered no way back."""
    names = list(getattr(model_cfg, "converters", None) or [])
    for name in names:
        converter(name)  # registers built-in and module:factory names
    if any(name not in _UNCONVERT for name in names):
        return False
    for name in reversed(names):
        _UNCONVERT[name](model)
    return True


def registered_converters() -> list[str]:
    return sorted(_REGISTRY)


def converter(name: str) -> ConverterFactory:
    """The factory registered as `name` (a `module:attr` name is imported and registered first)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY and ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(
                f"model.converters: cannot import {name!r} ({exc}); give 'package.module:factory' "
                f"of an importable module"
            ) from None
        register_converter(name, factory)
    if name not in _REGISTRY:
        known = ", ".join(registered_converters()) or "none registered"
        raise UserError(
            f"model.converters: unknown converter {name!r} (known: {known}); register it with "
            f"llmtrain.models.converters.register_converter before the model is built, or name it "
            f"as 'package.module:factory'"
        )
    return _REGISTRY[name]


def apply_converters(model: nn.Module, model_cfg: ModelConfig) -> list[str]:
    """Apply `model_cfg.converters` to the plain `model` in list order; returns the names applied."""
    names = list(getattr(model_cfg, "converters", None) or [])
    for name in names:
        converter(name)(model_cfg)(model)
    return names


def add_step_hook(model: nn.Module, hook: Callable[[int], None]) -> None:
    """Call `hook(step)` whenever the trainer moves `model` to optimizer step `step` (0-based)."""
    model.__dict__.setdefault("_llmtrain_step_hooks", []).append(hook)


def at_step(model: nn.Module, step: int) -> None:
    """The trainer: `model` now runs (or was last trained by) optimizer step `step` (0-based)."""
    for hook in model.__dict__.get("_llmtrain_step_hooks", ()):
        hook(step)


def build_converted_model(model_cfg: ModelConfig) -> nn.Module:
    """The plain model of `model_cfg` with its converters applied, not initialised: what a checkpoint of
    that config holds (readers load its weights into it). Works under `torch.device("meta")`."""
    import dataclasses

    from llmtrain.models import build_model

    model = build_model(dataclasses.replace(model_cfg, init_from=None))
    apply_converters(model, model_cfg)
    return model
