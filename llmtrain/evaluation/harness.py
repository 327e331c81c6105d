"""An lm-evaluation-harness `LM` for llmtrain decoders: loglikelihood, rolling loglikelihood, generation.

Importing this module imports `lm_eval`; `llmtrain.evaluation.run.require_lm_eval` says how to install it.
The backend takes any function input_ids (B, T) -> logits (B, T, V): a loaded decoder (generation then
uses its KV cache) or a training runner's `logits` (every rank calls it in lockstep). Tokenization,
context/continuation splitting and rolling windows are lm-eval's own (`TemplateLM`, the same code its
`hf` backend uses), so both backends score the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

if TYPE_CHECKING:
    from llmtrain.data.tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256


class LlmtrainLM(TemplateLM):
    """lm-eval backend over a decoder `model` (ids -> logits) with window `block_size` and an llmtrain
    tokenizer (`encode`, `decode`, `eos_id`). Requests run `batch_size` at a time, longest first.

    With `shard` and torch.distributed up, each rank holds a whole model and lm-eval gives it every
    world_size-th document; the per-document metrics are gathered on rank 0 (the only rank with results).
    Without it (a training runner's collective forward) every rank runs every request."""

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        tokenizer: Tokenizer,
        block_size: int,
        device: str | torch.device,
        batch_size: int = 8,
        shard: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.block_size = model, tokenizer, block_size
        self._device, self.batch_size = torch.device(device), batch_size
        if shard and dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", batch_size: int = 8, shard: bool = True
    ) -> LlmtrainLM:
        """Any model `llmtrain eval` reads: run, checkpoint, consolidated, pruned or imported directory."""
        from llmtrain.inference import checkpoint_tokenizer, load_decoder

        cfg, model = load_decoder(path, device)
        return cls(model, checkpoint_tokenizer(path), cfg.block_size, device, batch_size, shard)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world_size, ...) of every rank's `tensor` (lm-eval pads ranks with fewer requests by it)."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        dist.barrier()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy choice) per request.

        Context is cut on the left to the window (as the `hf` backend does); a continuation longer than the
        window is scored in window-sized pieces, each after as much of what precedes it as fits."""
        pieces, owner = [], []
        for n, (_, ctx, cont) in enumerate(requests):
            whole = ctx + cont
            for a in range(len(ctx), len(whole), self.max_length):
                pieces.append((whole[:a], whole[a : a + self.max_length]))
                owner.append(n)
        totals: list[list[Any]] = [[0.0, True] for _ in requests]
        for n, (ll, greedy) in zip(owner, self._score(pieces, disable_tqdm)):
            totals[n][0] += ll
            totals[n][1] &= greedy
        out = [(float(ll), bool(g)) for ll, g in totals]
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    @torch.no_grad()
    def _score(self, pieces: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Batched forward of (context, continuation <= window) pairs, longest first. Rows are right-padded:
        a causal model's earlier positions never see the padding."""
        order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0]) - len(pieces[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pieces)
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=disable_tqdm or None):
            chunk = order[start : start + self.batch_size]
            wholes = [(pieces[i][0] + pieces[i][1])[-(self.max_length + 1) :] for i in chunk]
            ids = torch.zeros(len(chunk), max(len(w) - 1 for w in wholes), dtype=torch.long)
            for row, whole in enumerate(wholes):
                ids[row, : len(whole) - 1] = torch.tensor(whole[:-1])
            logits = self.model(ids.to(self.device))  # (B, T, V)
            for row, i in enumerate(chunk):
                cont, end = pieces[i][1], len(wholes[row]) - 1
                # (n, V): only the positions that predict the continuation (a full (B, T, V) in fp32 is big)
                lp = F.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)
                target = torch.tensor(cont, device=lp.device)
                out[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: disjoint windows of `block_size` predicted tokens, the first
        predicted from EOS (the document separator of llmtrain's training stream)."""
        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(w)))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, per the task's gen_kwargs) continuations, cut at the task's stop strings.
        Requests with the same context length and settings run as one batch."""
        encoded = [self.tok_encode(req.args[0])[-self.max_length :] or [self.prefix_token_id] for req in requests]
        groups: dict[tuple[int, str], list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault((len(encoded[i]), repr(sorted(req.args[1].items()))), []).append(i)
        out: list[str] = [""] * len(requests)
        batches = [ids[s : s + self.batch_size] for ids in groups.values() for s in range(0, len(ids), self.batch_size)]
        for chunk in tqdm(batches, desc="generate_until", disable=disable_tqdm or None):
            texts = self._generate([encoded[i] for i in chunk], dict(requests[chunk[0]].args[1]))
            for i, text in zip(chunk, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    @torch.no_grad()
    def _generate(self, contexts: list[list[int]], kwargs: dict[str, Any]) -> list[str]:
        from llmtrain.models.generation import generate

        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", True) else 0.0
        prompt = torch.tensor(contexts, dtype=torch.long, device=self.device)
        n = prompt.size(1)

        def done(idx: torch.Tensor) -> bool:
            return all(
                self.eot_token_id in row or any(u in self.tok_decode(row) for u in until) for row in idx[:, n:].tolist()
            )

        gen = torch.Generator(device=self.device).manual_seed(int(kwargs.pop("seed", 0)))
        idx = generate(
            self.model,
            prompt,
            max_new,
            self.block_size,
            temperature=temperature,
            top_k=kwargs.pop("top_k", None),
            top_p=kwargs.pop("top_p", None),
            generator=gen,
            stop=done,
        )
        texts = []
        for row in idx[:, n:].tolist():
            if self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            text = self.tok_decode(row)
            for u in until:
                text = text.split(u)[0]
            texts.append(text)
        return texts
