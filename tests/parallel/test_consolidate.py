"""Weights out of a checkpoint: load_model_weights, `llmtrain consolidate` and model.init_from.

The source is a 3-step ZeRO-1 run (optimizer partitions in flat fragments, weights by plain name in
universal/). A run initialised from it with optim.lr=0 must evaluate to exactly the source's final
held-out loss: same weights, same val batches, same kernels on one rank.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import train
from safetensors.torch import load_file

from llmtrain.cli import main
from llmtrain.models import ModelConfig, build_model
from llmtrain.parallel.consolidate import init_model_from, load_model_weights
from llmtrain.train.metrics import last_by_step, read_metrics


def _eval_loss(out):
    return last_by_step(read_metrics(out / "metrics.jsonl"), "eval_loss")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("consolidate") / "src"
    train(out, "train.max_steps=3", "parallel.zero_stage=1")
    return out


def test_load_model_weights_and_consolidate_agree(source, tmp_path):
    cfg, weights = load_model_weights(source)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (2, 64, 2)
    model = build_model(cfg)
    model.load_state_dict(weights)  # strict: every name, the tied lm_head.weight included
    assert weights["lm_head.weight"] is weights["wte.weight"]

    assert main(["consolidate", str(source), str(tmp_path / "flat"), "--dtype", "fp32"]) == 0
    flat = load_file(str(tmp_path / "flat" / "model.safetensors"))
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())  # each tied tensor once
    for name, tensor in flat.items():
        assert torch.equal(tensor, weights[name]), name
    cfg2, again = load_model_weights(tmp_path / "flat")  # a consolidated directory reads the same
    assert cfg2 == cfg and all(torch.equal(again[n], weights[n]) for n in weights)


def test_init_from_starts_from_the_source_weights(source, tmp_path):
    out = tmp_path / "init"
    proc = train(out, "train.max_steps=1", "optim.lr=0", f"model.init_from={source}")
    assert f"model weights initialised from {source}" in proc.stdout
    src, got = _eval_loss(source), _eval_loss(out)
    assert got[1] == pytest.approx(src[3], abs=1e-6)  # lr 0: the one step leaves the weights as loaded


def test_missing_or_incomplete_checkpoint_is_a_clear_error(source, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model_weights(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(source / "checkpoints", broken)
    step = (broken / "latest").read_text().strip()
    (broken / step / "universal" / "blocks.1.mlp.up.weight.safetensors").unlink()
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.up\.weight\.safetensors is missing"):
        load_model_weights(broken)


def test_init_from_names_the_mismatched_parameter(source):
    cfg, _ = load_model_weights(source)
    wider = build_model(ModelConfig(**{**cfg.__dict__, "n_embd": cfg.n_embd * 2}))
    with pytest.raises(ValueError, match=r"model.init_from=.*parameter 'wte.weight' has shape"):
        init_model_from(wider, source)
    smaller_vocab = build_model(ModelConfig(**{**cfg.__dict__, "vocab_size": cfg.vocab_size - 64}))
    with pytest.raises(ValueError, match=r"parameter 'wte.weight' has shape"):
        init_model_from(smaller_vocab, source)  # rows would be lost: never silently cut


def test_init_from_pads_the_vocabulary(source, tmp_path):
    """model.vocab_size padded past the checkpoint's (e.g. to split over tensor-parallel ranks): the
    checkpoint's rows land first, so the logits of every real token are the checkpoint model's."""
    cfg, weights = load_model_weights(source)
    ref = build_model(cfg)
    ref.load_state_dict(weights)
    padded = build_model(ModelConfig(**{**cfg.__dict__, "vocab_size": cfg.vocab_size + 64}))
    padded.init_weights()
    assert init_model_from(padded, source) == ["wte.weight"]  # the tied head is the same table
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        want, got = ref.eval()(ids), padded.eval()(ids)
    assert got.shape[-1] == cfg.vocab_size + 64
    assert torch.equal(got[..., : cfg.vocab_size], want)
    proc = train(
        tmp_path / "run",
        "train.max_steps=1",
        "optim.lr=0",
        f"model.init_from={source}",
        f"model.vocab_size={cfg.vocab_size + 64}",
    )
    assert f"vocabulary padded to {cfg.vocab_size + 64} rows in wte.weight" in proc.stdout
