"""Model zoo: plain single-device nn.Modules that import only torch."""

from __future__ import annotations

from llmtrain.models.config import MODEL_SIZES, ModelConfig, RopeScaling, apply_model_preset

__all__ = ["MODEL_SIZES", "ModelConfig", "RopeScaling", "apply_model_preset", "build_model"]


def build_model(cfg: ModelConfig):
    """Build the model for `cfg` on the current default device (use torch.device('meta') to only count)."""
    if cfg.arch == "gpt":
        from llmtrain.models.gpt import GPT

        return GPT(cfg)
    if cfg.arch == "bert":
        from llmtrain.models.bert import Bert, BertForSequenceClassification

        return BertForSequenceClassification(cfg) if cfg.num_labels else Bert(cfg)
    raise ValueError(f"unknown model.arch '{cfg.arch}'")
