"""llama.cpp GGUF import (`llmtrain/interop/gguf.py`) against transformers, no download: a tiny random
LlamaForCausalLM is written as a GGUF file the way llama.cpp's converter writes one (its metadata keys, taken
from the `gguf` package's constants; q/k rows in the interleaved rotary order; a gpt2-style vocabulary) and
imported through `import-hf`. fp32 on both sides, so logits agree within 1e-5 as in test_hf_parity.py.
Rotary scaling metadata is read as llama.cpp reads it; what llmtrain cannot reproduce is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers

from llmtrain.interop.gguf import read_gguf_llama
from llmtrain.interop.llama import from_hf
from llmtrain.models import RopeScaling, build_model

TOL = dict(atol=1e-5, rtol=1e-5)
ROPE = gguf.Keys.Rope
# byte-level BPE vocabulary: printable ASCII, the byte-level space, three merges and one control token
TOKENS = [chr(c) for c in range(33, 127)] + ["Ġ", "th", "the", "Ġthe", "<|endoftext|>"]
MERGES = ["t h", "th e", "Ġ the"]
VOCAB = len(TOKENS)  # 99, not a multiple of 64

# transformers Llama name -> llama.cpp tensor name ({i} = layer), as llama.cpp's converter names them
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER = {
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


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, i, *rest = hf_name.split(".")  # model.layers.{i}.<module>.weight
    return f"blk.{i}.{_GGUF_LAYER['.'.join(rest[:-1])]}.weight"


def _interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows per head from the half-split rotary order (i pairs with i + hs/2) to llama.cpp's interleaved
    order (2i pairs with 2i + 1): row j of the first half goes to 2j, row j of the second half to 2j + 1."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, 2, hs // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _hf_llama(rope_scaling: dict | None = None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_scaling=rope_scaling,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for _name, p in hf.named_parameters():
            if p.ndim == 1:  # HF's init leaves norms at 1: perturb them so that they are tested
                p.add_(0.1 * torch.randn_like(p))
        for layer in hf.model.layers:  # sharper attention, so that positions move the logits visibly
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return hf


def _write_gguf(path: Path, hf: Any, rope: dict[str, Any], extra: dict[str, np.ndarray] | None = None) -> Path:
    """`hf` as llama.cpp's converter writes it (f32 tensors), with the rotary metadata `rope` ({key: value})."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(5000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in rope.items():
        {str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(value)](key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL for t in TOKENS])
    w.add_token_merges(MERGES)
    w.add_eos_token_id(TOKENS.index("<|endoftext|>"))
    for name, t in hf.state_dict().items():
        a = t.numpy()
        if "q_proj" in name:
            a = _interleave(a, c.num_attention_heads)
        elif "k_proj" in name:
            a = _interleave(a, c.num_key_value_heads)
        w.add_tensor(_gguf_name(name), np.ascontiguousarray(a, dtype=np.float32))
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_linear_rope_scaling_matches_transformers(tmp_path):
    """llama.cpp's linear scaling metadata imports as model.rope_scaling: import-hf of the GGUF file gives
    transformers' logits within 1e-5, and the scaling matters (the same weights without it are far off)."""
    from tokenizers import Tokenizer

    from llmtrain.interop.cli import import_hf
    from llmtrain.parallel.consolidate import load_model_weights

    hf = _hf_llama({"rope_type": "linear", "factor": 4.0})
    src = _write_gguf(
        tmp_path / "tiny.gguf",
        hf,
        {ROPE.SCALING_TYPE.format(arch="llama"): "linear", ROPE.SCALING_FACTOR.format(arch="llama"): 4.0},
    )
    out = import_hf(src, tmp_path / "ours")
    cfg, sd = load_model_weights(out)
    assert cfg.rope_scaling == RopeScaling("linear", 4.0) and cfg.rope_theta == 5000.0 and cfg.n_kv_head == 2
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)
    plain = build_model(dataclasses.replace(cfg, rope_scaling=None)).eval()
    plain.load_state_dict(sd)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, mine, unscaled = hf(ids).logits, ours(ids), plain(ids)
    print(
        f"max |dlogits| vs transformers: scaled {(mine - ref).abs().max():.2e}, "
        f"without scaling {(unscaled - ref).abs().max():.2e}"
    )
    torch.testing.assert_close(mine, ref, **TOL)
    assert (unscaled - ref).abs().max() > 1e-2  # 1000x the parity tolerance
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    assert tok.encode("hi the").ids == [TOKENS.index("h"), TOKENS.index("i"), TOKENS.index("Ġthe")]


@pytest.mark.parametrize(
    "rope,expected",
    [
        ({}, None),
        ({"llama.rope.scaling.type": "none"}, None),
        ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, None),  # llama.cpp ignores it
        ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0}, None),
        ({"llama.rope.scaling.factor": 4.0}, RopeScaling("linear", 4.0)),  # llama.cpp's default type is linear
        ({"llama.rope.scale_linear": 2.0}, RopeScaling("linear", 2.0)),  # the key of older llama.cpp files
        (
            {
                "llama.rope.scaling.type": "linear",
                "llama.rope.scaling.factor": 2.5,
                "llama.rope.scaling.original_context_length": 256,
            },
            RopeScaling("linear", 2.5),
        ),
    ],
)
def test_gguf_rope_scaling_metadata_as_llama_cpp_reads_it(tmp_path, rope, expected):
    hf_cfg, hf_sd, _ = read_gguf_llama(_write_gguf(tmp_path / "tiny.gguf", _hf_llama(), rope))
    assert from_hf(hf_cfg, hf_sd)[0].rope_scaling == expected


@pytest.mark.parametrize(
    "rope,extra,match",
    [
        (
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": 4.0,
                "llama.rope.scaling.original_context_length": 256,
            },
            None,
            r"tiny.gguf: llama.rope.scaling.type = 'yarn' \(llama.rope.scaling.factor = 4.0, "
            r"llama.rope.scaling.original_context_length = 256\) is not supported: GGUF import maps the types 'none' "
            r"and 'linear' only",
        ),
        ({"llama.rope.scaling.type": "longrope"}, None, r"'longrope' .* is not supported"),
        (
            {
                "llama.rope.scaling.type": "linear",
                "llama.rope.scaling.factor": 4.0,
                "llama.rope.scaling.attn_factor": 0.5,
            },
            None,
            r"tiny.gguf: llama.rope.scaling.attn_factor = 0.5 is not supported",
        ),
        # llama.cpp's converter writes llama3 scaling as per-frequency factors (head size 16: 8 of them)
        (
            {},
            {"rope_freqs.weight": np.linspace(1.0, 8.0, 8, dtype=np.float32)},
            r"tiny.gguf: tensor 'rope_freqs.weight' holds llama3 rope frequency factors .* cannot be mapped back to "
            r"rope_scaling's .*llmtrain import-hf HF_DIR OUT_DIR",
        ),
    ],
)
def test_gguf_rotary_scaling_that_cannot_be_imported_is_refused(tmp_path, rope, extra, match):
    src = _write_gguf(tmp_path / "tiny.gguf", _hf_llama(), rope, extra)
    with pytest.raises(ValueError, match=match):
        read_gguf_llama(src)
