"""`llmtrain eval BERT --tasks bert_mlm,bert_classify`: the masked-LM and classifier accuracies in lm-eval's
results format, equal to the model's own objective on the same held-out batches; wrong pairings are one line."""

from __future__ import annotations

import json

import pytest
import torch

from llmtrain.cli import main


def _bert_dir(root, num_labels: int):
    """A tiny random BERT (pre-training heads, or a classifier) as a model directory with its run config."""
    from llmtrain.config import Config, DataConfig, TrainConfig
    from llmtrain.model_dir import write_model
    from llmtrain.models import ModelConfig, build_model

    model_cfg = ModelConfig(
        arch="bert",
        name="bert_debug",
        n_layer=1,
        n_head=2,
        n_embd=32,
        vocab_size=8192,
        block_size=128,
        num_labels=num_labels,
    )
    data = DataConfig(tokenizer="wordpiece", sample_kind="source_class" if num_labels else "bert")
    cfg = Config(model=model_cfg, data=data, train=TrainConfig(seq_len=32))
    torch.manual_seed(0)
    model = build_model(model_cfg)
    model.init_weights()
    return write_model(root / f"bert{num_labels}", cfg, model), model, cfg


def _objective_metric(model, cfg, kind: str, n: int, key: str) -> float:
    """The family objective's mean metric over n held-out micro-batches of 4 (what training logs)."""
    import dataclasses

    from llmtrain.data import build_data
    from llmtrain.train.objectives import objective_for

    data = build_data(
        dataclasses.replace(cfg.data, sample_kind=kind),
        seq_len=32,
        seed=0,
        micro_batch_size=4,
        grad_accum=1,
        dp_rank=0,
        dp_size=1,
    )
    obj = objective_for(cfg.model)
    model.eval()
    with torch.no_grad():
        for b in data.val_batches(n):
            obj(model, b)
    return float(obj.pop_metrics(False)[key])


def test_classifier_accuracy_is_the_objectives_on_the_held_out_passages(tmp_path, capsys):
    path, model, cfg = _bert_dir(tmp_path, 3)
    out = tmp_path / "r.json"
    args = ["eval", str(path), "--tasks", "bert_classify", "--limit", "12", "--batch-size", "4", "--output", str(out)]
    assert main(args) == 0
    assert "bert_classify" in capsys.readouterr().out  # the table
    r = json.loads(out.read_text())["results"]["bert_classify"]
    assert r["sample_len"] == 12
    assert r["acc,none"] == pytest.approx(_objective_metric(model, cfg, "source_class", 3, "accuracy"), abs=1e-6)
    assert r["acc_stderr,none"] == pytest.approx((r["acc,none"] * (1 - r["acc,none"]) / 11) ** 0.5)


def test_mlm_accuracy_and_perplexity_of_the_masked_tokens(tmp_path):
    from llmtrain.evaluation.run import flat_metrics

    path, model, cfg = _bert_dir(tmp_path, 0)
    out = tmp_path / "r.json"
    assert (
        main(["eval", str(path), "--tasks", "bert_mlm", "--limit", "8", "--batch-size", "4", "--output", str(out)]) == 0
    )
    res = json.loads(out.read_text())
    flat = flat_metrics(res)  # the same reader as the decoder tasks (train.eval_tasks, benchmarks)
    assert set(flat) == {"bert_mlm_acc", "bert_mlm_perplexity", "bert_mlm_nsp_acc"}
    assert res["results"]["bert_mlm"]["sample_len"] == 8
    # random weights over an 8192-token vocabulary: near-uniform predictions
    assert 0 <= flat["bert_mlm_acc"] < 0.05 and 2000 < flat["bert_mlm_perplexity"] < 5e4
    nsp = _objective_metric(model, cfg, "bert", 2, "nsp_accuracy")
    assert flat["bert_mlm_nsp_acc"] == pytest.approx(nsp, abs=1e-6)


@pytest.mark.parametrize(
    ("num_labels", "tasks", "message"),
    [
        (3, "bert_mlm", "is a classifier (model.num_labels=3): evaluate it on bert_classify"),
        (0, "bert_classify", "bert_classify needs a fine-tuned classifier"),
        (0, "bert_mlm,llmtrain_cloze", "--tasks mixes BERT tasks (bert_mlm) with decoder tasks (llmtrain_cloze)"),
    ],
)
def test_wrong_pairings_are_one_line_exit_2(tmp_path, capsys, num_labels, tasks, message):
    path, _, _ = _bert_dir(tmp_path, num_labels)
    assert main(["eval", str(path), "--tasks", tasks]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
