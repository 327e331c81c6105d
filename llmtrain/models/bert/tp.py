"""BERT's tensor-parallel plans (module-name pattern -> style of llmtrain/parallel/tensor_parallel.py)."""

from __future__ import annotations

from torch import nn

from llmtrain.models.bert.model import Bert

# The trunk (BertForSequenceClassification's whole plan; its MLP sits in the block).
BERT_TP_PLAN: dict[str, str] = {
    "wte": "vocab_embed",
    "blocks.*.attn": "heads",
    "blocks.*.attn.qkv": "column_qkv",
    "blocks.*.attn.proj": "row",
    "blocks.*.up": "column",
    "blocks.*.down": "row",
}
# Bert (MLM + NSP): the masked-LM decoder (tied to wte, with its own output bias) is vocabulary-parallel.
BERT_PRETRAIN_TP_PLAN: dict[str, str] = {**BERT_TP_PLAN, "lm_head": "vocab_head"}


def tp_plan(model: nn.Module) -> dict[str, str]:
    return BERT_PRETRAIN_TP_PLAN if isinstance(model, Bert) else BERT_TP_PLAN
