"""The decoder as a flat list of pipeline layers: embed -> positions -> blocks -> final norm -> head.

Torch only. Each layer reuses the plain model's own (already initialised) modules, so every layout starts
from the same weights. The token embedding and the output head share one weight: the split describes
them as one `TiedLayer`, which llmtrain/parallel/pipeline.py builds on the first and the last stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from llmtrain.models.spec import PipelineSplit, TiedLayer

if TYPE_CHECKING:
    from llmtrain.models.gpt.model import GPT


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class _Reuse(nn.Module):
    """A pipeline layer built from an existing module of the plain model (no new weights)."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.inner, self.fn = module, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.inner, x)


class TiedEmbedding(nn.Module):
    """The token embedding and the output head that shares its weight, as one module: built on the first
    stage (used as `embed`) and on the last (used as `head`), the two kept equal. Holding the model's own
    modules keeps their behaviour, tensor-parallel ones included."""

    def __init__(self, embed: nn.Module, head: nn.Module):
        super().__init__()
        self.embed, self.head = embed, head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # (B, T, C)


class Positions(nn.Module):
    """Adds the model's absolute positions, if any (rotary ones live in the blocks), and embedding
    dropout. Keeps the attribute name `wpe` so the family's no-decay rule finds it under the pipeline's
    names too."""

    def __init__(self, wpe: nn.Module | None, drop: nn.Module):
        super().__init__()
        self.wpe, self.drop = wpe, drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(x.shape[1], device=x.device))
        return self.drop(x)  # (B, T, C)


def _head(tied: TiedEmbedding, x: torch.Tensor) -> torch.Tensor:
    return tied.head(x)  # (B, T, V), or its vocabulary shard with tensor parallel


def gpt_pipeline_layers(model: GPT) -> list[Any]:
    """The plain GPT as a flat list of pipeline layers (modules and tied layers), outermost first."""
    embed: TiedLayer | nn.Module
    head: TiedLayer | nn.Module
    if model.cfg.tie_embeddings:
        embed = TiedLayer("embed", TiedEmbedding, (model.wte, model.lm_head), weight_attr="embed.weight")
        head = TiedLayer(
            "embed", TiedEmbedding, (model.wte, model.lm_head), weight_attr="embed.weight", forward_fn=_head
        )
    else:
        embed, head = _Reuse(model.wte, _call), _Reuse(model.lm_head, _call)
    positions = Positions(model.wpe, model.drop)
    return [embed, positions, *model.blocks, model.ln_f, head]


def gpt_split(model: nn.Module) -> PipelineSplit:
    model = cast("GPT", model)  # the family's plain model (ModelFamily.pipeline_split)
    return PipelineSplit(
        gpt_pipeline_layers(model),
        f"embed, positions, {len(model.blocks)} blocks, final norm, head",
        inputs=lambda mb: mb["input_ids"],
        labels=lambda mb: mb["labels"],
        as_batch=lambda labels: {"input_ids": None, "labels": labels},
        decoder=True,
    )
