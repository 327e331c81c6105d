"""`llmtrain generate` and `llmtrain eval` on a checkpoint the trainer wrote (ZeRO-1, Llama flavour)."""

from __future__ import annotations


import pytest

from helpers import train
from llmtrain.cli import main
from llmtrain.train.metrics import read_metrics


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "run"
    train(out, "train.max_steps=3", "parallel.zero_stage=1", "checkpoint.interval=3", recipe="recipes/llama_debug.yaml")
    return out


def test_generate_with_and_without_cache(run_dir, capsys):
    texts = []
    for extra in ([], ["--no-cache"]):
        assert main(["generate", str(run_dir), "--prompt", "And God said", "--max-new-tokens", "12",
                     "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "7", *extra]) == 0
        texts.append(capsys.readouterr().out.strip())
    assert texts[0].startswith("And God said") and len(texts[0]) > len("And God said")
    assert texts[0] == texts[1]


def test_eval_matches_the_trainers_held_out_loss(run_dir, capsys):
    final = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    # the trainer's eval: the first eval_batches=2 validation micro-batches of 4 x 64 tokens
    assert main(["eval", str(run_dir), "--seq-len", "64", "--batch-size", "4", "--batches", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    loss = float(out.split("loss ")[1].split()[0])
    assert loss == pytest.approx(final["eval_loss"], abs=1e-3)
    assert "512 tokens" in out and "perplexity" in out


def test_eval_refuses_a_longer_window_than_the_model(run_dir):
    assert main(["eval", str(run_dir), "--seq-len", "100000"]) == 2
