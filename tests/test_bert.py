"""BERT: shapes, padding mask, seeded init, named sizes, the MLM + NSP objective, and a pre-training run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import ROOT, train

from llmtrain.models import MODEL_SIZES, ModelConfig, build_model
from llmtrain.train.metrics import read_metrics
from llmtrain.train.objectives import SequenceClassification, objective_for, pop_metrics

TINY = ModelConfig(
    name="bert_debug", arch="bert", n_layer=2, n_head=2, n_embd=64, vocab_size=101, block_size=32, norm_eps=1e-12
)


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> torch.nn.Module:
    model = build_model(cfg)
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()


def _batch(B: int = 3, T: int = 16, V: int = 101, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 10:] = 0  # a padded row
    labels = torch.full((B, T), -100)
    labels[:, 2:5] = ids[:, 2:5]
    return {
        "input_ids": ids,
        "token_type_ids": (torch.arange(T) >= T // 2).long().expand(B, T).clone(),
        "attention_mask": mask,
        "mlm_labels": labels,
        "nsp_labels": torch.tensor([0, 1, 0]),
    }


@pytest.mark.parametrize("name,nominal", [("bert_base", 110e6), ("bert_large", 340e6)])
def test_named_sizes(name, nominal):
    cfg = ModelConfig(**{**MODEL_SIZES[name], "name": name})
    with torch.device("meta"):
        n = build_model(cfg).num_params()
    assert abs(n - nominal) / nominal < 0.02, f"{name}: {n / 1e6:.1f}M"


def test_shapes_and_mlm_positions():
    model, b = _model(), _batch()
    mlm, nsp = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    assert mlm.shape == (3, 16, 101) and nsp.shape == (3, 2)
    chosen = b["mlm_labels"] != -100
    mlm_sel, nsp2 = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], chosen)
    assert mlm_sel.shape == (int(chosen.sum()), 101)
    torch.testing.assert_close(mlm_sel, mlm[chosen])  # the head on the chosen positions only: same logits
    torch.testing.assert_close(nsp2, nsp)
    assert model.lm_head.weight is model.wte.weight  # MLM decoder tied to the token embedding


def test_padding_is_invisible():
    """Hidden states of real tokens do not depend on what sits in padded positions."""
    model, b = _model(), _batch()
    h1, p1 = model.encode(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    ids = b["input_ids"].clone()
    ids[1, 10:] = 7
    h2, p2 = model.encode(ids, b["token_type_ids"], b["attention_mask"])
    torch.testing.assert_close(h1[1, :10], h2[1, :10])
    torch.testing.assert_close(p1, p2)
    h3, _ = model.encode(ids, b["token_type_ids"])  # without the mask the padding is attended to
    assert not torch.allclose(h1[1, :10], h3[1, :10], atol=1e-4)


def test_init_is_seeded_and_layout_free():
    a = _model(seed=3)
    with torch.device("meta"):
        b = build_model(TINY)
    b = b.to_empty(device="cpu")
    torch.manual_seed(3)
    b.init_weights()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    assert b.lm_head.weight is b.wte.weight and torch.count_nonzero(b.lm_head.bias) == 0


def test_mlm_nsp_objective():
    model, b = _model(), _batch()
    obj = objective_for("bert")
    model.train()
    loss = obj(model, b)
    assert loss.shape == () and loss.requires_grad
    parts = pop_metrics(obj, True)
    assert set(parts) == {"mlm_loss", "nsp_loss", "nsp_accuracy"}
    torch.testing.assert_close(loss.detach(), parts["mlm_loss"] + parts["nsp_loss"])
    # At init the MLM loss is close to log(V) and the NSP loss to log(2).
    assert abs(parts["mlm_loss"].item() - torch.log(torch.tensor(101.0)).item()) < 0.5
    assert abs(parts["nsp_loss"].item() - 0.693) < 0.2
    loss.backward()
    assert model.wte.weight.grad is not None and model.nsp_head.weight.grad is not None
    assert pop_metrics(obj, True) == {}  # popped: sums start again
    with torch.no_grad():  # eval calls (no autograd) are summed apart from training calls
        obj(model, b)
    assert set(pop_metrics(obj, False)) == {"mlm_loss", "nsp_loss", "nsp_accuracy"}


def test_sequence_classification_head():
    cfg = dataclasses.replace(TINY, num_labels=3)
    model, b = _model(cfg), _batch()
    logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    assert logits.shape == (3, 3)
    obj = SequenceClassification()
    loss = obj(model, {**b, "class_labels": torch.tensor([0, 2, 1])})
    assert loss.shape == () and set(obj.pop_metrics(True)) == {"accuracy"} and obj.pop_metrics(False) == {}
    with pytest.raises(ValueError, match="num_labels"):
        build_model(dataclasses.replace(TINY, num_labels=1))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """bert_debug (tiny) pre-trained through the real launcher on the bundled text."""
    out = tmp_path_factory.mktemp("bert") / "pretrain"
    proc = train(
        out,
        "train.max_steps=40",
        "optim.lr=3e-3",
        "log.interval=5",
        "train.eval_batches=4",
        "train.sample_tokens=8",
        recipe="recipes/bert_debug.yaml",
    )
    return out, proc


def test_pretraining_run_mlm_loss_falls_on_real_text(pretrained):
    """WordPiece, NSP pairs and MLM masking of the bundled text: the masked-LM loss falls."""
    out, proc = pretrained
    records = read_metrics(out / "metrics.jsonl")
    mlm = {r["step"]: r["mlm_loss"] for r in records if "mlm_loss" in r}
    assert mlm[40] < mlm[5] - 1.0, mlm  # a clear drop from ~log(8192) = 9.0, not noise
    for r in records:
        if "loss" in r:
            assert r["loss"] == pytest.approx(r["mlm_loss"] + r["nsp_loss"], rel=1e-5)
            assert 0 <= r["nsp_accuracy"] <= 1
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["eval_loss"] == pytest.approx(final["eval_mlm_loss"] + final["eval_nsp_loss"], rel=1e-5)
    assert "sample:" not in proc.stdout  # no text generation from an encoder


def test_finetune_classifier_beats_chance(pretrained, tmp_path):
    """The pre-trained trunk fine-tuned on Old Testament / New Testament / Shakespeare passages of held-out
    chapters and works: balanced classes, so chance is 1/3."""
    out = tmp_path / "finetune"
    proc = train(
        out,
        f"model.init_from={pretrained[0]}",
        "train.max_steps=80",
        "optim.lr=2e-3",
        "optim.warmup_steps=5",
        "train.micro_batch_size=8",
        "train.global_batch_size=16",
        "train.eval_batches=16",
        "log.interval=10",
        recipe="recipes/bert_finetune_debug.yaml",
    )
    assert "model weights initialised from" in proc.stdout
    final = [r for r in read_metrics(out / "metrics.jsonl") if "eval_accuracy" in r][-1]
    # 128 held-out passages: chance accuracy would be 0.33 +- 0.04; 0.5 is 4 standard deviations above.
    assert final["step"] == 80 and final["eval_accuracy"] > 0.5, final


def test_bert_layouts_tensor_and_pipeline_parallel():
    from llmtrain.config import ConfigError, derive, load_config

    recipe = ROOT / "recipes" / "bert_debug.yaml"
    assert load_config(recipe, ["parallel.pp=2", "train.global_batch_size=64"]).parallel.pp == 2
    assert derive(load_config(recipe, ["parallel.tp=2"]), 2).dp_size == 1  # pre-training has a TP plan
    finetune = ROOT / "recipes" / "bert_finetune_debug.yaml"
    assert derive(load_config(finetune, ["parallel.tp=2", "parallel.zero_stage=2"]), 4).dp_size == 2  # classifier too
    # what tensor parallel cannot split is refused before anything is built, saying what to change
    with pytest.raises(ConfigError, match="model.n_head=4 is not divisible by parallel.tp=3"):
        derive(load_config(recipe, ["parallel.tp=3"]), 3)
    with pytest.raises(
        ConfigError, match="model.vocab_size=30522 is not divisible by parallel.tp=4.*model.vocab_size=30720"
    ):
        derive(load_config(recipe, ["model.name=bert_base", "parallel.tp=4"]), 4)  # 12 heads split, 30522 rows not
    with pytest.raises(ConfigError, match="not the sequence classifier.*set parallel.pp=1"):
        load_config(finetune, ["parallel.pp=2", "train.global_batch_size=64"])
