"""GPT decoder family: a plain single-device nn.Module (imports only torch).

One decoder, two flavours chosen by config (see GPTConfig): GPT-2 (learned positions, LayerNorm,
GELU MLP, biases, multi-head attention) and Llama (rotary positions, RMSNorm, SwiGLU MLP, no biases,
grouped-query attention); fixed sinusoidal positions are a third position option.

Shape legend:
    B  batch size            T  sequence length (new tokens)   S  key length (cached + new)
    C  n_embd (width)        nh query heads    nkv key/value heads    hs head size (C // nh)
    H  MLP hidden width      V  vocab_size

Forward reads embed -> blocks -> final norm -> head. Weights are set by `init_weights()` (not by the
constructor) so that a model built on the meta device and then materialised gets the same seeded
weights as one built directly, whatever the parallel layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import UserError
from llmtrain.models.config import RopeScaling
from llmtrain.models.gpt.config import GPTConfig
from llmtrain.models.gpt.moe import MoE


class LayerKV:
    """One block's cached keys and values (B, nkv, S, hs), grown as tokens are decoded."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Keys and values of every position seen so far, one LayerKV per block (for generation)."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerKV() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length


def rope_inv_freq(hs: int, theta: float, scaling: RopeScaling | None, device: torch.device) -> torch.Tensor:
    """Rotary inverse frequencies (hs/2,) in fp32, scaled as `scaling` says (the formulas transformers uses)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)  # (hs/2,)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":  # position interpolation: position p rotates as p / factor did
        return inv_freq / scaling.factor
    # llama3: a frequency whose wavelength exceeds the pre-training context / low_freq_factor is divided by
    # factor, one under context / high_freq_factor is kept, and those between blend the two smoothly.
    ctx, lo, hi = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > ctx / lo, inv_freq / scaling.factor, inv_freq)
    smooth = (ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= ctx / hi) & (wavelen <= ctx / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(
    start: int,
    T: int,
    hs: int,
    theta: float,
    device: torch.device,
    dtype: torch.dtype,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, hs) of positions start.. for rotary embeddings, computed in fp32."""
    inv_freq = rope_inv_freq(hs, theta, scaling, device)  # (hs/2,)
    angles = torch.arange(start, start + T, device=device, dtype=torch.float32)[:, None] * inv_freq  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs): frequency i pairs dims i and i + hs/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_cos_sin_at(
    positions: torch.Tensor, hs: int, theta: float, dtype: torch.dtype, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, hs) of the given positions (T,), computed in fp32 as `rope_cos_sin` does."""
    inv_freq = rope_inv_freq(hs, theta, scaling, positions.device)  # (hs/2,)
    angles = positions.to(torch.float32)[:, None] * inv_freq  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, n, T, hs) by position; the half-split layout (dim i with dim i + hs/2), as in Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SinusoidalPositions(nn.Module):
    """Fixed positions (Vaswani et al. 2017): sin on even and cos on odd dims; no parameters."""

    def __init__(self, n_embd: int):
        super().__init__()
        if n_embd % 2:
            raise UserError(f"model.pos=sinusoidal needs an even model.n_embd, got {n_embd}")
        self.n_embd = n_embd

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        inv_freq = 1.0 / 10000.0 ** (
            torch.arange(0, self.n_embd, 2, device=pos.device, dtype=torch.float32) / self.n_embd
        )
        angles = pos.float()[..., None] * inv_freq  # (T, C/2) or (B, T, C/2)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (T, C) or (B, T, C)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head or grouped-query causal attention; the fused qkv rows are [q (nh*hs); k (nkv*hs); v]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        n_kv = cfg.n_kv_head or cfg.n_head
        if cfg.head_dim is None and cfg.n_embd % cfg.n_head:
            raise UserError(
                f"model.n_embd={cfg.n_embd} must be divisible by model.n_head={cfg.n_head} (or set model.head_dim)"
            )
        if cfg.n_head % n_kv:
            raise UserError(f"model.n_head={cfg.n_head} must be divisible by model.n_kv_head={n_kv}")
        # Head counts are attributes, not derived from shapes, so tensor parallel can set local ones.
        self.n_head, self.n_kv_head, self.head_size = cfg.n_head, n_kv, cfg.head_dim or cfg.n_embd // cfg.n_head
        self.rope_theta = cfg.rope_theta if cfg.pos == "rope" else None
        if self.rope_theta is not None and self.head_size % 2:
            raise UserError(f"model.pos=rope needs an even head size, got {self.head_size}")
        if cfg.rope_scaling is not None and cfg.pos != "rope":
            raise UserError(
                f"model.rope_scaling scales rotary frequencies: it needs model.pos=rope (got "
                f"pos={cfg.pos}); remove model.rope_scaling or set model.pos=rope"
            )
        self.rope_scaling = cfg.rope_scaling
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * n_kv) * self.head_size, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * self.head_size, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerKV | None = None,
        mask: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hs = self.head_size
        q, k, v = self.qkv(x).split([self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        q = q.view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, -1, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, -1, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.rope_theta is not None:
            if token_index is not None:  # part of a longer sequence (context parallel): its own positions
                cos, sin = rope_cos_sin_at(token_index, hs, self.rope_theta, q.dtype, self.rope_scaling)
            else:
                start = cache.length if cache is not None else 0
                cos, sin = rope_cos_sin(start, T, hs, self.rope_theta, x.device, q.dtype, self.rope_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, S, hs)
        y = self.attend(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, nh*hs)
        return self.resid_dropout(self.proj(y))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The attention core on its own, so selective activation checkpointing can recompute just this.
        p = self.dropout if self.training else 0.0
        if k.size(1) != q.size(1):  # grouped-query: kv head j serves query heads j*rep .. (j+1)*rep-1
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
        if mask is not None:  # packed documents: (B, 1, T, T), causal inside each document only
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        T, S = q.size(2), k.size(2)
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        # new queries after S - T cached positions: query i sees keys 0 .. S - T + i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class MLP(nn.Module):
    """GELU: down(gelu(up x)). SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.intermediate_size or 4 * cfg.n_embd
        self.swiglu = cfg.mlp == "swiglu"
        self.approximate = cfg.gelu_approximate  # tanh (GPT-2) or none (exact erf)
        if self.swiglu:
            self.gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, H)
        else:
            h = F.gelu(self.up(x), approximate=self.approximate)  # (B, T, H)
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp: nn.Module
        if cfg.moe is not None:  # mixture of experts (Mixtral-style), moe.py
            self.mlp = MoE(cfg.n_embd, cfg.intermediate_size or 4 * cfg.n_embd, cfg.moe, cfg.dropout)
        else:
            self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerKV | None = None,
        mask: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask, token_index)
        return x + self.mlp(self.ln_2(x))


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query t sees key s <= t of the same document (block-diagonal causal)."""
    T = doc_ids.size(1)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # Absolute positions added to the embeddings; rotary positions live in the attention instead.
        self.wpe: nn.Module | None
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.pos == "sinusoidal":
            self.wpe = SinusoidalPositions(cfg.n_embd)
        else:
            self.wpe = None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) of input_ids (B, T); with a cache, input_ids follow the cached positions.

        Packed documents (data.doc_mask): doc_ids (B, T) keeps attention inside each document and
        position_ids (B, T) restarts absolute positions at each one (rotary positions are relative already).
        token_index (T,): where these tokens sit in a longer sequence when only parts of it are given (context
        parallel gives a rank its chunks; its attention cores see the rest); positions follow it.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence length {start + T} exceeds model.block_size={self.cfg.block_size}")
        x = self.wte(input_ids)  # (B, T, C)
        if self.wpe is not None:
            pos = position_ids if position_ids is not None else token_index
            if pos is None:
                pos = torch.arange(start, start + T, device=input_ids.device)
            x = x + self.wpe(pos)
        x = self.drop(x)
        mask = document_causal_mask(doc_ids) if doc_ids is not None else None
        for i, block in enumerate(self.blocks):
            if token_index is None:
                x = block(x, cache.layers[i] if cache is not None else None, mask)
            else:
                x = block(x, None, mask, token_index)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, unit norms, residual projections scaled."""
        std = self.cfg.init_std
        if self.cfg.tie_embeddings:  # materialising from the meta device (to_empty) unties them
            self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not (
                module is self.lm_head and self.cfg.tie_embeddings
            ):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
            if isinstance(bias := getattr(module, "bias", None), torch.Tensor):
                nn.init.zeros_(bias)
        # Each block adds two residual branches; scale their output projections so the residual
        # stream's variance does not grow with depth (GPT-2 paper, section 2.3).
        down_std = std / math.sqrt(2 * self.cfg.n_layer)
        for block in cast("Iterable[Block]", self.blocks):
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=down_std)
            if isinstance(block.mlp, MoE):
                block.mlp.init_weights(std, down_std)
            else:
                nn.init.normal_(cast("MLP", block.mlp).down.weight, mean=0.0, std=down_std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings and isinstance(self.wpe, nn.Embedding):
            n -= self.wpe.weight.numel()
        return n
