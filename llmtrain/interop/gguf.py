"""llama.cpp GGUF Llama files -> llmtrain, through the transformers Llama layout (then `llama.from_hf`).

Weights are dequantised with the `gguf` package (any of its quantisation types, e.g. Q4_1 / Q8_0).
llama.cpp's converter permutes the rows of q_proj and k_proj within each head from the half-split rotary
layout (dim i pairs with dim i + hs/2) to the interleaved one (dim 2i pairs with 2i + 1); `_unpermute`
undoes that. The tokenizer (a byte-level BPE for `tokenizer.ggml.model = gpt2`) is rebuilt from the
vocabulary and merges stored in the file's metadata.

Rotary scaling is read as llama.cpp reads it: `llama.rope.scaling.type` (absent means "linear"),
`llama.rope.scaling.factor` (older files: `llama.rope.scale_linear`; absent or 0 means 1). "linear" with a
factor other than 1 becomes transformers' `rope_scaling={"rope_type": "linear", "factor": f}`; "none" (or
factor 1) is plain rotary. Other types (yarn, longrope) are refused, as is the `rope_freqs.weight` tensor in
which llama.cpp stores llama3 scaling: its per-frequency factors do not determine rope_scaling's llama3
parameters (import a llama3-scaled model from its Hugging Face checkpoint: `llmtrain import-hf HF_DIR OUT_DIR`).
A `llama.rope.scaling.attn_factor` other than 1 is refused too (transformers' linear and plain rotary have none).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.errors import UserError

# llama.cpp tensor name -> transformers Llama name ({i} = layer)
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# pre-tokenizers of llama.cpp's gpt2-style vocabularies: those that split digits one by one first
_DIGITS_FIRST = {"smollm", "starcoder", "refact"}
_CONTROL = 3  # llama.cpp token type of special (control) tokens


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows (n_head * hs, in) from llama.cpp's interleaved rotary order back to the half-split order."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, hs // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _hf_name(name: str) -> str | None:
    parts = name.split(".")
    key = ".".join(["blk", "{i}", *parts[2:]]) if parts[0] == "blk" else name
    hf = _NAMES.get(key)
    return hf.format(i=parts[1]) if hf and parts[0] == "blk" else hf


def _rope_scaling(meta: Any, path: str | Path) -> dict[str, Any] | None:
    """transformers' `rope_scaling` for the file's rotary scaling metadata (None: plain rotary)."""
    key = "llama.rope.scaling.type"
    kind = meta(key, "linear")  # llama.cpp's default when the key is absent
    factor = meta("llama.rope.scaling.factor", meta("llama.rope.scale_linear", 0.0))
    factor = _f32(factor) if factor else 1.0
    if kind not in ("none", "linear"):
        orig = meta("llama.rope.scaling.original_context_length")
        raise UserError(
            f"{path}: {key} = '{kind}' (llama.rope.scaling.factor = {factor}"
            + (f", llama.rope.scaling.original_context_length = {orig}" if orig is not None else "")
            + ") is not supported: GGUF import maps the types 'none' and 'linear' only, and llmtrain "
            "implements no rotary scaling but linear and llama3 (a Hugging Face checkpoint with those "
            "imports through llmtrain import-hf HF_DIR OUT_DIR)"
        )
    attn = meta("llama.rope.scaling.attn_factor", 1.0)
    if _f32(attn) != 1.0:  # llama.cpp multiplies the rotated q and k by it; transformers' linear / plain do not
        raise UserError(
            f"{path}: llama.rope.scaling.attn_factor = {_f32(attn)} is not supported (1 only): "
            f"llmtrain's rotary has no such factor"
        )
    if kind == "none" or factor == 1.0:  # llama.cpp never scales with type none, whatever the factor
        return None
    return {"rope_type": "linear", "factor": factor}


def read_gguf_llama(path: str | Path) -> tuple[Any, dict[str, torch.Tensor], Any]:
    """(transformers LlamaConfig, fp32 state dict in transformers' Llama layout, HF `tokenizers.Tokenizer`)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tqdm import tqdm
    from transformers import LlamaConfig

    reader = GGUFReader(str(path))

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    if meta("general.architecture") != "llama":
        raise UserError(f"{path}: GGUF architecture '{meta('general.architecture')}' is not llama")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UserError(
            f"{path}: tensor 'rope_freqs.weight' holds llama3 rope frequency factors (llama.cpp's form "
            f"of rope_scaling type llama3), which cannot be mapped back to rope_scaling's factor, "
            f"low/high_freq_factor and original_max_position_embeddings; import the model's Hugging "
            f"Face checkpoint instead: llmtrain import-hf HF_DIR OUT_DIR"
        )
    rope_scaling = _rope_scaling(meta, path)
    n_head, n_kv = int(meta("llama.attention.head_count")), int(meta("llama.attention.head_count_kv"))
    sd: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantise", unit="tensor", disable=None):
        hf = _hf_name(t.name)
        if hf is None:
            raise UserError(f"{path}: unexpected tensor '{t.name}' for a llama model")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists the fastest dim first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        if hf.endswith("q_proj.weight"):
            w = _unpermute(w, n_head)
        elif hf.endswith("k_proj.weight"):
            w = _unpermute(w, n_kv)
        sd[hf] = w
    tied = "lm_head.weight" not in sd
    # transformers' LlamaConfig signature lacks rope_theta / rope_scaling, which its __init__ takes (**kwargs)
    cfg = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=sd["model.embed_tokens.weight"].shape[0],
        hidden_size=int(meta("llama.embedding_length")),
        intermediate_size=int(meta("llama.feed_forward_length")),
        num_hidden_layers=int(meta("llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        max_position_embeddings=int(meta("llama.context_length")),
        rms_norm_eps=_f32(meta("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(meta("llama.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings=tied,
        bos_token_id=meta("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta("tokenizer.ggml.eos_token_id"),
    )
    if tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return cfg, sd, _tokenizer(meta, path)


def _tokenizer(meta: Any, path: str | Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if meta("tokenizer.ggml.model") != "gpt2":
        raise UserError(
            f"{path}: tokenizer model '{meta('tokenizer.ggml.model')}' is not supported (byte-level BPE 'gpt2' only)"
        )
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
    hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pre = meta("tokenizer.ggml.pre", "default")
    hf.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre in _DIGITS_FIRST
        else byte_level
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([t for t, kind in zip(tokens, types) if kind == _CONTROL])
    return hf


def _tokenizer_config(meta: Any) -> dict[str, Any]:
    """transformers' `tokenizer_config.json` of the file's tokenizer: its special tokens (bos, eos, unk, pad)
    and its chat template (`tokenizer.chat_template`), which `llmtrain prepare-data --format chat` and
    `generate --chat` use."""
    tokens = meta("tokenizer.ggml.tokens")
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, field in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        i = meta(f"tokenizer.ggml.{field}")
        if i is not None and 0 <= int(i) < len(tokens):
            cfg[key] = tokens[int(i)]
    template = meta("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def read_gguf_tokenizer(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(HF `tokenizers.Tokenizer`, tokenizer_config dict with the chat template) from a GGUF file's metadata,
    without reading its weights."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    return _tokenizer(meta, path), _tokenizer_config(meta)


def import_gguf(path: str | Path, out_dir: str | Path, replace: bool = False) -> Path:
    """Write a GGUF Llama as an llmtrain model directory (weights, config.yaml, tokenizer/ with tokenizer.json
    and tokenizer_config.json: special tokens and chat template)."""
    from llmtrain.interop.llama import from_hf
    from llmtrain.model_dir import write_model_dir

    hf_cfg, hf_sd, tok = read_gguf_llama(path)
    cfg, sd = from_hf(hf_cfg, hf_sd)
    del hf_sd
    tok_cfg = read_gguf_tokenizer(path)[1]
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(str(Path(tmp) / "tokenizer.json"))
        return write_model_dir(cfg, sd, out_dir, Path(tmp) / "tokenizer.json", replace, tokenizer_config=tok_cfg)
