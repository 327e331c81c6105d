"""BERT's pipeline split moved to its family folder (llmtrain/models/bert/pipeline.py); kept importable here."""

from llmtrain.models.bert.pipeline import (
    Embeddings,
    EncoderBlock,
    PreTrainingHeads,
    WordEmbedding,
    bert_pipeline_layers,
    bert_split,
)

__all__ = ["EncoderBlock", "Embeddings", "PreTrainingHeads", "WordEmbedding", "bert_pipeline_layers", "bert_split"]
