"""`llmtrain export-hf` and `llmtrain import-hf`: parse the arguments and call llmtrain/interop/hf.py."""

from __future__ import annotations

import argparse
from typing import Any

# Names imported from here before the library moved to interop/hf.py, loaded on first use (PEP 562) so that
# building the parser (`llmtrain --help`) imports no torch
_MOVED = ("export_hf", "import_hf", "read_hf_weights", "write_model_dir")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from llmtrain.interop import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cmd_export(args: argparse.Namespace) -> int:
    from llmtrain.interop.hf import export_hf

    if args.adapter:
        from llmtrain.interop.peft import export_adapter

        out = export_adapter(args.checkpoint, args.out_dir, replace=args.replace)
        print(f"exported the LoRA adapters of {args.checkpoint} -> {out} (peft.PeftModel.from_pretrained(base, OUT))")
        return 0
    out = export_hf(args.checkpoint, args.out_dir, replace=args.replace)
    print(f"exported {args.checkpoint} -> {out} (transformers from_pretrained loads it)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from llmtrain.interop.hf import import_hf

    out = import_hf(args.source, args.out_dir, replace=args.replace)
    print(f"imported {args.source} -> {out} (use it as model.init_from, or with llmtrain eval / generate)")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from llmtrain.interop.gguf_export import export_gguf

    counts = export_gguf(args.model, args.out, args.type, replace=args.replace)
    types = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    print(f"exported {args.model} -> {args.out} ({types} tensors; llama.cpp and transformers gguf_file= load it)")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf",
        help="write a checkpoint as a Hugging Face transformers model directory",
        description="Write a checkpoint of any layout as a Hugging Face transformers model directory "
        "(config.json, model.safetensors, tokenizer) that transformers loads as it is; a LoRA model is "
        "written merged (W + alpha/r B A), or with --adapter as a PEFT adapter.",
    )
    p.add_argument("checkpoint", help="run, checkpoint, consolidated or imported directory")
    p.add_argument("out_dir", help="new (or empty) directory")
    p.add_argument("--replace", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA checkpoint: write its adapters as a PEFT adapter (adapter_config.json + "
        "adapter_model.safetensors) for the exported base, instead of the merged model",
    )
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
    p = sub.add_parser(
        "export-gguf",
        help="write a decoder as a llama.cpp .gguf file (f16, q8_0, q4_0, q4_k)",
        description="Write a decoder (Llama or GPT-2 flavour) as a llama.cpp GGUF file with its tokenizer: "
        "llama.cpp and transformers' from_pretrained(dir, gguf_file=...) load it. 1-D tensors stay f32; "
        "with the 4-bit types the output matrix is q8_0; rows that do not fit the type's blocks fall back "
        "(q4_k -> q5_0 -> f16).",
    )
    p.add_argument("model", help="run, checkpoint, consolidated or imported directory")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=["f16", "q8_0", "q4_0", "q4_k"], help="tensor type (default f16)")
    p.add_argument("--replace", action="store_true", help="replace OUT if it exists")
    p.set_defaults(fn=cmd_export_gguf)
