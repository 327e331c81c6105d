"""The model families: `model.arch` -> its `ModelFamily` (spec.py). Adding a family is one folder under
llmtrain/models/ plus one line here."""

from __future__ import annotations

from typing import Any

from llmtrain.models.bert.family import FAMILY as BERT
from llmtrain.models.gpt.family import FAMILY as GPT
from llmtrain.models.spec import ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (GPT, BERT)}


def family_of(arch_or_cfg: Any, error: type[Exception] = ValueError) -> ModelFamily:
    """The family of a `model.arch` value, a model config or a model (its `cfg`)."""
    arch = arch_or_cfg
    if not isinstance(arch, str):
        arch = getattr(arch_or_cfg, "arch", None) or getattr(getattr(arch_or_cfg, "cfg", None), "arch", None)
    if arch not in FAMILIES:
        raise error(f"unknown model.arch '{arch}'; known: {', '.join(FAMILIES)}")
    return FAMILIES[arch]
