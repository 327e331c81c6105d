"""data.doc_mask reaches the model: a packed window gives each document the logits it gets on its own."""

from __future__ import annotations

import pytest
import torch

from llmtrain.models import ModelConfig, build_model


def tiny_gpt(pos: str) -> torch.nn.Module:
    extra = dict(norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False) if pos == "rope" else {}
    cfg = ModelConfig(
        arch="gpt", n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=64, dropout=0.0, pos=pos, **extra
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_packed_documents_match_separate_forwards(pos):
    model = tiny_gpt(pos)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 64, (n,), generator=g) for n in (5, 9, 6)]
    packed = torch.cat(docs)[None]  # (1, 20)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        got = model(packed, position_ids=position_ids, doc_ids=doc_ids)[0]
        want = torch.cat([model(d[None])[0] for d in docs])
        unmasked = model(packed)[0]
    # float32 on CPU; the masked and the separate runs reduce over the same keys in the same order
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[5:], want[5:], atol=1e-3)  # without the mask, documents mix


def test_causal_objective_passes_the_document_mask(tiny_dataset):
    from llmtrain.data import DataConfig, build_data
    from llmtrain.train.objectives import CausalLM

    data = build_data(
        DataConfig(path=str(tiny_dataset), doc_mask=True),
        seq_len=64,
        seed=0,
        micro_batch_size=8,
        grad_accum=1,
        dp_rank=0,
        dp_size=1,
    )
    batch = data.train_batches(0)[0]
    assert batch["doc_ids"].amax() > 0  # the batch packs more than one document
    model = tiny_gpt("learned")
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        loss = CausalLM()(model, {**batch, "input_ids": batch["input_ids"] % 64, "labels": batch["labels"] % 64})
    assert torch.isfinite(loss) and torch.equal(calls[0]["doc_ids"], batch["doc_ids"])
    assert torch.equal(calls[0]["position_ids"], batch["position_ids"])


def test_doc_mask_with_pipeline_stages_is_refused():
    from llmtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data\.doc_mask needs parallel\.pp=1"):
        load_config("recipes/gpt_debug.yaml", ["data.doc_mask=true", "parallel.pp=2"])


def test_training_with_doc_mask_runs_through_the_launcher_and_with_tensor_parallel(tmp_path):
    """One rank, then tp2 over two processes: the document mask reaches the sharded attention too, so the
    per-step losses agree (fp32; sharded matmuls add in another order, ~1e-7 relative: 1e-5 as elsewhere)."""
    from helpers import assert_losses_match, losses, train

    train(tmp_path / "run", "data.doc_mask=true", "train.max_steps=3")
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3] and all(v == v and v > 0 for v in got.values())
    train(tmp_path / "tp2", "data.doc_mask=true", "train.max_steps=3", "parallel.tp=2", launcher="torchrun", nproc=2)
    assert_losses_match(losses(tmp_path / "tp2"), got, 1e-5)


def test_doc_mask_is_refused_where_it_would_be_ignored(tiny_dataset):
    from llmtrain.data import DataConfig, build_data

    for cfg in (
        DataConfig(stream=str(tiny_dataset), doc_mask=True),
        DataConfig(path=str(tiny_dataset), sample_kind="bert", doc_mask=True),
    ):
        with pytest.raises(ValueError, match=r"data\.doc_mask works on packed causal samples"):
            build_data(cfg, seq_len=16, seed=0, micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=1)


@pytest.mark.slow
def test_compiled_blocks_take_the_document_mask_as_data():
    """train.compile with data.doc_mask: the (B, 1, T, T) mask is an input of each compiled block, so two
    packings of the same length (one graph, no recompile) each give every document its own logits;
    a graph that had baked the first packing in would fail the second. Inductor reorders fp32 sums: 1e-4."""
    from llmtrain.parallel.compile import compile_blocks

    model = tiny_gpt("rope")
    assert compile_blocks(model) == 2
    g = torch.Generator().manual_seed(2)
    for lengths in ((5, 9, 6), (12, 3, 5)):
        docs = [torch.randint(0, 64, (n,), generator=g) for n in lengths]
        packed = torch.cat(docs)[None]
        doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
        position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
        with torch.no_grad():
            got = model(packed, position_ids=position_ids, doc_ids=doc_ids)[0]
            want = torch.cat([eager(model, d) for d in docs])
            unmasked = eager(model, torch.cat(docs))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(unmasked[lengths[0] :], want[lengths[0] :], atol=1e-3)  # the mask matters


def eager(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits of `ids` with every compiled block run uncompiled (nn.Module.compile keeps the original)."""
    with torch.compiler.set_stance("force_eager"):
        return model(ids[None])[0]
