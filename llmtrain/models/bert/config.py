"""The encoder's config: the common keys plus segments and the classifier head."""

from __future__ import annotations

from dataclasses import dataclass

from llmtrain.models.config import ModelConfig


@dataclass
class BertConfig(ModelConfig):
    # Named size this config starts from (see MODEL_SIZES); other model.* keys override it.
    name: str = "bert_debug"
    # Model family (llmtrain/models/registry.py).
    arch: str = "bert"
    # Number of segment (token type) embeddings; 2 for sentence A / sentence B.
    type_vocab_size: int = 2
    # Fine-tuning: classes of the sequence-classification head (0 = pre-training heads only).
    num_labels: int = 0
