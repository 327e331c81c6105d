"""`llmtrain quantize`: post-training weight-only quantisation of a checkpoint into a model directory.

    llmtrain quantize runs/gpt_debug --bits 4 --method gptq --group-size 64 --out runs/gpt_debug_int4
    llmtrain quantize runs/gpt_debug --recipe recipes/quantize_gpt_debug.yaml --out runs/gpt_debug_int4

Settings come from the recipe's quantize: section (llmtrain/compress/config.py:QuantizeConfig), then dotted
overrides, then the flags given.

This module parses and calls; the library is llmtrain/compress/quant/ptq.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import get_args, get_type_hints

# command-line flag -> quantize.* key; a flag given overrides the recipe's value
FLAGS = ("bits", "method", "group_size", "grid", "calib_batches", "eval_batches", "micro_batch_size", "seq_len",
         "data", "float_dtype")  # fmt: skip


def cmd_quantize(args: argparse.Namespace) -> int:
    import dataclasses

    from llmtrain.compress.quant.ptq import run_quantize
    from llmtrain.config import load_config

    recipe = load_config(args.recipe, args.overrides).quantize
    qargs = dataclasses.replace(recipe, **{k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None})
    f = run_quantize(args.checkpoint, qargs, args.out, replace=args.replace)
    print(
        f"params: {f['params'] / 1e6:.3f}M, {f['quantized_layers']} linear layers quantised "
        f"(int{f['bits']} {f['method']}, group size {f['group_size'] or 'row'}); embeddings, norms, biases "
        f"and a tied output head stay {f['float_dtype']}"
    )
    print(
        f"bytes: {f['bytes_before'] / 2**20:.2f} MiB -> {f['bytes_after'] / 2**20:.2f} MiB "
        f"({f['bytes_after'] / f['bytes_before']:.1%})"
    )
    if f["metric"] == "perplexity":
        print(
            f"held-out perplexity: {f['ppl_before']:.3f} -> {f['ppl_after']:.3f} "
            f"({f['ppl_after'] / f['ppl_before'] - 1:+.2%}; loss {f['loss_before']:.4f} -> {f['loss_after']:.4f})"
        )
    else:
        print(f"held-out {f['metric']}: {f['loss_before']:.4f} -> {f['loss_after']:.4f}")
    print(f"wrote {args.out} (llmtrain eval / generate read it; model.init_from dequantises it)")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    from llmtrain.compress.config import QUANTIZE_METHODS, QuantizeConfig

    choices = {k: list(get_args(t)) for k, t in get_type_hints(QuantizeConfig).items()}
    methods = dict(QUANTIZE_METHODS)
    ptq = sys.modules.get("llmtrain.compress.quant.ptq")  # imported (torch with it) once a method is registered
    methods.update({n: m.help for n, m in getattr(ptq, "METHODS", {}).items()})
    p = sub.add_parser(
        "quantize",
        help="post-training weight-only quantisation (int8 / int4, RTN or GPTQ) into a model directory",
        description="Post-training weight-only quantisation of every linear layer (embeddings, norms and a "
        "tied output head stay float) of any checkpoint `llmtrain eval` reads, written as a model directory "
        "of packed integers + scales that eval, generate and model.init_from read. Prints parameters, bytes "
        "before/after and held-out perplexity before/after.",
    )
    p.add_argument("checkpoint", help="checkpoint, run, consolidated, pruned or imported model directory")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--recipe", help="recipe YAML with a quantize: section, e.g. recipes/quantize_gpt_debug.yaml")
    p.add_argument("--bits", type=int, help="8 (int8, symmetric) or 4 (packed, asymmetric); default 8")
    p.add_argument(
        "--method",
        help="; ".join(f"{n}: {h}" for n, h in sorted(methods.items())) + " (default rtn)",
    )
    p.add_argument("--group-size", type=int, help="input columns per scale (0 = one per row); default 128")
    p.add_argument("--grid", choices=choices["grid"], help="auto (default): sym for 8 bits, asym for 4")
    p.add_argument("--calib-batches", type=int, help="calibration batches of the run's training data (16)")
    p.add_argument("--eval-batches", type=int, help="held-out batches for the before/after figures (16)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per calibration / eval batch (4)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (0, the default: the run's train.seq_len)")
    p.add_argument("--data", help="prepared dataset or 'bundled' (default: the checkpoint's own data section)")
    p.add_argument("--float-dtype", choices=choices["float_dtype"], help="storage of the tensors left float (fp32)")
    p.add_argument("--replace", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. quantize.bits=4")
    p.set_defaults(fn=cmd_quantize)
