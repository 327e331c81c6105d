"""BERT encoder (Devlin et al. 2018): a plain single-device nn.Module (imports only torch).

Shape legend:
    B  batch size            T  sequence length         C  n_embd (hidden width)
    nh number of heads       hs head size (C // nh)     V  vocab_size
    N  number of masked-LM positions in the batch       K  number of classes

Forward reads embed (token + position + segment, LayerNorm) -> post-LN blocks -> heads. Unlike the
GPT decoder, every block normalises *after* each residual sum, as in the original, and attention is
bidirectional with a key padding mask. Two models share the trunk (same parameter names, so a
pre-trained checkpoint's trunk loads into the classifier as is):

- `Bert`: pre-training heads, masked-LM (dense + GELU + LayerNorm, then a decoder tied to the token
  embedding plus a bias) and next-sentence prediction on the pooled [CLS] state;
- `BertForSequenceClassification`: a linear classifier on the pooled [CLS] state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import UserError
from llmtrain.models.bert.config import BertConfig


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; q, k, v from one fused projection."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise UserError(f"model.n_embd={cfg.n_embd} must be divisible by model.n_head={cfg.n_head}")
        self.n_head, self.head_size, self.dropout = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, 3C) -> 3 x (B, nh, T, hs); the head count follows from the width, so a
        # column-sharded qkv (local heads only) runs this same code.
        q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=2))
        y = self.attend(q, k, v, mask)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # The attention core on its own, so selective activation checkpointing can recompute just this.
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class Block(nn.Module):
    """Post-LN encoder block: x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        hidden = cfg.intermediate_size or 4 * cfg.n_embd
        self.up = nn.Linear(cfg.n_embd, hidden)
        self.down = nn.Linear(hidden, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x, mask)))
        return self.ln_2(x + self.drop(self.down(F.gelu(self.up(x)))))


class BertTrunk(nn.Module):
    """Embeddings, encoder blocks and the tanh pooler over [CLS]; the heads live in subclasses."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)  # segment A / B
        self.ln_emb = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd)

    def encode(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, T, C) of the last block and the pooled [CLS] state (B, C).

        attention_mask (B, T) is 1 for real tokens and 0 for padding (keys that are never attended to).
        """
        B, T = input_ids.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.cfg.block_size}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos) + self.wtt(token_type_ids)  # (B, T, C)
        x = self.drop(self.ln_emb(x))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask)
        return x, torch.tanh(self.pooler(x[:, 0]))

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT init: N(0, init_std) weights and embeddings, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not self._is_tied(module):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
            if isinstance(bias := getattr(module, "bias", None), torch.Tensor):
                nn.init.zeros_(bias)

    def _is_tied(self, module: nn.Module) -> bool:
        return False

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings:
            n -= self.wpe.weight.numel() + self.wtt.weight.numel()
        return n


class Bert(BertTrunk):
    """BERT with its pre-training heads: masked LM and next-sentence prediction."""

    def __init__(self, cfg: BertConfig):
        super().__init__(cfg)
        self.mlm_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlm_ln = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)  # the bias is BERT's output bias
        self.nsp_head = nn.Linear(cfg.n_embd, 2)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked-LM logits, next-sentence logits (B, 2)).

        The masked-LM logits are (B, T, V), or (N, V) for only the positions where the bool mask
        `mlm_positions` (B, T) is True: training predicts ~15% of the tokens, so the vocabulary
        projection (the largest matmul at small widths) runs on those alone.
        """
        h, pooled = self.encode(input_ids, token_type_ids, attention_mask)
        if mlm_positions is not None:
            h = h[mlm_positions]  # (N, C)
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        return self.lm_head(h), self.nsp_head(pooled)

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.cfg.tie_embeddings:  # materialising from the meta device (to_empty) unties them
            self.lm_head.weight = self.wte.weight
        super().init_weights()

    def _is_tied(self, module: nn.Module) -> bool:
        return module is self.lm_head and self.cfg.tie_embeddings


class BertForSequenceClassification(BertTrunk):
    """BERT trunk + dropout + a linear classifier over the pooled [CLS] state: logits (B, K)."""

    # model.init_from loads a pre-trained trunk and leaves these fresh (see parallel/consolidate.py).
    task_head_prefixes = ("classifier.",)

    def __init__(self, cfg: BertConfig):
        super().__init__(cfg)
        if cfg.num_labels < 2:
            raise UserError(f"model.num_labels={cfg.num_labels}: a classifier needs at least 2 classes")
        self.classifier = nn.Linear(cfg.n_embd, cfg.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _, pooled = self.encode(input_ids, token_type_ids, attention_mask)
        return self.classifier(self.drop(pooled))  # (B, K)
