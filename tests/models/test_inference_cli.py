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
        assert (
            main(
                [
                    "generate",
                    str(run_dir),
                    "--prompt",
                    "And God said",
                    "--max-new-tokens",
                    "12",
                    "--temperature",
                    "0.9",
                    "--top-k",
                    "50",
                    "--top-p",
                    "0.95",
                    "--seed",
                    "7",
                    *extra,
                ]
            )
            == 0
        )
        texts.append(capsys.readouterr().out.strip())
    assert texts[0].startswith("And God said") and len(texts[0]) > len("And God said")
    assert texts[0] == texts[1]


def test_eval_matches_the_trainers_held_out_loss(run_dir, capsys):
    final = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    # the trainer's eval: the first eval_batches=2 validation micro-batches of 4 x 64 tokens
    assert (
        main(["eval", str(run_dir), "--seq-len", "64", "--batch-size", "4", "--batches", "2", "--device", "cpu"]) == 0
    )
    out = capsys.readouterr().out
    loss = float(out.split("loss ")[1].split()[0])
    assert loss == pytest.approx(final["eval_loss"], abs=1e-3)
    assert "512 tokens" in out and "perplexity" in out


def test_eval_refuses_a_longer_window_than_the_model(run_dir):
    assert main(["eval", str(run_dir), "--seq-len", "100000"]) == 2


def test_export_hf_loads_in_transformers_and_imports_back(run_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    from llmtrain.inference import checkpoint_tokenizer, load_decoder
    from llmtrain.parallel.consolidate import init_model_from

    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    assert main(["export-hf", str(run_dir), str(hf_dir)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ours_tok = checkpoint_tokenizer(run_dir)
    text = "And God said, Let there be light: and there was light."
    assert hf_tok(text)["input_ids"] == ours_tok.encode(text)
    cfg, ours = load_decoder(run_dir)
    ids = torch.tensor([ours_tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)

    assert main(["import-hf", str(hf_dir), str(back)]) == 0
    cfg2, again = load_decoder(back)
    assert cfg2.n_kv_head == cfg.n_kv_head and cfg2.pos == "rope"
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=1e-5, rtol=1e-5)
    fresh = type(ours)(cfg2)
    init_model_from(fresh, back)  # what model.init_from does with it
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, again.blocks[0].attn.qkv.weight)
    capsys.readouterr()
    assert main(["generate", str(back), "--prompt", "And God", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("And God")
    assert main(["import-hf", str(hf_dir), str(back)]) == 2  # never overwrites a model directory
