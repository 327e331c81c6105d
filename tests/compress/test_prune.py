"""Structured pruning: shapes and parameter counts, identity when nothing is pruned, kept heads unchanged,
and the `llmtrain prune` command end to end on a tiny checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llmtrain.compress.prune import (
    PruneConfig,
    activation_importance,
    magnitude_importance,
    num_params,
    prune,
    target_config,
)
from llmtrain.models import ModelConfig, build_model

TINY = ModelConfig(n_layer=3, n_head=4, n_embd=64, vocab_size=96, block_size=32)
LLAMA = dataclasses.replace(
    TINY, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, intermediate_size=96
)


def _model(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(cfg)
    m.init_weights()
    for p in m.parameters():  # non-trivial norms and biases, so slicing them wrongly would show
        p.data.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _calib(n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("cfg", [TINY, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("method", ["activation", "magnitude"])
def test_pruning_nothing_gives_identical_logits(cfg, method):
    model = _model(cfg)
    imp = activation_importance(model, cfg, _calib()) if method == "activation" else magnitude_importance(model, cfg)
    new, state = prune(model, cfg, PruneConfig(), imp)
    small = build_model(new)
    small.load_state_dict(state)
    ids = _calib(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [TINY, LLAMA], ids=["gpt2", "llama"])
def test_pruned_shapes_and_parameter_counts(cfg):
    model = _model(cfg)
    recipe = PruneConfig(n_layer=2, n_head=2, n_embd=32, intermediate_size=40)
    new, state = prune(model, cfg, recipe, activation_importance(model, cfg, _calib()))
    assert (new.n_layer, new.n_head, new.n_embd, new.intermediate_size) == (2, 2, 32, 40)
    assert (new.n_kv_head or new.n_head) == (1 if cfg.n_kv_head else 2)  # GQA: whole kv groups go
    small = build_model(new)
    small.load_state_dict(state)  # strict: every name and shape
    C, F, V, L, nh, nkv, hs = 32, 40, 96, 2, 2, new.n_kv_head or 2, 16
    swiglu = cfg.mlp == "swiglu"
    per_norm = C * (2 if cfg.bias else 1)
    attn = C * (nh + 2 * nkv) * hs + nh * hs * C + (((nh + 2 * nkv) * hs + C) if cfg.bias else 0)
    mlp = (3 if swiglu else 2) * C * F + ((F + C) if cfg.bias else 0)
    expected = V * C + (32 * C if cfg.pos == "learned" else 0) + L * (attn + mlp + 2 * per_norm) + per_norm
    assert num_params(new) == sum(p.numel() for p in small.parameters()) == expected


def test_least_important_layer_and_channels_go():
    model = _model(TINY)
    imp = magnitude_importance(model, TINY)
    imp.layers[:] = torch.tensor([3.0, 1.0, 2.0])  # block 1 is the least important
    new, state = prune(model, TINY, PruneConfig(n_layer=2), imp)
    assert torch.equal(state["blocks.1.attn.qkv.weight"], model.blocks[2].attn.qkv.weight)
    imp.channels[0] = torch.arange(256, dtype=torch.float)  # MLP channels 128.. of block 0 are kept
    _, state = prune(model, TINY, PruneConfig(intermediate_size=128), imp)
    assert torch.equal(state["blocks.0.mlp.down.weight"], model.blocks[0].mlp.down.weight[:, 128:])


def test_impossible_targets_name_the_key():
    with pytest.raises(ValueError, match="n_head=3 with n_kv_head"):
        target_config(LLAMA, PruneConfig(n_head=3))
    with pytest.raises(ValueError, match="n_layer=9"):
        target_config(TINY, PruneConfig(n_layer=9))


def test_bert_pruning_keeps_a_valid_model():
    cfg = ModelConfig(arch="bert", n_layer=2, n_head=4, n_embd=64, vocab_size=96, block_size=32, norm_eps=1e-12)
    model = _model(cfg)
    batches = [
        {**b, "token_type_ids": torch.zeros_like(b["input_ids"]), "attention_mask": torch.ones_like(b["input_ids"])}
        for b in _calib()
    ]
    imp = activation_importance(model, cfg, batches)
    new, state = prune(model, cfg, PruneConfig(), imp)
    same = build_model(new).eval()
    same.load_state_dict(state)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(same(ids)[0], model(ids)[0], rtol=0, atol=0)
    new, state = prune(model, cfg, PruneConfig(n_layer=1, n_head=2, n_embd=32), imp)
    small = build_model(new)
    small.load_state_dict(state)
    assert num_params(new) < num_params(cfg) / 2
    with pytest.raises(ValueError, match="leave intermediate_size unset"):
        target_config(cfg, PruneConfig(intermediate_size=100))


@pytest.mark.parametrize("cfg", [TINY, LLAMA], ids=["gpt2", "llama"])
def test_pruning_heads_keeps_the_outputs_of_untouched_heads(cfg):
    model = _model(cfg)
    imp = magnitude_importance(model, cfg)
    imp.heads[:] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # GQA (2 kv heads of 2): group 0 = heads 0, 1 stays
    new, state = prune(model, cfg, PruneConfig(n_head=2), imp)
    assert new.head_dim == 16 and new.n_embd == 64
    small = build_model(new).eval()
    small.load_state_dict(state)
    seen = {}
    for name, m in (("big", model), ("small", small)):  # each head's output, before the output projection
        m.blocks[0].attn.proj.register_forward_pre_hook(lambda _m, a, name=name: seen.__setitem__(name, a[0]))
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.blocks[0].attn(x)
        small.blocks[0].attn(x)
    torch.testing.assert_close(seen["small"], seen["big"][..., :32], rtol=0, atol=0)  # heads 0 and 1


def test_prune_command_writes_a_checkpoint_that_loads(tmp_path, capsys):
    from helpers import ROOT, TINY

    from llmtrain.cli import main
    from llmtrain.compress.cli import write_model
    from llmtrain.config import load_config
    from llmtrain.parallel.consolidate import load_model_weights

    cfg = load_config(ROOT / "recipes" / "gpt_debug.yaml", [*TINY, "out_dir=runs/src"])
    torch.manual_seed(0)
    source = build_model(cfg.model)
    source.init_weights()
    write_model(tmp_path / "src", cfg, source, {})
    out = tmp_path / "pruned"
    rc = main(
        [
            "prune",
            str(tmp_path / "src"),
            "--recipe",
            str(ROOT / "recipes" / "prune_gpt_debug.yaml"),
            "--out",
            str(out),
            "prune.n_head=1",
            "prune.n_embd=32",
            "prune.intermediate_size=64",
            "prune.calib_batches=2",
            "prune.eval_batches=2",
            "prune.micro_batch_size=2",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    figures = json.loads((out / "prune.json").read_text())
    assert f"{figures['params_before'] / 1e6:.3f}M -> {figures['params_after'] / 1e6:.3f}M" in printed
    assert "held-out perplexity" in printed and figures["ppl_after"] > 0
    new, weights = load_model_weights(out)  # the layout model.init_from and eval read
    assert (new.n_head, new.n_embd, new.intermediate_size, new.init_from) == (1, 32, 64, None)
    assert sum(w.numel() for n, w in weights.items() if n != "lm_head.weight") == figures["params_after"]
    assert load_config(out / "config.yaml").out_dir != "runs/src"  # never the source run


def test_init_from_a_pruned_checkpoint_adopts_its_shape(tmp_path, capsys):
    """model.init_from a pruned model needs no restated shape: the checkpoint's architecture keys replace
    the named size's (printed), while keys the command sets win."""
    from helpers import ROOT, TINY

    from llmtrain.compress.cli import write_model
    from llmtrain.config import load_config
    from llmtrain.parallel.consolidate import init_model_from

    cfg = load_config(ROOT / "recipes" / "gpt_debug.yaml", [*TINY, "out_dir=runs/src"])
    torch.manual_seed(0)
    source = build_model(cfg.model)
    source.init_weights()
    new, state = prune(
        source,
        cfg.model,
        PruneConfig(n_layer=1, n_head=1, n_embd=32, intermediate_size=64),
        magnitude_importance(source, cfg.model),
    )
    small = build_model(new)
    small.load_state_dict(state)
    write_model(tmp_path / "pruned", dataclasses.replace(cfg, model=new), small, {})
    capsys.readouterr()
    rest = [o for o in TINY if not o.startswith("model.")]  # the command restates no model key
    run = load_config(ROOT / "recipes" / "gpt_debug.yaml", [*rest, f"model.init_from={tmp_path / 'pruned'}"])
    printed = capsys.readouterr().out
    assert (run.model.n_layer, run.model.n_head, run.model.n_embd, run.model.intermediate_size) == (1, 1, 32, 64)
    assert "adopted the checkpoint's shape" in printed and "model.n_layer=1" in printed
    assert "model.pos=" not in printed and "model.bias=" not in printed  # only keys whose value it changes
    init_model_from(build_model(run.model), tmp_path / "pruned")  # the weights fit
    kept = load_config(
        ROOT / "recipes" / "gpt_debug.yaml", [*rest, f"model.init_from={tmp_path / 'pruned'}", "model.n_layer=2"]
    )
    assert (kept.model.n_layer, kept.model.n_embd) == (2, 32)  # the command's key wins, the rest is adopted


def test_prune_data_flag_reads_another_prepared_dataset(tmp_path, capsys):
    """`llmtrain prune --data DIR` calibrates and evaluates on DIR (an imported model has no training data):
    the bundled dataset's own directory gives the figures of the source's `data.path=bundled`; a missing
    one is one line, exit 2."""
    from helpers import ROOT, TINY

    from llmtrain.cli import main
    from llmtrain.compress.cli import write_model
    from llmtrain.config import load_config
    from llmtrain.data.bundled import bundled_dataset_dir

    cfg = load_config(ROOT / "recipes" / "gpt_debug.yaml", [*TINY, "out_dir=runs/src"])
    torch.manual_seed(0)
    source = build_model(cfg.model)
    source.init_weights()
    write_model(tmp_path / "src", cfg, source, {})
    args = ["prune", str(tmp_path / "src"), "--recipe", str(ROOT / "recipes" / "prune_gpt_debug.yaml")]
    args += ["prune.n_head=1", "prune.n_embd=32", "prune.intermediate_size=64", "prune.calib_batches=2"]
    args += ["prune.eval_batches=2", "prune.micro_batch_size=2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--data", str(bundled_dataset_dir(cfg.data))]) == 0
    a, b = (json.loads((tmp_path / d / "prune.json").read_text()) for d in "ab")
    assert (a["loss_before"], a["loss_after"]) == (b["loss_before"], b["loss_after"])
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "c"), "--data", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nothing") in err[0], err
