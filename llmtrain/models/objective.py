"""What an objective is (a loss over a batch) and the helpers every objective and runner shares.

Torch only: the parallel runners call objectives, and each model family defines its own objective in
its folder, so the interface lives beside the models, below `llmtrain.parallel` and `llmtrain.train`."""

from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    """Optional members the trainer reads with getattr: `generative` (True when the model maps input_ids
    to next-token logits, so an end-of-run text sample makes sense) and `pop_metrics(training)` (means of
    the loss's parts since the last call, e.g. mlm_loss / nsp_loss, logged beside the loss), `perplexity`
    (default True; False when the loss is not a mean token cross-entropy, e.g. DPO's: eval records and lines
    then carry no perplexity) and `headline_metrics` (names of pop_metrics entries the final `done:` line
    shows after the held-out loss)."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the scalar loss of `model` on `batch` (mean over non-ignored targets)."""
        ...


def pop_metrics(objective: Objective, training: bool) -> dict[str, torch.Tensor]:
    """The objective's extra metrics over its training (or eval) calls since the last pop; {} if it has none."""
    pop = getattr(objective, "pop_metrics", None)
    return pop(training) if pop is not None else {}


class MetricSums:
    """Running sums of detached per-call metrics, kept apart for training and eval forwards (no device sync).

    A forward with autograd on is a training call, one without (the runner's eval) an eval call; the
    module's `.training` flag cannot tell them apart, as DeepSpeed's engine keeps its own set."""

    def __init__(self) -> None:
        self._sums: dict[bool, dict[str, torch.Tensor]] = {True: {}, False: {}}
        self._calls = {True: 0, False: 0}

    def add(self, **values: torch.Tensor) -> None:
        training = torch.is_grad_enabled()
        sums = self._sums[training]
        for k, v in values.items():
            sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
        self._calls[training] += 1

    def pop(self, training: bool) -> dict[str, torch.Tensor]:
        out = {k: v / self._calls[training] for k, v in self._sums[training].items()}
        self._sums[training], self._calls[training] = {}, 0
        return out


def local_loss(loss: torch.Tensor) -> torch.Tensor:
    """With tensor parallel, vocabulary-sharded logits (a DTensor) give a replicated DTensor loss (under
    `loss_parallel`); its local value is the loss, and a plain tensor adds to the other parts and metrics."""
    return loss.to_local() if hasattr(loss, "to_local") else loss
