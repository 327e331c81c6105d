"""`llmtrain consolidate`: one safetensors file of the model weights from a checkpoint of any layout."""

from __future__ import annotations

import argparse

DTYPES = ("fp32", "bf16", "fp16")


def cmd_consolidate(args: argparse.Namespace) -> int:
    import torch

    from llmtrain.parallel.consolidate import consolidate

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out = consolidate(args.checkpoint, args.out, dtype=dtype, replace=args.replace)
    print(f"wrote {out} and {out.with_name('config.yaml')}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "consolidate",
        help="write one model.safetensors (+ config.yaml) from a checkpoint of any layout",
        description=__doc__.splitlines()[0] + " Reads one parameter at a time.",
    )
    p.add_argument("checkpoint", help="run directory (its latest checkpoint), checkpoints/ folder or step_* folder")
    p.add_argument("out", help="output directory: gets model.safetensors and config.yaml")
    p.add_argument("--replace", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the written weights (default fp32)")
    p.set_defaults(fn=cmd_consolidate)
