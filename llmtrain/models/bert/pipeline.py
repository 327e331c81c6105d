"""Pipeline parallel for the BERT encoder: the plain `Bert` (MLM + NSP heads) as a flat list of pipeline
layers (torch only; llmtrain/parallel/pipeline.py builds the stages with DeepSpeed).

Layers, outermost first, each reusing the plain model's own modules (no new weights):

    word embedding (tied) -> positions + segments + LayerNorm -> blocks -> pooler + MLM / NSP heads -> tie

Stages pass the tuple (hidden (B, T, C), attention_mask (B, T), mlm_positions (B, T)). Only the hidden
states are floating point: DeepSpeed marks received floating-point tensors as needing grad and sends
gradients back for those alone, so the two int64 masks ride along without gradients. Every block applies
the key-padding mask exactly as `BertTrunk.encode` does, and the heads project only the masked-LM
positions onto the vocabulary, as `Bert.forward` does with `mlm_positions`. Those positions are where
the MLM labels are not -100; the runner derives them before the batch enters the first stage, because
DeepSpeed hands the labels (mlm_labels, nsp_labels) to the loss function on the last stage only.

The masked-LM decoder (`lm_head`) shares its weight with the word embedding. `TiedLayer("word")`
builds the embedding on the first stage and again, as the last layer, on the last stage, where it only
registers the tie: there `lm_head.weight` *is* that copy's weight (one Parameter of the plain model), so
DeepSpeed all-reduces its gradient between the two stages and counts it once in the gradient norm.
The decoder's bias is not tied and lives on the last stage only, with the other heads. With tensor
parallel the layers hold the model's sharded modules: the tie is then between the two stages' copies of
this rank's vocabulary shard, and the bias is split on the same rows (tensor_parallel.py).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import UserError
from llmtrain.models.bert.model import Bert
from llmtrain.models.spec import PipelineSplit, TiedLayer

Hidden = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden (B, T, C), attention_mask, mlm_positions


class WordEmbedding(nn.Module):
    """The token embedding, on the first stage (and, for the tie, on the last)."""

    def __init__(self, wte: nn.Embedding):
        super().__init__()
        self.wte = wte

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, token_type_ids, attention_mask, mlm_positions = inputs
        return self.wte(input_ids), token_type_ids, attention_mask, mlm_positions  # (B, T, C), ...


class Embeddings(nn.Module):
    """Adds absolute positions and segments, then LayerNorm and dropout (`BertTrunk.encode`). Keeps the
    attribute name `wpe` so the family's no-decay rule for position tables finds it here too."""

    def __init__(self, wpe: nn.Module, wtt: nn.Module, ln_emb: nn.Module, drop: nn.Module):
        super().__init__()
        self.wpe, self.wtt, self.ln_emb, self.drop = wpe, wtt, ln_emb, drop

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> Hidden:
        x, token_type_ids, attention_mask, mlm_positions = inputs
        x = x + self.wpe(torch.arange(x.shape[1], device=x.device)) + self.wtt(token_type_ids)  # (B, T, C)
        return self.drop(self.ln_emb(x)), attention_mask, mlm_positions


class EncoderBlock(nn.Module):
    """One post-LN block with the padding mask. The class name contains "Block": the `layers` partition
    (DeepSpeed's `type:Block`) balances stages by these."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, inputs: Hidden) -> Hidden:
        x, attention_mask, mlm_positions = inputs
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padded keys are never attended to
        return self.block(x, mask), attention_mask, mlm_positions


class PreTrainingHeads(nn.Module):
    """Tanh pooler over [CLS], next-sentence head, and the masked-LM head on the chosen positions only."""

    def __init__(
        self, pooler: nn.Module, mlm_dense: nn.Module, mlm_ln: nn.Module, lm_head: nn.Module, nsp_head: nn.Module
    ):
        super().__init__()
        self.pooler, self.mlm_dense, self.mlm_ln = pooler, mlm_dense, mlm_ln
        self.lm_head, self.nsp_head = lm_head, nsp_head

    def forward(self, inputs: Hidden) -> tuple[torch.Tensor, torch.Tensor]:
        x, _, mlm_positions = inputs
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, C)
        h = self.mlm_ln(F.gelu(self.mlm_dense(x[mlm_positions.bool()])))  # (N, C)
        return self.lm_head(h), self.nsp_head(pooled)  # (N, V), (B, 2)


def _tie_only(_tied: WordEmbedding, outputs: Any) -> Any:
    return outputs  # the last stage's copy is used by lm_head (same Parameter); this layer only ties it


def bert_pipeline_layers(model: nn.Module) -> list[Any]:
    """The plain `Bert` as a flat list of pipeline layers (modules and tied specs), outermost first."""
    if not isinstance(model, Bert):
        raise UserError(
            f"pipeline parallel supports BERT pre-training (MLM + NSP), not {type(model).__name__}; set parallel.pp=1"
        )
    first: TiedLayer | nn.Module
    if model.cfg.tie_embeddings:
        first = TiedLayer("word", WordEmbedding, (model.wte,), weight_attr="wte.weight")
        tie = [TiedLayer("word", WordEmbedding, (model.wte,), weight_attr="wte.weight", forward_fn=_tie_only)]
    else:
        first, tie = WordEmbedding(model.wte), []
    heads = PreTrainingHeads(model.pooler, model.mlm_dense, model.mlm_ln, model.lm_head, model.nsp_head)
    embeddings = Embeddings(model.wpe, model.wtt, model.ln_emb, model.drop)
    return [first, embeddings, *(EncoderBlock(b) for b in model.blocks), heads, *tie]


def _inputs(mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return mb["input_ids"], mb["token_type_ids"], mb["attention_mask"], (mb["mlm_labels"] != -100).long()


def _as_batch(labels: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    # MaskedLMWithNSP reads the inputs' keys only to call the model, whose output the pipeline already has
    return {
        "input_ids": None,
        "token_type_ids": None,
        "attention_mask": None,
        "mlm_labels": labels[0],
        "nsp_labels": labels[1],
    }


def bert_split(model: nn.Module) -> PipelineSplit:
    layers = bert_pipeline_layers(model)  # checks that model is a Bert
    model = cast(Bert, model)
    tie = ", tied word embedding" if model.cfg.tie_embeddings else ""
    return PipelineSplit(
        layers,
        f"word embedding, embeddings, {len(model.blocks)} blocks, pre-training heads{tie}",
        inputs=_inputs,
        labels=lambda mb: (mb["mlm_labels"], mb["nsp_labels"]),
        as_batch=_as_batch,
        decoder=False,
    )
