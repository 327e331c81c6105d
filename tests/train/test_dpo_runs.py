"""DPO through launchers/train.py on prepared preference data (`prepare-data --format preference`, written here
with the library call): step 1's loss is log 2 (policy = reference = model.init_from), the reward metrics reach
metrics.jsonl, and the cached reference (dpo.cache_dir) and a ZeRO-3 reference on 2 ranks (with a ZeRO-3
policy) give the live reference's losses."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, env, free_port, losses

from llmtrain.train.metrics import read_metrics

RECIPE = str(ROOT / "recipes" / "dpo_llama_debug.yaml")
MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.n_embd=64", "model.intermediate_size=96"]
RUN = [
    *MODEL,
    "train.seq_len=64",
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.eval_interval=0",
    "train.eval_batches=2",
    "checkpoint.interval=0",
    "log.interval=1",
    "log.progress=false",
    "optim.lr=3e-3",
    "optim.warmup_steps=1",
    "dpo.beta=0.5",
]
WORDS = "lamb river stone bread olive cedar house field vine water light sword crown gate tent ark".split()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(pairs dataset, reference model directory): 40 pairs, 20% held out; a tiny llama_debug-shaped model."""
    from llmtrain.config import load_config
    from llmtrain.data import DataConfig, load_tokenizer
    from llmtrain.data.bundled import bundled_tokenizer_dir
    from llmtrain.data.chat import load_chat_template, write_chat_dataset
    from llmtrain.model_dir import write_model_dir
    from llmtrain.models import build_model

    root = tmp_path_factory.mktemp("dpo_runs")
    tok_dir = bundled_tokenizer_dir(DataConfig())
    records = [
        {"prompt": f"Is the {a} near the {b}?", "chosen": f"Yes, the {a} is near.", "rejected": "No."}
        for i, a in enumerate(WORDS)
        for b in WORDS[i + 1 : i + 4]
    ][:40]
    write_chat_dataset(
        records,
        load_tokenizer(tok_dir),
        load_chat_template("/nonexistent", "chatml"),
        root / "pairs",
        kind="preference",
        seq_len=64,
        val_fraction=0.2,
    )
    cfg = load_config(RECIPE, MODEL).model
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    write_model_dir(cfg, model.state_dict(), root / "ref", tokenizer_json=tok_dir / "tokenizer.json")
    return root


def _run(root, name: str, *extra: str, nproc: int = 1) -> tuple[dict[int, float], str]:
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run"]
    launch += [] if nproc == 1 else [f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd = [*launch, str(ROOT / "launchers" / "train.py"), RECIPE, *RUN, f"out_dir={root / name}"]
    cmd += [f"data.path={root / 'pairs'}", f"model.init_from={root / 'ref'}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return losses(root / name), proc.stdout


def test_dpo_runs_live_cached_and_zero3_reference_agree(prepared):
    live, out = _run(prepared, "live")
    assert live[1] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the policy is its reference
    assert live[4] < live[1]
    records = read_metrics(prepared / "live" / "metrics.jsonl")
    last = [r for r in records if r.get("step") == 4 and "reward_accuracy" in r][-1]
    assert last["reward_accuracy"] > 0.5 and last["reward_margin"] > 0
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all("eval_reward_accuracy" in r and "eval_ppl" not in r for r in evals)  # no perplexity of DPO
    done = [line for line in out.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "reward_accuracy" in done[0] and "perplexity" not in out, done

    cached, _ = _run(prepared, "cached", f"dpo.cache_dir={prepared / 'ref_cache'}")
    rows = json.loads((prepared / "ref_cache" / "meta.json").read_text())["rows"]
    assert 30 <= rows <= 40, rows  # the pairs of 4 steps of 8 (an epoch of the ~32 training pairs) + held-out ones
    for step in live:
        assert cached[step] == pytest.approx(live[step], abs=1e-6), (step, cached, live)

    # both sharded over 2 ranks: the same global batches, so the same losses up to reduction order
    zero3, _ = _run(prepared, "zero3", "parallel.zero_stage=3", "dpo.reference_zero_stage=3", nproc=2)
    for step in live:
        assert zero3[step] == pytest.approx(live[step], abs=2e-5), (step, zero3, live)
