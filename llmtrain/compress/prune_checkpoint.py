"""Structured pruning of a checkpoint into a model directory: the library behind `llmtrain prune`.

The output directory holds `model.safetensors` + `config.yaml` (llmtrain/model_dir.py, the layout
`llmtrain consolidate` writes), so training (`model.init_from=DIR`), distillation, evaluation and
export read it like any checkpoint; `prune.json` records the recipe and the figures printed.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtrain.compress.config import PruneConfig
from llmtrain.errors import UserError

if TYPE_CHECKING:
    from llmtrain.config import Config
    from llmtrain.models.config import ModelConfig
    from llmtrain.models.objective import Objective


def load_prune_recipe(path: str | None, overrides: list[str]) -> PruneConfig:
    """The `prune:` section of a recipe (strict like every key), with dotted overrides (prune.n_head=4)."""
    from llmtrain.config import load_config

    return load_config(path, overrides).prune


def source_config(checkpoint: str | Path, model_cfg: ModelConfig) -> Config:
    """The root Config the checkpoint was trained with (its data, seq_len), with its model config."""
    from llmtrain.config import Config, load_config
    from llmtrain.parallel.checkpoint_paths import resolve_checkpoint

    path = Path(checkpoint)
    config_file = path / "config.yaml"
    if not config_file.is_file():
        config_file = resolve_checkpoint(path) / "config.yaml"
    cfg = load_config(config_file) if config_file.is_file() else Config()
    return dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, init_from=None))


def held_out_loss(model: torch.nn.Module, objective: Objective, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [objective(model, b).item() for b in batches]
    return sum(losses) / max(1, len(losses))


def write_model(
    out: str | Path, cfg: Config, model: torch.nn.Module, extra: dict[str, Any], replace: bool = False
) -> Path:
    """The model directory `out` (llmtrain/model_dir.py) of `model`, with `cfg` and `extra` as prune.json."""
    from llmtrain.model_dir import write_model as write_model_dir

    return write_model_dir(out, cfg, model, {"prune.json": extra}, replace)


def run_prune(
    checkpoint: str, recipe: PruneConfig, out: str | Path, replace: bool = False, data_dir: str = ""
) -> dict[str, Any]:
    """Prune `checkpoint` per `recipe` into the model directory `out` (a non-empty one only with
    `replace`); returns the figures it printed. `data_dir`: a prepared dataset directory for the calibration and
    held-out batches instead of the checkpoint's own training data (an imported model has none)."""
    from tqdm import tqdm

    from llmtrain.compress.prune import (
        activation_importance,
        expert_usage,
        magnitude_importance,
        prune,
        prune_experts,
    )
    from llmtrain.data import build_data
    from llmtrain.model_dir import check_output
    from llmtrain.models import build_model
    from llmtrain.parallel.consolidate import load_model_weights
    from llmtrain.train.objectives import objective_for

    check_output(out, replace)
    model_cfg, weights = load_model_weights(checkpoint)
    if model_cfg.converters:
        raise UserError(
            f"{checkpoint}: pruning reads plain models, and this one was converted (model.converters="
            f"{model_cfg.converters}); prune its unconverted source"
        )
    model_cfg = dataclasses.replace(model_cfg, init_from=None)
    cfg = source_config(checkpoint, model_cfg)
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data_dir))
    model = build_model(model_cfg)
    model.load_state_dict(weights)
    seq_len = recipe.seq_len or cfg.train.seq_len
    data = build_data(
        cfg.data,
        seq_len=seq_len,
        seed=cfg.train.seed,
        micro_batch_size=recipe.micro_batch_size,
        grad_accum=1,
        dp_rank=0,
        dp_size=1,
    )
    val = data.val_batches(recipe.eval_batches)
    objective = objective_for(model_cfg)
    before = held_out_loss(model, objective, val)
    calib = (
        data.train_batches(s)[0]
        for s in tqdm(range(recipe.calib_batches), desc="calibration", unit="batch", disable=None)
    )
    if recipe.experts is not None:  # whole experts of an MoE model, by router usage
        usage = expert_usage(model, model_cfg, calib if recipe.method == "activation" else None)
        new_cfg, state = prune_experts(model, model_cfg, recipe, usage)
    else:
        if recipe.method == "activation":
            imp = activation_importance(model, model_cfg, calib)
        else:
            imp = magnitude_importance(model, model_cfg)
        new_cfg, state = prune(model, model_cfg, recipe, imp)
    small = build_model(new_cfg)
    small.load_state_dict(state)
    after = held_out_loss(small, objective, val)
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    figures = {
        "source": str(checkpoint),
        "recipe": dataclasses.asdict(recipe),
        "params_before": n0,
        "params_after": n1,
        "loss_before": before,
        "loss_after": after,
        "ppl_before": math.exp(before),
        "ppl_after": math.exp(after),
    }
    # out_dir: not the source run's, so a `train` of this config.yaml can never resume over the source
    out = Path(out)
    write_model(
        out,
        dataclasses.replace(cfg, model=new_cfg, out_dir=str(out.with_name(out.name + "_train"))),
        small,
        figures,
        replace,
    )
    return figures
