"""`train.eval_tasks`: the tasks' metrics land in every eval record of metrics.jsonl; an unknown task name
stops the run before step 1 with one line, exit 2."""

from __future__ import annotations

import json

import pytest
from evalhelpers import need_lm_eval
from helpers import read_metrics, train

from llmtrain.cli import main


def test_eval_tasks_appear_in_eval_records(local_tasks, tmp_path, capsys):
    """... and the final record equals `llmtrain eval RUN --tasks` on the checkpoint saved right after it."""
    need_lm_eval()
    from llmtrain.evaluation.run import flat_metrics

    out, tasks = tmp_path / "run", f"llmtrain_next_verse,{local_tasks / 'local_cloze.yaml'}"
    train(out, "train.max_steps=2", "train.eval_interval=1", "train.eval_tasks_limit=3", f"train.eval_tasks=[{tasks}]")
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]  # step 1 by eval_interval, step 2 the final eval
    for r in evals:
        assert 0 <= r["eval_llmtrain_next_verse_acc"] <= 1 and 0 <= r["eval_local_cloze_acc"] <= 1
        assert r["eval_llmtrain_next_verse_acc_norm"] >= 0 and r["eval_local_cloze_perplexity"] > 0
    assert (
        main(
            [
                "eval",
                str(out),
                "--tasks",
                tasks,
                "--limit",
                "3",
                "--device",
                "cpu",
                "--output",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    standalone = flat_metrics(json.loads((tmp_path / "r.json").read_text()))
    assert {f"eval_{k}": v for k, v in standalone.items()} == pytest.approx(
        {k: v for k, v in evals[-1].items() if k.startswith(("eval_llmtrain", "eval_local"))}, rel=1e-4
    )


def test_unknown_eval_task_fails_before_training(tmp_path):
    need_lm_eval()
    out = tmp_path / "run"
    proc = train(out, "train.max_steps=2", "train.eval_tasks=[llmtrain_clozee]", check=False)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "train.eval_tasks: unknown task(s) llmtrain_clozee" in err[0]
    assert not (out / "metrics.jsonl").exists() or read_metrics(out / "metrics.jsonl") == []


@pytest.mark.slow
def test_distillation_shards_eval_tasks_over_data_parallel_ranks(model_dir, local_tasks, tmp_path):
    """launchers/distill.py under torchrun, dp 2 at ZeRO-1: each rank scores its share of the documents, and
    the final eval record equals `llmtrain eval RUN --tasks` on one rank."""
    need_lm_eval()
    import subprocess

    from helpers import BIN, ROOT, TINY, env, free_port

    from llmtrain.evaluation.run import flat_metrics

    out, tasks = tmp_path / "student", str(local_tasks)
    cmd = [
        *(str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}"),
        *(str(ROOT / "launchers" / "distill.py"), str(ROOT / "recipes" / "distill_gpt_debug.yaml"), *TINY),
        *("train.seq_len=32", "train.max_steps=1", "parallel.zero_stage=1", f"distill.teacher={model_dir}"),
        *(f"train.eval_tasks=[{tasks}]", f"out_dir={out}"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("train.eval_tasks: the documents are sharded over 2 data-parallel ranks") == 1
    final = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r][-1]
    args = ["eval", str(out), "--tasks", tasks, "--device", "cpu", "--output", str(tmp_path / "r.json")]
    assert main(args) == 0
    standalone = {f"eval_{k}": v for k, v in flat_metrics(json.loads((tmp_path / "r.json").read_text())).items()}
    assert set(standalone) == {k for k in final if k.startswith("eval_local_")}
    assert {k: final[k] for k in standalone} == pytest.approx(standalone, rel=1e-4)
