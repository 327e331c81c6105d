"""`llmtrain prune` (a smaller model out of a trained checkpoint) and `llmtrain distill` (train it against a teacher).

    llmtrain prune runs/gpt_debug --recipe recipes/prune_gpt_debug.yaml --out runs/gpt_debug_pruned [prune.key=value ...]

The output directory holds `model.safetensors` + `config.yaml` (the consolidated-checkpoint layout of
llmtrain/parallel/consolidate.py), so training (`model.init_from=DIR`), distillation, evaluation and
export read it like any checkpoint; `prune.json` records the recipe and the figures printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from llmtrain.compress.config import PruneConfig


def load_prune_recipe(path: str | None, overrides: list[str]) -> PruneConfig:
    """The `prune:` section of a recipe (strict like every key), with dotted overrides (prune.n_head=4)."""
    from llmtrain.config import load_config

    return load_config(path, overrides).prune


def source_config(checkpoint: str | Path, model_cfg: Any) -> Any:
    """The root Config the checkpoint was trained with (its data, seq_len), with its model config."""
    from llmtrain.config import Config, load_config
    from llmtrain.train.checkpoint import resolve_checkpoint

    path = Path(checkpoint)
    config_file = path / "config.yaml"
    if not config_file.is_file():
        config_file = resolve_checkpoint(path) / "config.yaml"
    cfg = load_config(config_file) if config_file.is_file() else Config()
    return dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, init_from=None))


def held_out_loss(model: torch.nn.Module, objective: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [objective(model, b).item() for b in batches]
    return sum(losses) / max(1, len(losses))


def write_model(out: Path, cfg: Any, model: torch.nn.Module, extra: dict[str, Any]) -> None:
    """Atomically write out/{model.safetensors, config.yaml, prune.json} (a temp dir, then rename)."""
    from safetensors.torch import save_file

    from llmtrain.config import save_config
    from llmtrain.integrity import write_checksums

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {n: p.detach().float().contiguous() for n, p in model.named_parameters()}  # tied ones once
    save_file(weights, str(tmp / "model.safetensors"))
    save_config(cfg, tmp / "config.yaml")
    (tmp / "prune.json").write_text(json.dumps(extra, indent=1))
    write_checksums(tmp)  # last: every reader verifies the files against it
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def run_prune(checkpoint: str, recipe: PruneConfig, out: str | Path) -> dict[str, Any]:
    """Prune `checkpoint` per `recipe` into `out`; returns the figures it printed."""
    from tqdm import tqdm

    from llmtrain.compress.prune import activation_importance, magnitude_importance, prune
    from llmtrain.data import build_data
    from llmtrain.models import build_model
    from llmtrain.parallel.consolidate import load_model_weights
    from llmtrain.train.objectives import objective_for

    model_cfg, weights = load_model_weights(checkpoint)
    model_cfg = dataclasses.replace(model_cfg, init_from=None)
    cfg = source_config(checkpoint, model_cfg)
    model = build_model(model_cfg)
    model.load_state_dict(weights)
    seq_len = recipe.seq_len or cfg.train.seq_len
    data = build_data(cfg.data, seq_len=seq_len, seed=cfg.train.seed, micro_batch_size=recipe.micro_batch_size,
                      grad_accum=1, dp_rank=0, dp_size=1)
    val = data.val_batches(recipe.eval_batches)
    objective = objective_for(model_cfg)
    before = held_out_loss(model, objective, val)
    if recipe.method == "activation":
        calib = (data.train_batches(s)[0] for s in tqdm(range(recipe.calib_batches), desc="calibration",
                                                         unit="batch", disable=None))
        imp = activation_importance(model, model_cfg, calib)
    else:
        imp = magnitude_importance(model, model_cfg)
    new_cfg, state = prune(model, model_cfg, recipe, imp)
    small = build_model(new_cfg)
    small.load_state_dict(state)
    after = held_out_loss(small, objective, val)
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    figures = {"source": str(checkpoint), "recipe": dataclasses.asdict(recipe), "params_before": n0,
               "params_after": n1, "loss_before": before, "loss_after": after,
               "ppl_before": math.exp(before), "ppl_after": math.exp(after)}
    # out_dir: not the source run's, so a `train` of this config.yaml can never resume over the source
    out = Path(out)
    write_model(out, dataclasses.replace(cfg, model=new_cfg, out_dir=str(out.with_name(out.name + "_train"))),
                small, figures)
    return figures


def cmd_prune(args: argparse.Namespace) -> int:
    recipe = load_prune_recipe(args.recipe, args.overrides)
    f = run_prune(args.checkpoint, recipe, args.out)
    print(f"params: {f['params_before'] / 1e6:.3f}M -> {f['params_after'] / 1e6:.3f}M "
          f"({f['params_after'] / f['params_before']:.1%})")
    print(f"held-out perplexity: {f['ppl_before']:.2f} -> {f['ppl_after']:.2f} (loss {f['loss_before']:.4f} -> "
          f"{f['loss_after']:.4f}), right after pruning, before any distillation")
    print(f"wrote {args.out} (use it as model.init_from={args.out}, e.g. for launchers/distill.py)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from llmtrain.cli import _shutdown
    from llmtrain.compress.distill import run_distill
    from llmtrain.config import load_config

    run_distill(load_config(args.recipe, args.overrides))
    _shutdown()
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    from llmtrain.cli import EPILOG, _add_recipe_args, sentence

    help_text = "train a student against a frozen teacher (distill.* keys; what launchers/distill.py runs)"
    d = sub.add_parser("distill", help=help_text, description=sentence(help_text), epilog=EPILOG)
    _add_recipe_args(d)
    d.set_defaults(fn=cmd_distill)
    p = sub.add_parser("prune", help="structured pruning of a checkpoint (heads, MLP channels, width, layers)",
                       description="Structured pruning: a smaller model out of a trained checkpoint (attention heads, "
                                   "MLP channels, width, layers), written as a model directory that model.init_from, "
                                   "eval and export accept; `llmtrain distill` then trains it against a teacher.")
    p.add_argument("checkpoint", help="checkpoint, run or consolidated directory to prune")
    p.add_argument("--recipe", help="recipe YAML with a prune: section, e.g. recipes/prune_gpt_debug.yaml")
    p.add_argument("--out", required=True, help="output directory (model.safetensors + config.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe, e.g. prune.n_layer=2")
    p.set_defaults(fn=cmd_prune)
