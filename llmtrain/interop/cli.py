"""`llmtrain export-hf` and `llmtrain import-hf`: checkpoints to and from Hugging Face model directories.

export-hf writes `config.json`, `model.safetensors` (fp32) and the tokenizer (`tokenizer.json` +
`tokenizer_config.json`), so `AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer` load it
(a BERT export's tokenizer adds [CLS] ... [SEP] and gives token_type_ids, as BERT's tokenizers do).
import-hf reads a transformers directory (safetensors or pytorch_model.bin, sharded or not) or a llama.cpp
`.gguf` file and writes an llmtrain model directory: `model.safetensors` + `config.yaml` (+ `tokenizer/`),
which `model.init_from`, `llmtrain eval` and `llmtrain generate` accept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any
from llmtrain.errors import UserError

if TYPE_CHECKING:  # torch loads on first use, so `llmtrain --help` stays fast
    import torch


def _fresh_tmp(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new OUT_DIR")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    if out.exists():
        out.rmdir()  # empty (checked in _fresh_tmp)
    os.rename(tmp, out)
    return out


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's model (any layout, read one parameter at a time) as a transformers directory."""
    from safetensors.torch import save_file

    from llmtrain.inference import checkpoint_tokenizer
    from llmtrain.interop import family_for_config
    from llmtrain.parallel.consolidate import load_model_weights

    cfg, weights = load_model_weights(checkpoint)
    family = family_for_config(cfg)
    hf_cfg, hf_sd = family.to_hf(cfg, weights)
    del weights
    out = Path(out_dir)
    tmp = _fresh_tmp(out)
    try:
        tok = checkpoint_tokenizer(checkpoint)
    except ValueError:
        tok = None
    hf_cfg.architectures = [family.HF_ARCHITECTURE]
    if tok is not None:
        hf_cfg.eos_token_id = tok.eos_id
    hf_cfg.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        from transformers import PreTrainedTokenizerFast

        from llmtrain.data.tokenizer import with_bert_template

        specials: dict[str, Any] = {"eos_token": tok.eos_token}
        specials.update({k: t for k, t in (("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"),
                                            ("mask_token", "[MASK]"), ("unk_token", "[UNK]")) if t in tok.specials})
        hf_tok = tok.hf
        if getattr(family, "PAIR_TEMPLATE", False) and {"[CLS]", "[SEP]"} <= set(tok.specials):
            # BERT's inputs: the tokenizer adds [CLS] A [SEP] (B [SEP]) and returns the segments, as BERT's do
            hf_tok = with_bert_template(tok.hf)
            specials["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
        PreTrainedTokenizerFast(tokenizer_object=hf_tok, **specials).save_pretrained(tmp)
    return _publish(tmp, out)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers directory: model.safetensors, its sharded index, or pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if bins:
        return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise ValueError(f"{hf_dir} holds no *.safetensors or pytorch_model*.bin weights; pass a transformers model directory")


def write_model_dir(cfg: Any, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                    tokenizer_json: Path | None = None) -> Path:
    """An llmtrain model directory (the layout `consolidate` writes): each parameter once, plain names."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from llmtrain.integrity import write_checksums
    from llmtrain.models import build_model

    with torch.device("meta"):
        names = [n for n, _ in build_model(cfg).named_parameters()]  # first names: tied copies once
    out = Path(out_dir)
    tmp = _fresh_tmp(out)
    save_file({n: state_dict[n].float().contiguous() for n in names}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}, sort_keys=False))
    if tokenizer_json is not None:
        (tmp / "tokenizer").mkdir()
        shutil.copyfile(tokenizer_json, tmp / "tokenizer" / "tokenizer.json")
    write_checksums(tmp)  # last: every reader verifies the files against it
    return _publish(tmp, out)


def import_hf(source: str | Path, out_dir: str | Path) -> Path:
    """Turn a transformers directory (GPT-2, Llama, BERT) or a llama.cpp GGUF Llama into an llmtrain model dir."""
    from llmtrain.interop import family_for_hf

    src = Path(source)
    if src.suffix == ".gguf":
        from llmtrain.interop.gguf import import_gguf

        return import_gguf(src, out_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json; pass a transformers model directory or a .gguf file")
    model_type = json.loads((src / "config.json").read_text()).get("model_type", "")
    family = family_for_hf(model_type)
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(str(src), local_files_only=True)
    cfg, sd = family.from_hf(hf_cfg, read_hf_weights(src))
    tok = src / "tokenizer.json"
    return write_model_dir(cfg, sd, out_dir, tok if tok.is_file() else None)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_hf(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} -> {out} (transformers from_pretrained loads it)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    out = import_hf(args.source, args.out_dir)
    print(f"imported {args.source} -> {out} (use it as model.init_from, or with llmtrain eval / generate)")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face transformers model directory",
                       description="Write a checkpoint of any layout as a Hugging Face transformers model directory "
                                   "(config.json, model.safetensors, tokenizer) that transformers loads as it is.")
    p.add_argument("checkpoint", help="run, checkpoint, consolidated or imported directory")
    p.add_argument("out_dir", help="new (or empty) directory")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("import-hf", help="turn a transformers directory or a llama.cpp .gguf into an llmtrain model",
                       description="Turn a Hugging Face transformers model directory or a llama.cpp .gguf file into "
                                   "an llmtrain model directory (model.safetensors, config.yaml, tokenizer/), accepted "
                                   "wherever a checkpoint is: model.init_from, generate, eval, prune, distill.")
    p.add_argument("source", help="transformers model directory (GPT-2, Llama, BERT) or a Llama .gguf file")
    p.add_argument("out_dir", help="new (or empty) directory")
    p.set_defaults(fn=cmd_import)
