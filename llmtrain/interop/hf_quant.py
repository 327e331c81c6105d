"""A quantised model (`llmtrain quantize`: QuantLinear layers, `model.converters: [quantized_weights]`) as a
Hugging Face directory in the compressed-tensors format, which transformers loads with no custom code
(`AutoModelForCausalLM.from_pretrained(OUT)`, given the `compressed-tensors` package).

Why compressed-tensors: it is the format transformers reads for integer weight-only checkpoints on CPU
(its `quant_method: compressed-tensors` loader decompresses the weights with the package; torchao's
checkpoints are pickled tensor subclasses tied to torchao's version and need its CPU kernels, GPTQ's need
gptqmodel, bitsandbytes' int8 is a different scheme). It stores our grid exactly: compressed-tensors
dequantises `scale * (q - zero_point)` per group of `group_size` input columns, as grid.py does, so the
export is lossless (the logits equal our quantised model's; tests/models/test_gguf_export_hf_quant.py).

Layout ("pack-quantized", written here with numpy): per quantised linear `weight_packed` (int32, 32/bits
values per word, value i at bits [bits*i, bits*(i+1)) of its word, each stored as q + 2^(bits-1) with q the
signed integer), `weight_scale` (out, groups) float32, `weight_shape` (int64 [out, in]) and, for an
asymmetric grid, `weight_zero_point` packed the same way along the output dimension. Our asymmetric integers
(0 .. 2^bits - 1, zero point likewise) are the signed ones plus 2^(bits-1) already, so they are stored as
they are; symmetric ones get 2^(bits-1) added. Linears left in float (tied heads, `weight_quant.skip`) are
listed in `ignore`.

An asymmetric grid's config says `"dequantize": true`: with compressed-tensors 0.20, transformers 5.25's
default path builds the zero point unpacked and refuses the packed one the format defines; its
dequantize-at-load path reads it. Either way transformers holds dequantised float weights on CPU.

Llama flavour only: transformers' GPT-2 keeps its projections in Conv1D layers (transposed weights), which
compressed-tensors does not quantise; `llmtrain export-gguf` takes a quantised GPT-2-flavour model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from llmtrain.models.config import ModelConfig


def is_quantized(cfg: ModelConfig) -> bool:
    from llmtrain.compress.quant.linear import CONVERTER

    return CONVERTER in (getattr(cfg, "converters", None) or [])


def pack_int32(u: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) unsigned values < 2^bits -> (rows, ceil(cols * bits / 32)) int32, value i of a row at bits
    [bits*i, bits*(i+1)) of the row's little-endian words (compressed-tensors' dense packing, for 4 and 8 bits)."""
    if bits not in (4, 8):
        raise ValueError(f"packing of {bits}-bit values")
    u = np.asarray(u, dtype=np.uint8)
    per_word = 32 // bits
    pad = -u.shape[1] % per_word
    if pad:
        u = np.pad(u, ((0, 0), (0, pad)))
    if bits == 4:
        u = (u[:, 0::2] & 0x0F) | ((u[:, 1::2] & 0x0F) << 4)
    return np.ascontiguousarray(u).view("<i4").astype(np.int32)


def _scheme(spec: Any, ignore: list[str]) -> dict[str, Any]:
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.sym,
        "strategy": "group" if spec.group_size else "channel",
        "group_size": spec.group_size or None,
        "dynamic": False,
    }
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    if not spec.sym:  # see the module docstring
        config["dequantize"] = True
    return config


def export_quantized_hf(checkpoint: str | Path, out_dir: str | Path, replace: bool = False) -> Path:
    """Write the quantised model at `checkpoint` as a compressed-tensors transformers directory."""
    import torch

    from llmtrain.compress.quant.grid import dequantize, unpack_int4
    from llmtrain.compress.quant.linear import CONVERTER, spec_of, weight_quant_of
    from llmtrain.inference import checkpoint_tokenizer
    from llmtrain.interop import family_for_config, llama
    from llmtrain.interop.hf import _write_hf
    from llmtrain.model_dir import check_output, writing
    from llmtrain.parallel.consolidate import load_model_weights

    check_output(out_dir, replace)
    cfg, weights = load_model_weights(checkpoint)
    others = [c for c in cfg.converters if c != CONVERTER]
    if others:
        raise UserError(f"{checkpoint}: converters {others} besides quantized_weights have no Hugging Face export")
    family = family_for_config(dataclass_without_converters(cfg))
    if family is not llama:
        why = (
            "transformers' GPT-2 keeps its projections in Conv1D layers, which compressed-tensors does not "
            "quantise; use llmtrain export-gguf for it"
            if family.HF_ARCHITECTURE == "GPT2LMHeadModel"
            else "the quantised export writes the dense Llama flavour only; export the unquantised source instead"
        )
        raise UserError(f"{checkpoint}: a quantised {family.HF_ARCHITECTURE} export is not written: {why}")
    spec = spec_of(weight_quant_of(cfg))
    modules = sorted(n.removesuffix(".weight_q") for n in weights if n.endswith(".weight_q"))
    ints: dict[str, torch.Tensor] = {}
    plain = {n: t for n, t in weights.items() if not n.rsplit(".", 1)[-1].startswith("weight_")}
    for m in modules:
        q = weights[f"{m}.weight_q"]
        q = unpack_int4(q) if spec.bits == 4 else q
        scale = weights[f"{m}.weight_scale"].float()
        zero = weights[f"{m}.weight_zero"].float() if f"{m}.weight_zero" in weights else torch.zeros_like(scale)
        plain[f"{m}.weight"] = dequantize(q, scale, zero, spec)
        ints[m] = q
        ints[f"{m}#scale"], ints[f"{m}#zero"] = scale, zero
    plain_cfg = dataclass_without_converters(cfg)
    hf_cfg, hf_sd = family.to_hf(plain_cfg, plain)
    # the same name mapping (and q / k / v row split) for the integers, scales and zero points
    parts = {}
    for part in ("", "#scale", "#zero"):
        sd = {**plain, **{f"{m}.weight": ints[m + part] for m in modules}}
        _, mapped = family.to_hf(plain_cfg, sd)
        parts[part] = mapped
    quantized = sorted(k for k, t in parts[""].items() if not t.is_floating_point())
    linears = [k for k, t in hf_sd.items() if k.endswith(".weight") and t.ndim == 2 and "embed_tokens" not in k]
    linears += [] if "lm_head.weight" in hf_sd else ["lm_head.weight"]  # a tied head: a float Linear there too
    ignore = sorted(k.removesuffix(".weight") for k in linears if k not in quantized)
    offset = 2 ** (spec.bits - 1) if spec.sym else 0  # stored = signed q + 2^(bits-1); asymmetric q already is
    for k in quantized:
        m = k.removesuffix(".weight")
        q = parts[""][k].to(torch.int32) + offset
        del hf_sd[k]
        hf_sd[f"{m}.weight_packed"] = torch.from_numpy(pack_int32(q.numpy().astype(np.uint8), spec.bits))
        hf_sd[f"{m}.weight_scale"] = parts["#scale"][k].float().contiguous()
        hf_sd[f"{m}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
        if not spec.sym:
            zero = parts["#zero"][k].to(torch.int32).numpy().astype(np.uint8)  # (out, groups)
            hf_sd[f"{m}.weight_zero_point"] = torch.from_numpy(np.ascontiguousarray(pack_int32(zero.T, spec.bits).T))
    hf_cfg.quantization_config = _scheme(spec, ignore)
    try:
        tok = checkpoint_tokenizer(checkpoint)
    except (ValueError, UserError):
        tok = None
    with writing(out_dir, replace) as tmp:
        _write_hf(tmp, plain_cfg, family, hf_cfg, hf_sd, tok)
    return Path(out_dir)


def dataclass_without_converters(cfg: ModelConfig) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, converters=[])
