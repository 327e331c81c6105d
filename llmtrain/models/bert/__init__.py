"""The encoder family (BERT): model, config, objectives, TP plans, pipeline split, spec."""

from llmtrain.models.bert.config import BertConfig
from llmtrain.models.bert.model import Bert, BertForSequenceClassification, BertTrunk, Block, SelfAttention
from llmtrain.models.bert.objective import BertObjective, MaskedLMWithNSP, SequenceClassification

__all__ = [
    "Bert",
    "BertConfig",
    "BertForSequenceClassification",
    "BertObjective",
    "BertTrunk",
    "Block",
    "MaskedLMWithNSP",
    "SelfAttention",
    "SequenceClassification",
]
