"""BERT (MLM + NSP) as pipeline stages: the layers compute the plain model, and a 2-stage run through the
real launcher has the per-step losses of the one-rank run."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_losses_match, train

from llmtrain.models import ModelConfig, build_model
from llmtrain.train.metrics import last_by_step, read_metrics


def _run_layers(layers: list, inputs: tuple) -> tuple:
    x = inputs
    for layer in layers:
        if hasattr(layer, "build"):  # a TiedLayerSpec: what DeepSpeed builds on the stage and calls
            fn = layer.forward_fn
            module = layer.build()
            x = fn(module, x) if fn is not None else module(x)
        else:
            x = layer(x)
    return x


@pytest.mark.parametrize("tied", [True, False])
def test_bert_layers_compute_the_plain_model(tied):
    from llmtrain.parallel.pipeline_bert import bert_split

    cfg = ModelConfig(
        name="bert_debug",
        arch="bert",
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=50,
        block_size=16,
        norm_eps=1e-12,
        tie_embeddings=tied,
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (3, 16), generator=g)
    attention_mask = torch.ones(3, 16, dtype=torch.long)
    attention_mask[1, 9:] = 0
    mlm_labels = torch.full((3, 16), -100)
    mlm_labels[:, 2::5] = ids[:, 2::5]
    batch = {
        "input_ids": ids,
        "token_type_ids": (torch.arange(16) >= 8).long().expand(3, 16),
        "attention_mask": attention_mask,
        "mlm_labels": mlm_labels,
        "nsp_labels": torch.tensor([0, 1, 0]),
    }
    split = bert_split(model)
    assert split.legend == f"word embedding, embeddings, 2 blocks, pre-training heads{', tied word embedding' * tied}"
    mlm, nsp = _run_layers(split.layers, split.inputs(batch))
    ref_mlm, ref_nsp = model(ids, batch["token_type_ids"], attention_mask, mlm_labels != -100)
    assert torch.equal(mlm, ref_mlm) and torch.equal(nsp, ref_nsp)  # the same ops in the same order
    # the objective reads the labels back under its own keys
    assert split.as_batch(split.labels(batch))["nsp_labels"] is batch["nsp_labels"]


STEPS = 6
METRICS = ("loss", "mlm_loss", "nsp_loss", "nsp_accuracy", "eval_loss", "eval_mlm_loss", "eval_nsp_loss")


def _metrics(out) -> dict[str, dict[int, float]]:
    records = read_metrics(out / "metrics.jsonl")
    return {key: last_by_step(records, key) for key in METRICS}


@pytest.mark.slow
def test_bert_pp2_matches_one_rank(tmp_path):
    """MLM + NSP through two stages: the hidden states and both masks cross the stage boundary, the labels
    reach the last stage, the word embedding is tied across the two. The one-rank run sums two micro-batch
    gradients of 4 sequences; pp2 runs the same 8 sequences through 1F1B. fp32, same ops per micro-batch:
    only the order of the gradient sums differs (the tied embedding's two halves meet in an all-reduce,
    ~1e-7 relative), so 6 steps agree to well within 1e-5, the tolerance of the ZeRO parity tests (measured:
    losses equal, the loss parts within 1e-6)."""
    overrides = (f"train.max_steps={STEPS}", "train.eval_batches=2")
    train(tmp_path / "one", *overrides, recipe="recipes/bert_debug.yaml")
    proc = train(
        tmp_path / "pp2",
        *overrides,
        "parallel.pp=2",
        "parallel.pipeline_partition=layers",
        recipe="recipes/bert_debug.yaml",
        launcher="torchrun",
        nproc=2,
    )
    assert "(dp 1 x tp 1 x pp 2)" in proc.stdout
    # one block per stage; the tie registers the word embedding on the last stage too
    assert (
        "partition by layers of 6 layers (word embedding, embeddings, 2 blocks, pre-training heads, tied word "
        "embedding): stage 0: layers 0-2; stage 1: layers 3-5"
    ) in proc.stdout
    ref, got = _metrics(tmp_path / "one"), _metrics(tmp_path / "pp2")
    assert sorted(ref["eval_mlm_loss"]) == [STEPS]  # the parts of the loss, logged on every stage's behalf
    for key in METRICS:
        assert_losses_match(got[key], ref[key], 1e-5)
