"""`llmtrain prune` (a smaller model out of a trained checkpoint) and `llmtrain distill` (train it against a teacher).

    llmtrain prune runs/gpt_debug --recipe recipes/prune_gpt_debug.yaml --out runs/gpt_debug_pruned [prune.key=value ...]

This module parses and calls: pruning is llmtrain/compress/prune_checkpoint.py, distillation
llmtrain/compress/distill.py.
"""

from __future__ import annotations

import argparse
from typing import Any

# Names imported from here before the library moved to prune_checkpoint.py, loaded on first use (PEP 562) so
# that building the parser (`llmtrain --help`) imports no torch
_MOVED = ("held_out_loss", "load_prune_recipe", "run_prune", "source_config", "write_model")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from llmtrain.compress import prune_checkpoint

        return getattr(prune_checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cmd_prune(args: argparse.Namespace) -> int:
    from llmtrain.compress.prune_checkpoint import load_prune_recipe, run_prune

    recipe = load_prune_recipe(args.recipe, args.overrides)
    f = run_prune(args.checkpoint, recipe, args.out, replace=args.replace, data_dir=args.data)
    print(
        f"params: {f['params_before'] / 1e6:.3f}M -> {f['params_after'] / 1e6:.3f}M "
        f"({f['params_after'] / f['params_before']:.1%})"
    )
    print(
        f"held-out perplexity: {f['ppl_before']:.2f} -> {f['ppl_after']:.2f} (loss {f['loss_before']:.4f} -> "
        f"{f['loss_after']:.4f}), right after pruning, before any distillation"
    )
    print(f"wrote {args.out} (use it as model.init_from={args.out}, e.g. for launchers/distill.py)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from llmtrain.compress.distill import run_distill
    from llmtrain.config import load_config
    from llmtrain.parallel.engine import shutdown_distributed

    run_distill(load_config(args.recipe, args.overrides))
    shutdown_distributed()
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    from llmtrain.cli import EPILOG, add_recipe_args, sentence

    help_text = "train a student against a frozen teacher (distill.* keys; what launchers/distill.py runs)"
    d = sub.add_parser("distill", help=help_text, description=sentence(help_text), epilog=EPILOG)
    add_recipe_args(d)
    d.set_defaults(fn=cmd_distill)
    p = sub.add_parser(
        "prune",
        help="structured pruning of a checkpoint (heads, MLP channels, width, layers)",
        description="Structured pruning: a smaller model out of a trained checkpoint (attention heads, "
        "MLP channels, width, layers), written as a model directory that model.init_from, "
        "eval and export accept; `llmtrain distill` then trains it against a teacher.",
    )
    p.add_argument("checkpoint", help="checkpoint, run or consolidated directory to prune")
    p.add_argument("--recipe", help="recipe YAML with a prune: section, e.g. recipes/prune_gpt_debug.yaml")
    p.add_argument("--out", required=True, help="output directory (model.safetensors + config.yaml)")
    p.add_argument("--replace", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument(
        "--data",
        default="",
        help="prepared dataset (prepare-data) for calibration and held-out figures, e.g. for an imported model "
        "(default: the checkpoint's training data)",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe, e.g. prune.n_layer=2")
    p.set_defaults(fn=cmd_prune)
