"""Model zoo: plain single-device nn.Modules that import only torch, one folder per family (registry.py)."""

from __future__ import annotations

from torch import nn

from llmtrain.models.config import MODEL_SIZES, ModelConfig, RopeScaling, apply_model_preset

__all__ = ["MODEL_SIZES", "ModelConfig", "RopeScaling", "apply_model_preset", "build_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model for `cfg` on the current default device (use torch.device('meta') to only count)."""
    from llmtrain.models.registry import family_of

    return family_of(cfg).build(cfg)
