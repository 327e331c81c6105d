"""Activation checkpointing changes memory, never numbers: every mode gives bit-identical losses and
gradients to `none`, and saves fewer bytes for backward (counted with saved_tensors_hooks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import losses, train

from llmtrain.models import ModelConfig, build_model
from llmtrain.parallel.checkpointing import SavedBytes, apply_activation_checkpointing


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=128, block_size=64))
    model.init_weights()
    x, y = torch.randint(0, 128, (2, 64)), torch.randint(0, 128, (2, 64))
    return model, x, y


def _run(model, x, y):
    with SavedBytes(exclude=list(model.parameters())) as saved:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], saved.bytes


@pytest.mark.parametrize("mode", ["full", "selective", "every_n"])
def test_same_numbers_fewer_saved_bytes(reference, mode):
    base, x, y = reference
    ref_loss, ref_grads, ref_bytes = _run(copy.deepcopy(base), x, y)
    model = copy.deepcopy(base)
    wrapped = apply_activation_checkpointing(model, mode, every_n=2)
    loss, grads, saved = _run(model, x, y)
    assert torch.equal(loss, ref_loss)  # recompute replays the same kernels on the same inputs: exact
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    assert saved < ref_bytes, (mode, saved, ref_bytes)
    assert (
        wrapped
        == {
            "full": ["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
            "every_n": ["blocks.0", "blocks.2"],
            "selective": [f"blocks.{i}.attn.attend" for i in range(4)],
        }[mode]
    )
    if mode == "full":  # only each block's input (B*T*C fp32) stays per block: a small fraction
        assert saved < ref_bytes / 4


def test_state_dict_names_unchanged(reference):
    base, _, _ = reference
    model = copy.deepcopy(base)
    apply_activation_checkpointing(model, "full")
    assert list(model.state_dict()) == list(base.state_dict())


def test_unknown_mode_is_a_clear_error(reference):
    with pytest.raises(ValueError, match="must be one of none, full, selective, every_n"):
        apply_activation_checkpointing(copy.deepcopy(reference[0]), "some")


@pytest.mark.slow
def test_full_checkpointing_with_zero3_two_ranks_matches_none(tmp_path):
    """Through the launcher on 2 ranks with ZeRO-3 (parameters gathered again during recompute): the
    per-step losses equal those without checkpointing exactly (same layout, same reduction order)."""
    runs = {}
    for mode in ("none", "full"):
        out = tmp_path / mode
        train(
            out,
            "train.max_steps=3",
            "parallel.zero_stage=3",
            f"parallel.activation_checkpointing={mode}",
            launcher="torchrun",
            nproc=2,
        )
        runs[mode] = losses(out)
    assert runs["full"] == runs["none"]
