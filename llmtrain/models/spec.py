"""What a model family provides, in one place (`ModelFamily`), and the structure passes rely on.

Every pass outside a family's folder (tensor parallel, pipeline split, pruning, distillation, FLOPs,
weight decay, Hugging Face interop, config validation) asks the family's spec instead of branching on
`model.arch` or a class name. A family is one folder under `llmtrain/models/` plus one line in
`registry.py`; see DEVELOPERS.md, "Adding a model family". Torch only: the pipeline split is described
here without DeepSpeed (`TiedLayer`) and `llmtrain/parallel/pipeline.py` turns it into DeepSpeed's specs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from llmtrain.models.objective import Objective

NamedParams = Iterable[tuple[str, Any]]


@runtime_checkable
class Transformer(Protocol):
    """The structure that passes rely on: activation checkpointing and compile wrap `blocks[i]`,
    selective checkpointing recomputes `blocks[i].attn.attend`, pruning hooks `blocks[i].attn.proj` and
    the MLP's `down`, meta-device construction calls `init_weights()`, and every pass reads `cfg`."""

    cfg: Any
    blocks: nn.ModuleList

    def init_weights(self) -> None: ...


@dataclass(frozen=True)
class TiedLayer:
    """A pipeline layer whose weight is shared between two stages (DeepSpeed-free description).

    `llmtrain/parallel/pipeline.py` builds it as DeepSpeed's `TiedLayerSpec(key, module_class, *args,
    forward_fn=forward_fn, tied_weight_attr=weight_attr)`: one copy on each stage that uses it, gradients
    all-reduced between them, counted once in the gradient norm."""

    key: str
    module_class: type[nn.Module]
    args: tuple[Any, ...]
    weight_attr: str
    forward_fn: Callable[[Any, Any], Any] | None = None  # (the built module_class instance, inputs)

    def build(self) -> nn.Module:
        """The module one stage holds (what DeepSpeed builds from the spec)."""
        return self.module_class(*self.args)


class PipelineSplit(NamedTuple):
    """A model family as pipeline layers, and how a micro-batch (the data's dict) feeds them. DeepSpeed
    gives the first stage `inputs` and the loss function on the last stage `labels`, nothing else."""

    layers: list[Any]  # modules and TiedLayer descriptions, outermost first
    legend: str  # what the layers are, for the partition log line
    inputs: Callable[[dict[str, torch.Tensor]], Any]  # micro-batch -> the first stage's tensor or tuple
    labels: Callable[[dict[str, torch.Tensor]], Any]  # micro-batch -> what reaches the loss function
    as_batch: Callable[[Any], dict[str, torch.Tensor]]  # those labels -> the batch keys the objective reads
    decoder: bool  # the last stage's output is next-token logits (generation can use the pipeline)


@dataclass(frozen=True)
class ModelFamily:
    """Everything the framework needs to know about one model family (`model.arch`)."""

    # The value of model.arch.
    name: str
    # Its config dataclass (a subclass of models.config.ModelConfig holding only the keys it uses).
    config_class: type
    # cfg -> the plain single-device nn.Module, on the current default device (weights: init_weights()).
    build: Callable[[Any], nn.Module]
    # () -> the objective it trains with (a loss over one of its batches).
    objective: Callable[[], Objective]
    # The data.sample_kind values its models read (config validation refuses any other).
    sample_kinds: tuple[str, ...]
    # True for decoders: logits are next-token predictions (generation, eval perplexity, text samples).
    generative: bool
    # model -> its tensor-parallel plan (module-name pattern -> column / row / vocab_head / vocab_embed).
    tp_plan: Callable[[nn.Module], dict[str, str]]
    # model cfg -> {config key: head count} each tensor-parallel degree must divide.
    tp_heads: Callable[[Any], dict[str, int]]
    # model -> its pipeline split; None when the model (e.g. a classifier) has none (the message says why).
    pipeline_split: Callable[[nn.Module], PipelineSplit]
    # (model cfg, data cfg, parallel.pp) -> the family's finer problems, as messages (empty: none).
    check: Callable[[Any, Any, int], list[str]]
    # (model, batch) -> the model's outputs on a batch's inputs, without labels (pruning calibration).
    forward_inputs: Callable[[nn.Module, dict[str, torch.Tensor]], Any]
    # (named parameters, seq_len, data cfg) -> matmul parameters per token (the 6N of PaLM's FLOPs).
    matmul_params_per_token: Callable[[NamedParams, int, Any], float]
    # (parameter name, parameter) -> True when weight decay must skip it (norms, biases, position tables).
    no_decay: Callable[[str, Any], bool]
    # Pruning: parameter-name suffix inside a block -> axis kinds per dimension (see compress/prune.py).
    prune_block_axes: dict[str, tuple[str | None, ...]]
    # Pruning: top-level parameter name -> axis kinds per dimension.
    prune_top_axes: dict[str, tuple[str | None, ...]]
    # Pruning: (model cfg, new shape dict, prune recipe) -> adjusts the new shape or raises ValueError.
    prune_target: Callable[[Any, dict[str, Any], Any], None] = lambda cfg, new, recipe: None
    # Modules of llmtrain.interop that convert this family to/from Hugging Face (first match wins).
    hf_adapters: tuple[str, ...] = field(default_factory=tuple)
    # True when parallel.cp > 1 can split its sequences (llmtrain/parallel/context_parallel.py): causal attention
    # in each block's `attn.attend`, a forward taking `token_index`, and an objective whose loss is the mean
    # next-token cross-entropy over `labels` of its `logits(model, batch)`.
    context_parallel: bool = False


def no_decay_default(name: str, p: Any) -> bool:
    """Norms and biases (vectors) are not decayed."""
    return p.ndim < 2
