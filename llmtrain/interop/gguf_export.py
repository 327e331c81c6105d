"""llmtrain decoder -> llama.cpp GGUF file (`llmtrain export-gguf MODEL OUT.gguf --type f16|q8_0|q4_0|q4_k`).

The container is written with the `gguf` package's GGUFWriter; the block formats are written here with
numpy, in llama.cpp's layouts (verified against `gguf.quants.dequantize` by tests/models/test_gguf_export.py):

| type | block | bytes | value |
| --- | --- | --- | --- |
| q8_0 | 32 | fp16 d, 32 x int8 q | d * q, d = max abs / 127 |
| q4_0 | 32 | fp16 d, 16 bytes: q[j] low nibble, q[j + 16] high | d * (q - 8), d = (signed value of max abs) / -8 |
| q5_0 | 32 | fp16 d, uint32 of the fifth bits, 16 bytes as q4_0 | d * (q - 16), d = (signed max abs) / -16 |
| q4_k | 256 = 8 x 32 | fp16 d, fp16 dmin, 12 bytes of 6-bit scales + mins, 128 bytes of nibbles | d * sc_j * q - dmin * m_j |

q4_k fits each 32-value sub-block's scale and minimum by a small search of candidate scales followed by a
least-squares refit (unweighted; llama.cpp weights the error by magnitude), then quantises the eight scales
and mins of a super-block to 6 bits against the block's largest.

Which tensor gets which type, as llama.cpp's quantiser decides: 1-D tensors (norms, biases) stay f32; a
matrix whose rows do not divide into the type's blocks falls back (q4_k -> q5_0, llama.cpp's fallback too;
q8_0 / q4_0 / q5_0 -> f16); with the 4-bit types the output matrix (`output.weight`, or the tied token
embedding) is q8_0, where llama.cpp uses q6_k, because the head is the most sensitive matrix.

Architectures: a Llama-flavour decoder writes GGUF arch "llama" (q/k rows in llama.cpp's interleaved rotary
order, the inverse of interop/gguf.py's `_unpermute`), a GPT-2-flavour one "gpt2". The tokenizer's vocabulary
and merges go into `tokenizer.ggml.*` (byte-level BPE, `tokenizer.ggml.model = gpt2`; pre-tokenizer "gpt-2",
or "smollm" where digits are split one by one first), padded with unused `[PAD{i}]` tokens up to the model's
vocabulary. The file is written beside OUT and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from llmtrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.models.gpt.config import GPTConfig

GGUF_TYPES = ("f16", "q8_0", "q4_0", "q4_k")
QK = 32  # block of q8_0 / q4_0 / q5_0
QK_K = 256  # super-block of q4_k


# ---------------------------------------------------------------------------------------------- blocks


def _blocks(w: np.ndarray, size: int) -> np.ndarray:
    """(rows * cols / size, size) float32 blocks along each row."""
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % size:
        raise ValueError(f"row length {w.shape[-1]} is not a multiple of {size}")
    return w.reshape(-1, size)


def _half(x: np.ndarray) -> np.ndarray:
    """float32 -> the float32 value of its float16 rounding (what the file will hold)."""
    return x.astype(np.float16).astype(np.float32)


def _round(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (C's roundf, which llama.cpp uses)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0.0, 1.0 / d).astype(np.float32)


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """q8_0 blocks of each row of `w` (rows, cols): uint8 (rows, cols / 32 * 34)."""
    b = _blocks(w, QK)
    d = _half(np.abs(b).max(axis=1, keepdims=True) / 127)
    q = np.clip(_round(b * _inverse(d)), -127, 127).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(*w.shape[:-1], -1)


def _signed_max(b: np.ndarray) -> np.ndarray:
    """Per block, the value of largest magnitude, with its sign."""
    return np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 -> (n, 16) bytes: element j in the low nibble of byte j, j + 16 in the high one."""
    q = q.astype(np.uint8) & np.uint8(0x0F)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def quantize_q4_0(w: np.ndarray) -> np.ndarray:
    """q4_0 blocks: uint8 (rows, cols / 32 * 18)."""
    b = _blocks(w, QK)
    d = _half(_signed_max(b) / -8)
    q = np.clip(_round(b * _inverse(d)) + 8, 0, 15)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), _nibbles(q)], axis=1)
    return out.reshape(*w.shape[:-1], -1)


def quantize_q5_0(w: np.ndarray) -> np.ndarray:
    """q5_0 blocks: uint8 (rows, cols / 32 * 22): fp16 d, the 32 fifth bits as a little-endian uint32, nibbles."""
    b = _blocks(w, QK)
    d = _half(_signed_max(b) / -16)
    q = np.clip(_round(b * _inverse(d)) + 16, 0, 31).astype(np.uint32)
    high = ((q >> np.uint32(4)) << np.arange(QK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    out = np.concatenate(
        [d.astype(np.float16).view(np.uint8), high.astype("<u4")[:, None].view(np.uint8), _nibbles(q)], axis=1
    )
    return out.reshape(*w.shape[:-1], -1)


def _fit_min_scale(x: np.ndarray, steps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (n, 32): (scale >= 0, min >= 0) so that x ~ scale * q - min with q in 0..15.

    Candidates: 4-bit grids from the row's min (clamped <= 0) to its max with the step scaled by
    15 / (15 + t), t in -1 .. 1; each grid's assignment is refitted by least squares (x ~ s q + b, b <= 0)
    and the one of least squared error wins."""
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = x.max(axis=1)
    span = hi - lo
    best_s = span / 15
    best_b = lo.copy()
    best_err = np.full(x.shape[0], np.inf, dtype=np.float64)
    n = x.shape[1]
    sx = x.sum(axis=1, dtype=np.float64)
    for t in np.linspace(-1.0, 1.0, steps + 1):
        iscale = np.where(span > 0, (15 + t) / np.where(span > 0, span, 1), 0)
        q = np.clip(_round((x - lo[:, None]) * iscale[:, None]), 0, 15)
        sq = q.sum(axis=1, dtype=np.float64)
        sqq = (q * q).sum(axis=1, dtype=np.float64)
        sqx = (q * x).sum(axis=1, dtype=np.float64)
        det = n * sqq - sq * sq
        ok = det > 0
        s = np.where(ok, (n * sqx - sq * sx) / np.where(ok, det, 1), 0.0)
        b = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), lo)
        pos = b > 0  # the minimum must not be above zero: refit the scale alone
        s = np.where(pos, sqx / np.maximum(sqq, 1e-30), s)
        b = np.where(pos, 0.0, b)
        s = np.maximum(s, 0.0)
        err = ((s[:, None] * q + b[:, None] - x) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_b = np.where(better, b, best_b)
    return best_s.astype(np.float32), (-best_b).astype(np.float32)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block (n, 8) -> (n, 12) bytes, llama.cpp's q4_k packing:
    bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7, bytes 4-7 the same for
    the mins, bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """q4_k super-blocks: uint8 (rows, cols / 256 * 144)."""
    b = _blocks(w, QK_K)
    n = b.shape[0]
    sub = b.reshape(n * 8, 32)
    scale, mins = (a.reshape(n, 8) for a in _fit_min_scale(sub))
    d = _half(scale.max(axis=1) / 63)
    dmin = _half(mins.max(axis=1) / 63)
    sc = np.clip(_round(scale * _inverse(d)[:, None]), 0, 63)
    mn = np.clip(_round(mins * _inverse(dmin)[:, None]), 0, 63)
    step = (d[:, None] * sc).reshape(n * 8, 1)  # the scales as the file holds them
    low = (dmin[:, None] * mn).reshape(n * 8, 1)
    q = np.clip(_round((sub + low) * _inverse(step)), 0, 15).astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << np.uint8(4))).reshape(n, 128)  # sub-block 2k low nibble, 2k + 1 high
    out = np.concatenate(
        [
            d.astype(np.float16)[:, None].view(np.uint8),
            dmin.astype(np.float16)[:, None].view(np.uint8),
            _pack_scales(sc, mn),
            qs,
        ],
        axis=1,
    )
    return out.reshape(*w.shape[:-1], -1)


def _chunked(fn: Any, w: np.ndarray, rows: int = 2048) -> np.ndarray:
    """fn over groups of rows (bounds the float temporaries of a large embedding)."""
    return np.concatenate([fn(w[i : i + rows]) for i in range(0, w.shape[0], rows)], axis=0)


_QUANTIZERS = {"q8_0": (QK, quantize_q8_0), "q4_0": (QK, quantize_q4_0), "q5_0": (QK, quantize_q5_0)}
_QUANTIZERS["q4_k"] = (QK_K, quantize_q4_k)
_FALLBACK = {"q4_k": "q5_0", "q5_0": "f16", "q4_0": "f16", "q8_0": "f16"}


def encode_tensor(w: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """(array for GGUFWriter.add_tensor, the type actually used) of the float tensor `w` as `kind`: 1-D
    tensors stay f32; a matrix whose rows do not divide into the type's blocks takes the fallback type."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 1 or kind == "f32":
        return w, "f32"
    while kind in _QUANTIZERS and w.shape[-1] % _QUANTIZERS[kind][0]:
        kind = _FALLBACK[kind]
    if kind == "f16":
        return w.astype(np.float16), "f16"
    return _chunked(_QUANTIZERS[kind][1], w), kind


# ----------------------------------------------------------------------------------------- tensors


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows (n_head * hs, ...) from the half-split rotary order to llama.cpp's interleaved one (the inverse
    of interop/gguf.py's `_unpermute`)."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# transformers Llama layer name -> llama.cpp's (the inverse of interop/gguf.py's _NAMES)
_LLAMA_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LLAMA_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# llmtrain's GPT-2-flavour names -> llama.cpp's gpt2 names (weights are nn.Linear (out, in) on both sides)
_GPT2_TOP = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
_GPT2_LAYER = {
    "ln_1": "attn_norm",
    "attn.qkv": "attn_qkv",
    "attn.proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.up": "ffn_up",
    "mlp.down": "ffn_down",
}


def _llama_tensors(c: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from llmtrain.interop.llama import to_hf

    _, hf = to_hf(c, sd)
    out = {}
    n_kv = c.n_kv_head or c.n_head
    for name, t in hf.items():
        if name in _LLAMA_TOP:
            out[_LLAMA_TOP[name]] = t
            continue
        _, _, i, *rest = name.split(".")  # model.layers.{i}.<module>.weight
        module = _LLAMA_LAYER[".".join(rest[:-1])]
        if module == "attn_q":
            t = _permute(t, c.n_head)
        elif module == "attn_k":
            t = _permute(t, n_kv)
        out[f"blk.{i}.{module}.{rest[-1]}"] = t
    return out


def _gpt2_tensors(c: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from llmtrain.interop.gpt2 import to_hf

    _, hf = to_hf(c, sd)  # for the position table (sinusoids of a model.pos=sinusoidal model)
    out = {"position_embd.weight": hf["transformer.wpe.weight"]}
    for name, t in sd.items():
        if name.startswith("blocks."):
            _, i, *rest = name.split(".")
            out[f"blk.{i}.{_GPT2_LAYER['.'.join(rest[:-1])]}.{rest[-1]}"] = t
        elif name in _GPT2_TOP and name != "wpe.weight" and not (name == "lm_head.weight" and c.tie_embeddings):
            out[_GPT2_TOP[name]] = t
    return out


# --------------------------------------------------------------------------------------- tokenizer


def _tokenizer_meta(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.* values for a byte-level BPE tokenizer, padded to the model's vocabulary."""
    spec = json.loads(tok.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(spec.get("decoder")):
        raise UserError(
            f"{tok.source}: GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' vocabulary); "
            f"this one is {model.get('type')}"
        )
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        pre_name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        pre_name = "smollm"  # llama.cpp's name for: single digits first, then GPT-2's split
    else:
        raise UserError(
            f"{tok.source}: pre-tokenizer {kinds} has no llama.cpp equivalent that llmtrain writes "
            f"(ByteLevel, or Digits(individual) + ByteLevel)"
        )
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    if len(tokens) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokens)} tokens, more than the model's model.vocab_size={vocab_size}")
    specials = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    types = [3 if t in specials else 1 for t in tokens]  # CONTROL / NORMAL
    pad = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]  # rows no tokenizer id reaches
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "pre": pre_name,
        "tokens": tokens + pad,
        "types": types + [5] * len(pad),  # UNUSED
        "merges": merges,
        "eos": tok.eos_id,
    }


def _byte_level(decoder: Any) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_byte_level(d) for d in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"


# -------------------------------------------------------------------------------------------- write


def _file_type(kind: str) -> int:
    from gguf import LlamaFileType

    return int(
        {
            "f16": LlamaFileType.MOSTLY_F16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0,
            "q4_0": LlamaFileType.MOSTLY_Q4_0,
            "q4_k": LlamaFileType.MOSTLY_Q4_K_M,
        }[kind]
    )


def _ggml_type(kind: str) -> Any:
    from gguf import GGMLQuantizationType as T

    return {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q5_0": T.Q5_0, "q4_k": T.Q4_K}.get(kind)


def check_exportable(cfg: Any, source: str | Path) -> str:
    """The GGUF architecture ("llama" or "gpt2") of a model config; UserError for anything else."""
    from llmtrain.models.registry import family_of

    family = family_of(cfg)
    if family.name != "gpt":
        raise UserError(
            f"{source}: model.arch={family.name} is not a decoder; GGUF export supports decoders "
            f"(the Llama and GPT-2 flavours of model.arch=gpt)"
        )
    from llmtrain.interop import gpt2, llama

    if getattr(cfg, "moe", None) is not None:
        raise UserError(
            f"{source}: model.moe is set: GGUF export writes dense decoders; a mixture-of-experts model exports "
            f"through llmtrain export-hf (Mixtral)"
        )
    if llama.exports(cfg):
        if cfg.bias:
            raise UserError(f"{source}: model.bias=true: GGUF llama files from llmtrain have no biases")
        if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type != "linear":
            raise UserError(
                f"{source}: model.rope_scaling type {cfg.rope_scaling.rope_type} is not written to GGUF "
                f"(linear only); export it with llmtrain export-hf instead"
            )
        return "llama"
    if gpt2.exports(cfg):
        if cfg.gelu_approximate != "tanh":
            raise UserError(
                f"{source}: model.gelu_approximate={cfg.gelu_approximate}: llama.cpp's gpt2 graph runs the tanh GELU, "
                f"so this model would compute differently there; train with the default model.gelu_approximate=tanh "
                f"(or export it with llmtrain export-hf)"
            )
        return "gpt2"
    raise UserError(
        f"{source}: model.pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp} is neither the Llama flavour "
        f"(rope, rmsnorm, swiglu) nor the GPT-2 one (learned/sinusoidal, layernorm, gelu) that GGUF export writes"
    )


def _plain_weights(cfg: Any, sd: dict[str, torch.Tensor], source: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A converted model's (e.g. `llmtrain quantize`'s) plain config and weights, its converters undone
    (quantised linears dequantised); a plain model's as they are."""
    import dataclasses

    import torch

    from llmtrain.models.converters import build_converted_model, unconvert

    if not cfg.converters:
        return cfg, sd
    with torch.device("meta"):
        model = build_converted_model(cfg)
    model.load_state_dict(sd, assign=True)
    if not unconvert(model, cfg):
        raise UserError(f"{source}: model.converters={cfg.converters} cannot be undone for a GGUF export")
    return dataclasses.replace(cfg, converters=[]), {n: t.detach().float() for n, t in model.state_dict().items()}


def export_gguf(model: str | Path, out: str | Path, kind: str = "f16", replace: bool = False) -> dict[str, int]:
    """Write the model at `model` (checkpoint, run dir, consolidated or imported directory) as a GGUF file.
    Returns how many tensors got each type."""
    import gguf

    from llmtrain.inference import checkpoint_tokenizer
    from llmtrain.parallel.consolidate import load_model_weights

    if kind not in GGUF_TYPES:
        raise UserError(f"--type {kind}: GGUF export writes {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise UserError(f"{out}: the output file name must end in .gguf")
    if out.is_dir():
        raise UserError(f"{out} is a directory; pass the path of a .gguf file")
    if out.exists() and not replace:
        raise UserError(f"{out} exists; choose a new file name or pass --replace to replace it")
    model_cfg, sd = _plain_weights(*load_model_weights(model), model)
    arch = check_exportable(model_cfg, model)
    cfg = cast("GPTConfig", model_cfg)  # a decoder's config, checked above
    try:
        tok = checkpoint_tokenizer(model)
    except (ValueError, UserError) as exc:
        raise UserError(f"{model}: no tokenizer found for the GGUF vocabulary ({exc})") from None
    meta = _tokenizer_meta(tok, cfg.vocab_size)
    tensors = _llama_tensors(cfg, sd) if arch == "llama" else _gpt2_tensors(cfg, sd)
    del sd

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write_meta(w, arch, cfg, meta, kind, Path(model).name)
        head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        counts: dict[str, int] = {}
        for name, t in tensors.items():
            want = "q8_0" if kind in ("q4_0", "q4_k") and name == head else kind
            data, used = encode_tensor(t.detach().float().numpy(), want)
            counts[used] = counts.get(used, 0) + 1
            w.add_tensor(name, data, raw_dtype=_ggml_type(used))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return counts


def _write_meta(w: Any, arch: str, c: GPTConfig, meta: dict[str, Any], kind: str, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_file_type(_file_type(kind))
    if kind != "f16":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.intermediate_size or 4 * c.n_embd)
    w.add_head_count(c.n_head)
    w.add_vocab_size(c.vocab_size)
    if arch == "llama":
        hs = c.head_dim or c.n_embd // c.n_head
        w.add_head_count_kv(c.n_kv_head or c.n_head)
        w.add_rope_dimension_count(hs)
        if hs * c.n_head != c.n_embd:
            w.add_key_length(hs)
            w.add_value_length(hs)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_rope_freq_base(c.rope_theta)
        if c.rope_scaling is not None:  # linear (check_exportable refuses the rest)
            from llmtrain.utils import eprint

            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(c.rope_scaling.factor)
            eprint(
                "note: linear rope scaling is written as llama.rope.scaling.*, which llama.cpp and llmtrain "
                "import-hf read; transformers' GGUF loader ignores it: load the file there with rope_parameters="
                f"{{'rope_type': 'linear', 'factor': {c.rope_scaling.factor}, 'rope_theta': {c.rope_theta}}}"
            )
    else:
        w.add_layer_norm_eps(c.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    w.add_eos_token_id(meta["eos"])
    w.add_bos_token_id(meta["eos"])  # GPT-2's convention: <|endoftext|> both ends; never added to a prompt
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
