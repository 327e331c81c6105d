"""Hugging Face directories in and out: the library behind `llmtrain export-hf` and `llmtrain import-hf`.

export_hf writes `config.json`, `model.safetensors` (fp32) and the tokenizer (`tokenizer.json` +
`tokenizer_config.json`), so `AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer` load it
(a BERT export's tokenizer adds [CLS] ... [SEP] and gives token_type_ids, as BERT's tokenizers do).
import_hf reads a transformers directory (safetensors or pytorch_model.bin, sharded or not) or a llama.cpp
`.gguf` file and writes an llmtrain model directory (llmtrain/model_dir.py): `model.safetensors` +
`config.yaml` (+ `tokenizer/`), which `model.init_from`, `llmtrain eval` and `llmtrain generate` accept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain.errors import UserError
from llmtrain.model_dir import check_output, write_model_dir, writing  # write_model_dir: re-exported

if TYPE_CHECKING:  # torch loads on first use, so `llmtrain --help` stays fast
    from types import ModuleType

    import torch

    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.models.config import ModelConfig


def export_hf(checkpoint: str | Path, out_dir: str | Path, replace: bool = False) -> Path:
    """Write the checkpoint's model (any layout, read one parameter at a time; LoRA adapters merged into their
    weights) as a transformers directory (the output policy of llmtrain/model_dir.py: atomic, a non-empty `out_dir` only with `replace`)."""
    from llmtrain.inference import checkpoint_tokenizer
    from llmtrain.interop import family_for_config
    from llmtrain.interop.hf_quant import export_quantized_hf, is_quantized
    from llmtrain.models.lora import merge_lora
    from llmtrain.parallel.consolidate import load_model_weights

    check_output(out_dir, replace)
    cfg, weights = load_model_weights(checkpoint)
    cfg, weights = merge_lora(cfg, weights)  # a LoRA model exports merged: W + (alpha / r) B A, a plain model
    if is_quantized(cfg):  # `llmtrain quantize` output: compressed-tensors int8/int4 (interop/hf_quant.py)
        del weights
        return export_quantized_hf(checkpoint, out_dir, replace)
    family = family_for_config(cfg)
    hf_cfg, hf_sd = family.to_hf(cfg, weights)
    del weights
    try:
        tok = checkpoint_tokenizer(checkpoint)
    except ValueError:
        tok = None
    with writing(out_dir, replace) as tmp:
        _write_hf(tmp, cfg, family, hf_cfg, hf_sd, tok)
    return Path(out_dir)


def _write_hf(
    tmp: Path, cfg: ModelConfig, family: ModuleType, hf_cfg: Any, hf_sd: dict[str, torch.Tensor], tok: Tokenizer | None
) -> None:
    from safetensors.torch import save_file

    hf_cfg.architectures = [family.HF_ARCHITECTURE]
    if tok is not None:
        hf_cfg.eos_token_id = tok.eos_id
    hf_cfg.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        from transformers import PreTrainedTokenizerFast

        from llmtrain.data.tokenizer import with_bert_template

        specials: dict[str, Any] = {"eos_token": tok.eos_token}
        specials.update(
            {
                k: t
                for k, t in (
                    ("cls_token", "[CLS]"),
                    ("sep_token", "[SEP]"),
                    ("pad_token", "[PAD]"),
                    ("mask_token", "[MASK]"),
                    ("unk_token", "[UNK]"),
                )
                if t in tok.specials
            }
        )
        hf_tok = tok.hf
        template = _chat_template_of(tok)
        if template:  # chat data's template (prepare-data --format chat): AutoTokenizer's apply_chat_template
            specials["chat_template"] = template
        if getattr(family, "PAIR_TEMPLATE", False) and {"[CLS]", "[SEP]"} <= set(tok.specials):
            # BERT's inputs: the tokenizer adds [CLS] A [SEP] (B [SEP]) and returns the segments, as BERT's do
            hf_tok = with_bert_template(tok.hf)
            specials["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
        PreTrainedTokenizerFast(tokenizer_object=hf_tok, **specials).save_pretrained(tmp)


def _chat_template_of(tok: Tokenizer) -> str:
    from llmtrain.data.chat import load_chat_template
    from llmtrain.errors import DataError

    try:
        return load_chat_template(Path(tok.source)).template
    except DataError:  # no template recorded beside the tokenizer
        return ""


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
    raise UserError(
        f"{hf_dir} holds no *.safetensors or pytorch_model*.bin weights; pass a transformers model directory"
    )


def import_hf(source: str | Path, out_dir: str | Path, replace: bool = False) -> Path:
    """Turn a transformers directory (GPT-2, Llama, BERT) or a llama.cpp GGUF Llama into an llmtrain model dir."""
    from llmtrain.interop import family_for_hf

    src = Path(source)
    check_output(out_dir, replace)
    if src.suffix == ".gguf":
        from llmtrain.interop.gguf import import_gguf

        return import_gguf(src, out_dir, replace)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; pass a transformers model directory or a .gguf file")
    model_type = json.loads((src / "config.json").read_text()).get("model_type", "")
    family = family_for_hf(model_type)
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(str(src), local_files_only=True)
    cfg, sd = family.from_hf(hf_cfg, read_hf_weights(src))
    tok, tok_cfg = src / "tokenizer.json", src / "tokenizer_config.json"
    config = _chat_config(tok_cfg, src / "chat_template.jinja") if tok.is_file() else None
    return write_model_dir(cfg, sd, out_dir, tok if tok.is_file() else None, replace, tokenizer_config=config)


def _chat_config(tok_cfg: Path, template_file: Path) -> dict[str, Any] | None:
    """The tokenizer_config.json an import keeps: the source's (special tokens, chat template), with a
    separate chat_template.jinja (newer transformers) folded in."""
    cfg = json.loads(tok_cfg.read_text()) if tok_cfg.is_file() else {}
    if not cfg.get("chat_template") and template_file.is_file():
        cfg["chat_template"] = template_file.read_text()
    return cfg or None
