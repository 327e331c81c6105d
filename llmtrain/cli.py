"""The `llmtrain` command: one entry point, one sub-command per job.

User errors (a bad key, an impossible layout, a missing checkpoint, a corrupt file), raised as
`llmtrain.errors.UserError`, print one line, `error: ...`, saying what to change, and exit with status 2
(LLMTRAIN_DEBUG=1 shows the traceback). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from llmtrain.errors import UserError
from llmtrain.utils import eprint, rank

EPILOG = (
    "Overrides are dotted config keys after the recipe, e.g. train.max_steps=50 optim.lr=3e-4 "
    "parallel.zero_stage=2 out_dir=runs/x. `llmtrain config RECIPE` prints every key with its value."
)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/gpt_debug.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (CLI > YAML > defaults)")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def sentence(help_text: str) -> str:
    """A one-line sub-command help as the sentence its --help page opens with."""
    return help_text[:1].upper() + help_text[1:] + ("" if help_text.endswith(".") else ".")


def cmd_train(args: argparse.Namespace) -> int:
    from llmtrain.config import load_config
    from llmtrain.parallel.engine import shutdown_distributed
    from llmtrain.train.trainer import train

    cfg = load_config(args.recipe, args.overrides)
    if cfg.train.objective == "dpo":  # preference tuning: the trainer with the DPO objective and its reference
        from llmtrain.finetune.dpo import run_dpo

        run_dpo(cfg)
    else:
        train(cfg)
    shutdown_distributed()
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from llmtrain.config import load_config, to_dict

    cfg = load_config(args.recipe, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "train": (cmd_train, "train a model from a recipe (what launchers/train.py runs)"),
    "config": (cmd_config, "print the resolved config of a recipe with overrides, and validate it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtrain", description="Train, compress and evaluate LLMs on DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=sentence(help_text), epilog=EPILOG)
        add_recipe_args(p)
        p.set_defaults(fn=fn)
    for register in _plugin_registrars():
        register(sub)
    return parser


# Components that own sub-commands; each module exposes add_subcommands(subparsers).
COMPONENT_CLIS: tuple[str, ...] = (
    "llmtrain.plan",
    "llmtrain.parallel.cli",
    "llmtrain.data.cli",
    "llmtrain.compress.cli",
    "llmtrain.compress.quant.cli",
    "llmtrain.evaluation.cli",
    "llmtrain.interop.cli",
)


def _plugin_registrars() -> list[Callable]:
    import importlib

    return [importlib.import_module(m).add_subcommands for m in COMPONENT_CLIS]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`plan R --nodes 2 train.seq_len=1024`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except UserError as exc:  # ConfigError, CheckpointError, DataError: the user's input, not a bug
        if os.environ.get("LLMTRAIN_DEBUG"):
            raise
        if rank() == 0:
            eprint(f"error: {exc}")
        return 2
    except RuntimeError as exc:
        from llmtrain.train.trainer import NonFiniteLossError

        if not isinstance(exc, NonFiniteLossError) or os.environ.get("LLMTRAIN_DEBUG"):
            raise
        if rank() == 0:
            eprint(f"error: {exc}")
        return 3
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: no traceback
        if rank() == 0:
            eprint("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
