"""Quantised models (`llmtrain quantize`'s QuantLinear directories) out to real clients:
`llmtrain export-hf` writes compressed-tensors int8/int4 that transformers loads without custom code, with
the logits of our quantised model (the export is lossless: the same integers, scales and zero points), and
`llmtrain export-gguf` takes a quantised directory too (dequantised, then GGUF's own blocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtrain.cli import main
from llmtrain.interop.hf_quant import pack_int32
from llmtrain.models import ModelConfig, build_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

TEXT = "In the beginning God created the heaven and the earth. Shall I compare thee to a summer's day? " * 4
LLAMA = dict(
    name="llama_debug",
    arch="gpt",
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=64,
    intermediate_size=128,
    vocab_size=320,
    block_size=64,
    pos="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
    norm_eps=1e-5,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from llmtrain.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer([TEXT] * 4, "bpe", 300)
    tok.save(root)
    return tok, root / "tokenizer.json"


def _quantized_dir(out: Path, tokenizer_json: Path, bits: int, group_size: int, **overrides) -> tuple[Path, object]:
    """A model directory as `llmtrain quantize --method rtn` writes it, and our quantised model."""
    import dataclasses

    from llmtrain.compress.quant.linear import CONVERTER
    from llmtrain.compress.quant.ptq import quantize_model
    from llmtrain.model_dir import model_config_yaml, model_tensors, write_config_text, write_weights, writing
    from llmtrain.models.config import WeightQuant

    torch.manual_seed(0)
    cfg = ModelConfig(**{**LLAMA, **overrides})
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # logits of a few units, so that the comparisons below are not of noise
    wq = WeightQuant(bits=bits, group_size=group_size)
    quantize_model(model.eval(), wq, "rtn")
    model.cfg = dataclasses.replace(cfg, converters=[CONVERTER], weight_quant=wq)
    with writing(out) as tmp:
        write_weights(tmp, model_tensors(model))
        write_config_text(tmp, model_config_yaml(model.cfg))
        (tmp / "tokenizer").mkdir()
        shutil.copyfile(tokenizer_json, tmp / "tokenizer" / "tokenizer.json")
    return out, model


def test_pack_int32_matches_compressed_tensors():
    """Our packing is compressed-tensors' own (its unpack gives the values back)."""
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    rng = np.random.default_rng(0)
    for bits in (4, 8):
        u = rng.integers(0, 2**bits, size=(6, 40)).astype(np.uint8)  # 40: not a whole number of words
        packed = torch.from_numpy(pack_int32(u, bits))
        signed = torch.from_numpy(u.astype(np.int16) - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(packed, ct.pack_to_int32(signed, bits))
        assert torch.equal(ct.unpack_from_int32(packed, bits, torch.Size(u.shape)), signed)


@pytest.mark.parametrize(
    "bits,group_size,tied",
    [(8, 32, False), (4, 32, False), (8, 0, True), (4, 0, True)],
    ids=["int8-g32", "int4-g32", "int8-channel-tied", "int4-channel-tied"],
)
def test_export_hf_of_quantized_model_loads_in_transformers(tmp_path, tokenizer, bits, group_size, tied):
    """compressed-tensors directory: integers packed in int32 (no fp32 copy of a quantised weight), the float
    head of a tied model in `ignore`; transformers' logits equal our quantised model's (lossless export)."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install .[quant])")
    from safetensors import safe_open

    tok, tok_json = tokenizer
    src, ours = _quantized_dir(tmp_path / "q", tok_json, bits, group_size, tie_embeddings=tied)
    out = tmp_path / "hf"
    assert main(["export-hf", str(src), str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    assert qc["ignore"] == (["lm_head"] if tied else [])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed").dtype == torch.int32
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert ("lm_head.weight_packed" in keys) == (not tied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(TEXT)[:48]])
    with torch.no_grad():
        ref, logits = ours(ids), hf(ids).logits
    assert ref.abs().max() > 1
    assert (logits - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(TEXT[:60])["input_ids"] == tok.encode(TEXT[:60])


def test_export_gguf_of_quantized_model(tmp_path, tokenizer):
    """export-gguf dequantises a quantised directory, then writes GGUF's types: an f16 file gives transformers
    logits within 2e-3 of max|logit| of our quantised model; a q8_0 file's weights, read back by the project's
    importer, are within half a q8_0 step of our dequantised weights (this random model amplifies any weight
    error in its logits, so they are compared where the format's bound is exact)."""
    from llmtrain.interop.gguf import read_gguf_llama
    from llmtrain.interop.llama import from_hf

    tok, tok_json = tokenizer
    src, ours = _quantized_dir(tmp_path / "q", tok_json, 8, 32)
    paths = {k: tmp_path / "out" / f"q-{k}.gguf" for k in ("f16", "q8_0")}
    for kind, path in paths.items():
        assert main(["export-gguf", str(src), str(path), "--type", kind]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), gguf_file=paths["f16"].name, dtype=torch.float32
    )
    ids = torch.tensor([tok.encode(TEXT)[:48]])
    with torch.no_grad():
        ref, logits = ours(ids), hf.eval()(ids).logits
    assert (logits - ref).abs().max().item() <= 2e-3 * ref.abs().max().item()
    _, sd = from_hf(*read_gguf_llama(paths["q8_0"])[:2])
    params = dict(ours.named_parameters())
    for name, t in sd.items():
        w = params[name] if name in params else ours.get_submodule(name.removesuffix(".weight")).weight
        assert (t - w).abs().max() <= w.abs().max() / 254 * 1.01 + 1e-7, name


def test_export_hf_of_quantized_gpt2_flavour_is_refused(tmp_path, tokenizer, capsys):
    tok, tok_json = tokenizer
    src, _ = _quantized_dir(
        tmp_path / "q", tok_json, 8, 32, pos="learned", norm="layernorm", mlp="gelu", n_kv_head=None, bias=True
    )
    assert main(["export-hf", str(src), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "Conv1D" in err and "export-gguf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
