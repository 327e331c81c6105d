"""BERT <-> transformers' BertForPreTraining (and BertModel, which has no pre-training heads).

Our attention fuses q, k, v into one projection ([q; k; v] rows); transformers keeps three Linears.
Everything else maps one to one; the MLM decoder is tied to the token embedding in both (its bias is
`cls.predictions.bias`, the same tensor as `cls.predictions.decoder.bias` unless untied). A BertModel checkpoint (e.g. sentence encoders such as all-MiniLM-L6-v2) has
no MLM/NSP heads: `from_hf` gives them their fresh seeded init, so hidden states and the pooled state
are the checkpoint's, and the heads are ready to be trained (or ignored by a classifier).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmtrain.errors import UserError
from llmtrain.interop import size_name
from llmtrain.models.bert.config import BertConfig as BertModelConfig

HF_MODEL_TYPES = ("bert",)
# An export's tokenizer adds [CLS] A [SEP] (B [SEP]) and returns token_type_ids, as BERT's tokenizers do.
PAIR_TEMPLATE = True
HF_ARCHITECTURE = "BertForPreTraining"

# ours -> transformers, without the "bert." prefix of BertForPreTraining
_TRUNK = {
    "wte.weight": "embeddings.word_embeddings.weight",
    "wpe.weight": "embeddings.position_embeddings.weight",
    "wtt.weight": "embeddings.token_type_embeddings.weight",
    "ln_emb.weight": "embeddings.LayerNorm.weight",
    "ln_emb.bias": "embeddings.LayerNorm.bias",
    "pooler.weight": "pooler.dense.weight",
    "pooler.bias": "pooler.dense.bias",
}
_BLOCK = {
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "ln_1.weight": "attention.output.LayerNorm.weight",
    "ln_1.bias": "attention.output.LayerNorm.bias",
    "up.weight": "intermediate.dense.weight",
    "up.bias": "intermediate.dense.bias",
    "down.weight": "output.dense.weight",
    "down.bias": "output.dense.bias",
    "ln_2.weight": "output.LayerNorm.weight",
    "ln_2.bias": "output.LayerNorm.bias",
}
_QKV = ("query", "key", "value")
_HEADS = {  # ours -> full transformers name
    "mlm_dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "lm_head.bias": "cls.predictions.bias",
    "nsp_head.weight": "cls.seq_relationship.weight",
    "nsp_head.bias": "cls.seq_relationship.bias",
}


def exports(c: BertModelConfig) -> bool:
    return True  # every BERT config of the family (listed in its spec) has a twin


def to_hf(c: BertModelConfig, sd: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import BertConfig

    if c.num_labels:
        raise UserError(
            f"model.num_labels={c.num_labels}: export-hf writes BertForPreTraining; export the "
            "pre-trained model (num_labels=0), a classifier head has no place in it"
        )
    cfg = BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        intermediate_size=c.intermediate_size or 4 * c.n_embd,
        hidden_act="gelu",
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.dropout,
        max_position_embeddings=c.block_size,
        type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.norm_eps,
        initializer_range=c.init_std,
        tie_word_embeddings=c.tie_embeddings,
    )
    out = {f"bert.{hf}": sd[ours] for ours, hf in _TRUNK.items()}
    for i in range(c.n_layer):
        pre = f"bert.encoder.layer.{i}."
        for ours, hf in _BLOCK.items():
            out[pre + hf] = sd[f"blocks.{i}.{ours}"]
        for kind in ("weight", "bias"):
            for name, t in zip(_QKV, sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{pre}attention.self.{name}.{kind}"] = t.contiguous()
    out.update({hf: sd[ours] for ours, hf in _HEADS.items()})
    if not c.tie_embeddings:  # untied, transformers' decoder adds its own bias (a copy: safetensors shares none)
        out["cls.predictions.decoder.weight"] = sd["lm_head.weight"]
        out["cls.predictions.decoder.bias"] = sd["lm_head.bias"].clone()
    return cfg, out


def from_hf(cfg: Any, sd: dict[str, torch.Tensor]) -> tuple[BertModelConfig, dict[str, torch.Tensor]]:
    if cfg.hidden_act != "gelu":
        raise UserError(f"BERT import: activation '{cfg.hidden_act}' is not the exact (erf) GELU llmtrain uses")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise UserError(
            f"BERT import: position_embedding_type '{cfg.position_embedding_type}' is not supported; "
            "llmtrain's BERT has absolute learned positions"
        )
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    dropout = float(cfg.hidden_dropout_prob)
    ffn = None if cfg.intermediate_size == 4 * cfg.hidden_size else cfg.intermediate_size
    c = BertModelConfig(
        name="bert_debug",
        arch="bert",
        n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads,
        n_embd=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        block_size=cfg.max_position_embeddings,
        dropout=dropout,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        init_std=cfg.initializer_range,
        type_vocab_size=cfg.type_vocab_size,
        norm_eps=cfg.layer_norm_eps,
        intermediate_size=ffn,
    )
    out = {ours: sd[hf].float() for ours, hf in _TRUNK.items()}
    for i in range(c.n_layer):
        pre = f"encoder.layer.{i}."
        for ours, hf in _BLOCK.items():
            out[f"blocks.{i}.{ours}"] = sd[pre + hf].float()
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd[f"{pre}attention.self.{name}.{kind}"].float() for name in _QKV], dim=0
            )
    out.update(_heads(c, sd))
    return dataclasses.replace(c, name=size_name(c, "bert_debug")), out


def _heads(c: BertModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MLM and NSP heads: the checkpoint's, or a fresh seeded init when it has none (a BertModel)."""
    if all(hf in sd for hf in _HEADS.values()):
        out = {ours: sd[hf].float() for ours, hf in _HEADS.items()}
        # Untied, transformers' decoder adds its own bias parameter and `cls.predictions.bias` is unused.
        out["lm_head.bias"] = sd.get("cls.predictions.decoder.bias", sd["cls.predictions.bias"]).float()
    else:  # BERT's init (as Bert.init_weights), from a fixed seed so an import is reproducible
        g, C = torch.Generator().manual_seed(0), c.n_embd
        out = {
            "mlm_dense.weight": torch.randn(C, C, generator=g) * c.init_std,
            "mlm_dense.bias": torch.zeros(C),
            "mlm_ln.weight": torch.ones(C),
            "mlm_ln.bias": torch.zeros(C),
            "lm_head.bias": torch.zeros(c.vocab_size),
            "nsp_head.weight": torch.randn(2, C, generator=g) * c.init_std,
            "nsp_head.bias": torch.zeros(2),
        }
    out["lm_head.weight"] = (
        sd["embeddings.word_embeddings.weight"].float()
        if c.tie_embeddings
        else sd["cls.predictions.decoder.weight"].float()
    )
    return out
