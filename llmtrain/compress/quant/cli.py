"""`llmtrain quantize`: post-training weight-only quantisation of a checkpoint into a model directory.

    llmtrain quantize runs/gpt_debug --bits 4 --method gptq --group-size 64 --out runs/gpt_debug_int4

This module parses and calls; the library is llmtrain/compress/quant/ptq.py.
"""

from __future__ import annotations

import argparse


def cmd_quantize(args: argparse.Namespace) -> int:
    from llmtrain.compress.quant.ptq import QuantizeArgs, run_quantize

    qargs = QuantizeArgs(
        bits=args.bits,
        method=args.method,
        group_size=args.group_size,
        symmetric={"auto": None, "sym": True, "asym": False}[args.grid],
        calib_batches=args.calib_batches,
        eval_batches=args.eval_batches,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        data=args.data,
        float_dtype=args.float_dtype,
    )
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
    from llmtrain.compress.quant.ptq import FLOAT_DTYPES, METHODS

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
    p.add_argument("--bits", type=int, default=8, help="8 (int8, symmetric) or 4 (packed, asymmetric)")
    p.add_argument(
        "--method",
        default="rtn",
        help="; ".join(f"{n}: {m.help}" for n, m in sorted(METHODS.items())) + " (default rtn)",
    )
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale (0 = one per row)")
    p.add_argument("--grid", choices=["auto", "sym", "asym"], default="auto", help="auto: sym for 8 bits, asym for 4")
    p.add_argument("--calib-batches", type=int, default=16, help="calibration batches of the run's training data")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches for the before/after figures")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per calibration / eval batch")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0 = the run's train.seq_len)")
    p.add_argument(
        "--data", default="", help="prepared dataset or 'bundled' (default: the checkpoint's own data section)"
    )
    p.add_argument(
        "--float-dtype", choices=list(FLOAT_DTYPES), default="fp32", help="storage of the tensors left float"
    )
    p.add_argument("--replace", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(fn=cmd_quantize)
