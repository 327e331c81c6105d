"""Objectives: a loss over a batch. The trainer knows only this interface, so causal LM, masked LM and
distillation plug in without `if` branches in the loop."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the scalar loss of `model` on `batch` (mean over non-ignored targets)."""
        ...


class CausalLM:
    """Next-token cross-entropy; labels equal to -100 are ignored."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # data.doc_mask batches carry position_ids and doc_ids: attention stays inside each packed document.
        docs = {k: batch[k] for k in ("position_ids", "doc_ids") if k in batch}
        logits = model(batch["input_ids"], **docs)  # (B, T, V)
        labels = batch["labels"]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


# model.arch -> the objective it pre-trains with. Components add their own entries here.
OBJECTIVES: dict[str, type] = {"gpt": CausalLM}


def objective_for(arch: str) -> Objective:
    if arch not in OBJECTIVES:
        raise ValueError(f"no training objective for model.arch '{arch}'; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[arch]()
