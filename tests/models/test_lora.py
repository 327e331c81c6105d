"""LoRA (llmtrain/models/lora.py) in one process: the converter, merging, the merged and PEFT exports.

Tolerances: fp32. The zero-initialised adapter adds exact zeros, so the converted model's logits equal the
base's bit for bit. A merged weight W + s B A and the unmerged W x + s B (A x) sum the same products in
another order, and transformers runs eager attention where we run SDPA (~1e-7 relative per op, as in
test_hf_parity.py): logits agree within 1e-5.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from llmtrain.cli import main
from llmtrain.config import load_config
from llmtrain.interop.hf import export_hf
from llmtrain.interop.peft import export_adapter
from llmtrain.model_dir import model_config_yaml, write_config_text, write_model_dir, write_weights, writing
from llmtrain.models import build_model
from llmtrain.models.converters import apply_converters
from llmtrain.models.lora import merge_lora
from llmtrain.parallel.engine import param_groups

transformers = pytest.importorskip("transformers")  # the hf extra; dev installs it
peft = pytest.importorskip("peft")  # the finetune extra; dev installs it

TOL = dict(atol=1e-5, rtol=1e-5)
SHAPE = ["model.n_layer=2", "model.n_embd=64", "model.vocab_size=101", "model.block_size=32", "train.seq_len=32"]
GPT2 = ["model.name=gpt_debug", *SHAPE, "model.n_head=4"]
LLAMA = ["model.name=llama_debug", *SHAPE, "model.n_head=4", "model.n_kv_head=2", "model.intermediate_size=96"]


def _base_and_lora(flavour: list[str], lora: list[str]):
    """(base model, LoRA model of the same weights, LoRA config); the adapters' B made non-zero."""
    cfg = load_config(None, [*flavour, *lora]).model
    base = build_model(dataclasses.replace(cfg, lora=None, converters=[]))
    torch.manual_seed(0)
    base.init_weights()
    model = build_model(cfg)
    model.load_state_dict(base.state_dict())
    apply_converters(model, cfg)
    return base.eval(), model.eval(), cfg


def _randomise_b(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_zero_b_gives_the_base_logits_and_only_adapters_train(flavour):
    base, model, cfg = _base_and_lora(flavour, ["model.lora.rank=4", "model.lora.targets=[all]"])
    ids = torch.randint(0, 101, (2, 16))
    assert torch.equal(model(ids), base(ids))  # B = 0: exactly the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    linears = 5 if cfg.mlp == "swiglu" else 4  # qkv, proj, (gate), up, down
    assert len(trainable) == 2 * linears * cfg.n_layer and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    in_optimizer = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for n, p in model.named_parameters() if n in trainable}
    a = model.get_parameter("blocks.0.attn.qkv.lora_a")
    assert a.shape == (4, 64) and a.abs().sum() > 0  # A drawn from the seeded RNG, B zeros


def test_converter_on_meta_and_seeded():
    cfg = load_config(None, [*LLAMA, "model.lora.rank=2"]).model
    with torch.device("meta"):
        model = build_model(cfg)
        apply_converters(model, cfg)
    assert model.get_parameter("blocks.1.mlp.down.lora_b").is_meta

    def adapters():
        m = build_model(cfg)
        torch.manual_seed(5)
        apply_converters(m, cfg)
        return m.get_parameter("blocks.1.mlp.gate.lora_a")

    assert torch.equal(adapters(), adapters())


def test_merge_is_base_plus_scaled_ba():
    _, model, cfg = _base_and_lora(LLAMA, ["model.lora.rank=4", "model.lora.alpha=8"])
    _randomise_b(model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    plain_cfg, merged = merge_lora(cfg, sd)
    assert plain_cfg.lora is None and plain_cfg.converters == [] and not any("lora" in k for k in merged)
    a, b = sd["blocks.0.mlp.up.lora_a"], sd["blocks.0.mlp.up.lora_b"]
    assert torch.allclose(merged["blocks.0.mlp.up.weight"], sd["blocks.0.mlp.up.weight"] + 2.0 * b @ a)
    assert torch.equal(
        merged["blocks.0.attn.qkv.weight"],
        sd["blocks.0.attn.qkv.weight"] + 2.0 * (sd["blocks.0.attn.qkv.lora_b"] @ sd["blocks.0.attn.qkv.lora_a"]),
    )
    plain = build_model(plain_cfg)
    plain.load_state_dict(merged)
    ids = torch.randint(0, 101, (2, 16))
    torch.testing.assert_close(plain(ids), model(ids), **TOL)


def _write_lora_dir(out, cfg, model):
    with writing(out) as tmp:
        write_weights(tmp, {n: p.detach().float() for n, p in model.named_parameters()})
        write_config_text(tmp, model_config_yaml(cfg))


def test_llama_merged_and_peft_exports_match_through_transformers(tmp_path):
    base, model, cfg = _base_and_lora(LLAMA, ["model.lora.rank=4", "model.lora.targets=[qkv, proj, fc]"])
    _randomise_b(model)
    write_model_dir(dataclasses.replace(cfg, lora=None, converters=[]), base.state_dict(), tmp_path / "base")
    _write_lora_dir(tmp_path / "lora", cfg, model)
    export_hf(tmp_path / "base", tmp_path / "hf_base")
    export_hf(tmp_path / "lora", tmp_path / "hf_merged")
    export_adapter(tmp_path / "lora", tmp_path / "adapter")

    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        ours = model(ids)
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_merged").eval()
        torch.testing.assert_close(merged(ids).logits, ours, **TOL)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base").eval()
        adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
        torch.testing.assert_close(adapted(ids).logits, ours, **TOL)
    # q, k and v each got an adapter (sharing A); every saved tensor was loaded onto one
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16.0 and not config["fan_in_fan_out"]
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in keys and len(keys) == 2 * 7 * 2
    assert sum(n.endswith("lora_A.default") for n, _ in adapted.named_modules()) == 7 * 2


def test_bad_lora_settings_are_one_line_exit_2(capsys):
    qlora = ["model.weight_quant.bits=4", "model.lora.rank=4"]
    for overrides, message in [
        (["model.lora.rank=0"], "model.lora.rank must be an integer >= 1"),
        (["model.lora.targets=[qkv, q_proj]"], "unknown target 'q_proj' (q, k and v are one fused projection here"),
        (["model.lora.targets=[gate]"], "'gate' needs the Llama flavour"),
        (["model.lora.alpha=0"], "model.lora.alpha must be > 0"),
        (["model.converters=[lora, quantized_weights]", *qlora], "list quantized_weights before lora"),
        (["model.converters=[quantized_weights]", *qlora, "parallel.tp=2"], "QLoRA (model.lora over"),
    ]:
        assert main(["train", "recipes/gpt_debug.yaml", *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") or message in err, err
        assert err.count("\n") == 1, err
    assert main(["export-hf", "recipes", "x", "--adapter"]) == 2  # not a checkpoint: one line too
