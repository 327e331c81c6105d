"""`llmtrain export-hf` and `llmtrain import-hf`: parse the arguments and call llmtrain/interop/hf.py."""

from __future__ import annotations

import argparse

# Re-exported: these names were imported from here before the library moved to interop/hf.py
from llmtrain.interop.hf import export_hf, import_hf, read_hf_weights, write_model_dir  # noqa: F401


def cmd_export(args: argparse.Namespace) -> int:
    out = export_hf(args.checkpoint, args.out_dir, replace=args.replace)
    print(f"exported {args.checkpoint} -> {out} (transformers from_pretrained loads it)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    out = import_hf(args.source, args.out_dir, replace=args.replace)
    print(f"imported {args.source} -> {out} (use it as model.init_from, or with llmtrain eval / generate)")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf",
        help="write a checkpoint as a Hugging Face transformers model directory",
        description="Write a checkpoint of any layout as a Hugging Face transformers model directory "
        "(config.json, model.safetensors, tokenizer) that transformers loads as it is.",
    )
    p.add_argument("checkpoint", help="run, checkpoint, consolidated or imported directory")
    p.add_argument("out_dir", help="new (or empty) directory")
    p.add_argument("--replace", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser(
        "import-hf",
        help="turn a transformers directory or a llama.cpp .gguf into an llmtrain model",
        description="Turn a Hugging Face transformers model directory or a llama.cpp .gguf file into "
        "an llmtrain model directory (model.safetensors, config.yaml, tokenizer/), accepted "
        "wherever a checkpoint is: model.init_from, generate, eval, prune, distill.",
    )
    p.add_argument("source", help="transformers model directory (GPT-2, Llama, BERT) or a Llama .gguf file")
    p.add_argument("out_dir", help="new (or empty) directory")
    p.add_argument("--replace", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.set_defaults(fn=cmd_import)
