"""Objectives: a loss over a batch. The trainer knows only this interface, so causal LM, masked LM and
distillation plug in without `if` branches in the loop. The interface lives in llmtrain/models/objective.py
and each model family's objective in its folder; this module keeps the names importable from here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llmtrain.models.bert.objective import BertObjective, MaskedLMWithNSP, SequenceClassification
from llmtrain.models.gpt.objective import CausalLM
from llmtrain.models.objective import MetricSums, Objective, local_loss, pop_metrics
from llmtrain.models.registry import FAMILIES, family_of

if TYPE_CHECKING:
    from llmtrain.models.config import ModelConfig

__all__ = [
    "MetricSums",
    "Objective",
    "local_loss",
    "pop_metrics",
    "CausalLM",
    "MaskedLMWithNSP",
    "SequenceClassification",
    "BertObjective",
    "OBJECTIVES",
    "objective_for",
]

# model.arch -> the objective it trains with (each family's spec names it).
OBJECTIVES: dict[str, Callable[[], Objective]] = {name: f.objective for name, f in FAMILIES.items()}


def objective_for(arch: str | ModelConfig) -> Objective:
    """The objective of the family `arch` (a model.arch value or a model config)."""
    return family_of(arch).objective()
