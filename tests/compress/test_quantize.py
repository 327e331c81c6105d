"""Post-training quantisation (llmtrain/compress/quant/{linear,ptq,gptq}.py): error bounds per method, GPTQ
against round-to-nearest on a layer's output, the packed directory format and its readers (eval,
generate, model.init_from), `llmtrain quantize` on the GPT-2 and Llama flavours and BERT, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ROOT
from safetensors import safe_open
from torch import nn

from llmtrain.cli import main
from llmtrain.compress.quant.gptq import HessianCollector, gptq_quantize
from llmtrain.compress.quant.grid import QuantSpec, dequantize, group_params, quantize
from llmtrain.compress.quant.linear import QuantLinear
from llmtrain.config import load_config
from llmtrain.model_dir import write_model
from llmtrain.models import build_model
from llmtrain.models.converters import build_converted_model
from llmtrain.parallel.consolidate import init_model_from, load_model_weights

TINY_GPT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "train.seq_len=64"]
FLAVOURS = {
    "gpt2": TINY_GPT,
    "llama": ["model.name=llama_debug", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_kv_head=1",
              "model.intermediate_size=128", "train.seq_len=64"],
    "bert": ["model.name=bert_debug", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "data.tokenizer=wordpiece",
             "data.sample_kind=bert", "train.seq_len=64"],
}  # fmt: skip


def _model_dir(path, overrides, seed=0):
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    model.init_weights()
    write_model(path, cfg, model)
    return model


def _layer_data(seed=0, out=48, inp=128, tokens=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    # correlated inputs with a few loud channels, as activations have: where GPTQ's compensation pays
    x = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    x[:, :4] *= 8
    return w, x


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 0), (4, 32), (4, 128)])
def test_rtn_and_gptq_error_bounds(bits, group):
    spec = QuantSpec(bits, group)
    w, x = _layer_data()
    scale, zero = group_params(w, spec)
    q = quantize(w, scale, zero, spec)
    err = (dequantize(q, scale, zero, spec) - w).abs().reshape(w.shape[0], spec.groups(w.shape[1]), -1)
    assert (err <= scale.unsqueeze(-1) / 2 * (1 + 1e-5)).all()  # RTN: half a step of its group
    assert (q.float() >= spec.qmin).all() and (q.float() <= spec.qmax).all()

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    col = HessianCollector({"l": lin})
    lin(x[:256])
    lin(x[256:])  # two batches: the running mean equals one pass over all tokens
    col.remove()
    torch.testing.assert_close(col.h["l"], 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    gq, gs, gz = gptq_quantize(w, col.h["l"], spec)
    assert (gq.float() >= spec.qmin).all() and (gq.float() <= spec.qmax).all()
    # GPTQ trades weight error for output error: it stays within a few RTN errors of the weights
    gptq_err = (dequantize(gq, gs, gz, spec) - w).norm()
    rtn_err = (dequantize(q, scale, zero, spec) - w).norm()
    assert rtn_err < gptq_err < 3 * rtn_err, (gptq_err, rtn_err)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 0), (8, 64)])
def test_gptq_beats_rtn_on_layer_output(bits, group):
    spec = QuantSpec(bits, group)
    w, x = _layer_data(seed=1)
    calib, held = x[:384], x[384:]  # judged on inputs it did not see
    h = 2 * calib.t() @ calib / calib.shape[0]
    ref = held @ w.t()

    def out_err(q, s, z):
        return ((held @ dequantize(q, s, z, spec).t() - ref) ** 2).mean().item()

    s, z = group_params(w, spec)
    rtn = out_err(quantize(w, s, z, spec), s, z)
    gptq = out_err(*gptq_quantize(w, h, spec))
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_quantlinear_packed_round_trip_and_meta():
    spec = QuantSpec(4, 16)
    lin = nn.Linear(64, 24)
    ql = QuantLinear.from_linear(lin, spec)
    assert ql.weight_q.shape == (24, 32) and ql.weight_q.dtype == torch.uint8  # two per byte
    s, z = group_params(lin.weight, spec)
    q = quantize(lin.weight, s, z, spec)
    assert torch.equal(ql.integers()[0], q)
    torch.testing.assert_close(ql.weight, dequantize(q, s, z, spec))
    x = torch.randn(3, 64)
    torch.testing.assert_close(ql(x), x @ ql.weight.t() + lin.bias)
    assert [n for n, _ in ql.named_parameters()] == ["bias"]
    with torch.device("meta"):
        assert QuantLinear.from_linear(nn.Linear(64, 24), spec).weight.shape == (24, 64)


def test_quantize_gpt2_flavour_directory_eval_generate_init_from(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "q4"
    fp = _model_dir(src, FLAVOURS["gpt2"])
    recipe = ROOT / "recipes" / "quantize_gpt_debug.yaml"  # int4 gptq, group 64: flags and keys override it
    args = ["quantize", str(src), "--recipe", str(recipe), "--group-size", "32", "--out", str(out)]
    assert main([*args, "quantize.calib_batches=2", "--eval-batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "bytes:" in printed and "held-out perplexity:" in printed and "8 linear layers" in printed
    figures = json.loads((out / "quantize.json").read_text())
    assert figures["bytes_after"] < figures["bytes_before"] and figures["ppl_after"] > 0
    assert (figures["bits"], figures["method"], figures["group_size"], figures["calib_batches"]) == (4, "gptq", 32, 2)

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # packed integers, not fp32 copies
        assert f.get_tensor("blocks.0.attn.qkv.weight_q").dtype == torch.uint8
        assert f.get_tensor("blocks.0.attn.qkv.weight_q").shape == (192, 32)
        assert "blocks.0.attn.qkv.weight" not in f.keys() and "lm_head.weight" not in f.keys()  # tied: wte
    cfg, weights = load_model_weights(out)
    assert cfg.converters == ["quantized_weights"] and cfg.weight_quant["bits"] == 4
    with torch.device("meta"):
        meta = build_converted_model(cfg)
    assert set(meta.state_dict()) == set(weights)
    model = build_converted_model(cfg)
    model.load_state_dict(weights)
    assert isinstance(model.blocks[1].mlp.down, QuantLinear) and type(model.lm_head) is nn.Linear

    assert main(["eval", str(out), "--batches", "2", "--batch-size", "2", "--seq-len", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "And the", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("And the")

    # init_from dequantises: a plain model of the same shape gets exactly the quantised model's function
    plain = build_model(load_config(None, [*FLAVOURS["gpt2"], f"model.init_from={out}"]).model)
    init_model_from(plain, out)
    ids = torch.randint(0, 8000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids), model.eval()(ids))
        assert (plain(ids) - fp.eval()(ids)).abs().max() > 0  # and it is the quantised one, not the source


@pytest.mark.parametrize("flavour,bits,method", [("llama", 8, "rtn"), ("bert", 8, "gptq")])
def test_quantize_llama_and_bert(tmp_path, capsys, flavour, bits, method):
    src, out = tmp_path / "src", tmp_path / "q"
    fp = _model_dir(src, FLAVOURS[flavour])
    args = ["quantize", str(src), "--bits", str(bits), "--method", method, "--group-size", "32", "--out", str(out)]
    assert main([*args, "--calib-batches", "1", "--eval-batches", "1", "--micro-batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert ("perplexity" if flavour == "llama" else "loss (MLM + NSP)") in printed
    figures = json.loads((out / "quantize.json").read_text())
    assert abs(figures["loss_after"] - figures["loss_before"]) < 0.01 * figures["loss_before"]  # int8: close
    cfg, weights = load_model_weights(out)
    model = build_converted_model(cfg)
    model.load_state_dict(weights)
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == (2 * 5 if flavour == "llama" else 2 * 4 + 3)  # BERT: + pooler, mlm_dense, nsp_head
    ids = torch.randint(5, 100, (2, 16))
    with torch.no_grad():
        a, b = model.eval()(ids), fp.eval()(ids)
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--bits", "3"], "--bits 3 is not supported"),
        (["--group-size", "48"], "does not divide a linear layer's input width 64"),
        (["--method", "awq"], "--method awq: unknown"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, message):
    src = tmp_path / "src"
    _model_dir(src, FLAVOURS["gpt2"])
    assert main(["quantize", str(src), "--out", str(tmp_path / "q"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "q").exists()
