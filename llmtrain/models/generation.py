"""Token generation from any model mapping input_ids (B, T) -> logits (B, T, V)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from last-position logits (B, V) -> (B, 1). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    block_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Append `max_new_tokens` tokens to input_ids (B, T). The model sees at most the last `block_size`
    tokens. With a model that offers a KV cache (`new_cache()`, `model(ids, cache)`) and use_cache, each
    step runs only the new token; otherwise (or for a plain logits function) it recomputes the window.
    `stop(ids)` (B, T + new) -> True ends generation early (stop strings of an evaluation task)."""
    if not (use_cache and hasattr(model, "new_cache")):
        idx = input_ids
        for _ in range(max_new_tokens):
            logits = model(idx[:, -block_size:])[:, -1, :]  # (B, V)
            idx = torch.cat([idx, sample_next(logits, temperature, top_k, top_p, generator)], dim=1)
            if stop is not None and stop(idx):
                break
        return idx
    idx, cache, fresh = input_ids, None, input_ids[:, -block_size:]
    for _ in range(max_new_tokens):
        if cache is None or cache.length + fresh.size(1) > block_size:
            # Full window: start again from the last block_size tokens at positions 0.., exactly what
            # the uncached path feeds the model.
            cache, fresh = model.new_cache(), idx[:, -block_size:]
        logits = model(fresh, cache)[:, -1, :]  # (B, V)
        fresh = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat([idx, fresh], dim=1)
        if stop is not None and stop(idx):
            break
    return idx
