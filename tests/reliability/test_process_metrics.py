"""metrics.jsonl after crashes and resumes; the held-out loss of a layout; checks that must come before step 1."""

from __future__ import annotations

import json

import pytest
from helpers import train
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from llmtrain.config import LogConfig
from llmtrain.errors import UserError
from llmtrain.train.metrics import MetricsSink, last_by_step, plot_losses, read_metrics


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_torn_line_and_records_past_the_resume_step_are_handled_in_process(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 9.0 - s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]  # the torn last line is skipped
    assert plot_losses(path, tmp_path / "loss.png") is not None
    sink = MetricsSink(tmp_path, LogConfig(), {}, resume_step=2)  # a run resuming from step 2
    assert "dropped a torn last line" in capsys.readouterr().err
    sink.log({"step": 3, "loss": 1.0})
    assert [(r["step"], r["loss"]) for r in _records(path)] == [(1, 8.0), (2, 7.0), (3, 1.0)]
    assert [r["step"] for r in _records(tmp_path / "metrics.superseded.jsonl")] == [3]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=rf"{path}:2: not a JSON record"):
        read_metrics(path)


def test_resume_after_a_torn_write_logs_one_record_per_step(tmp_path):
    out = tmp_path / "run"
    train(out, "train.max_steps=3", "checkpoint.interval=2")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 8.')  # a crash while the line was written
    first = last_by_step(read_metrics(out / "metrics.jsonl"), "loss")
    # The run is continued from its step-2 checkpoint (as after a kill between step 3's log line and its save)
    proc = train(out, "train.max_steps=4", f"train.resume={out}/checkpoints/step_00000002")
    assert "dropped a torn last line" in proc.stderr
    records = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4], steps  # step 3 once: the recomputed one
    assert last_by_step(records, "loss")[3] == first[3]  # recomputed exactly
    superseded = read_metrics(out / "metrics.superseded.jsonl")
    assert [r["step"] for r in superseded if "loss" in r] == [3]
    assert (out / "loss.png").is_file()


def test_eval_loss_is_the_same_on_one_and_two_ranks_and_the_final_checkpoint_comes_first(tmp_path):
    # lr 0: the weights stay at their seeded init on both layouts, so only the evaluated sequences could
    # differ. 3 eval batches of 4 sequences on 2 ranks: rank 0 takes global batches 0 and 2, rank 1 takes
    # batch 1 and runs batch 3 uncounted (ZeRO-3 and pipelines need equal forwards on every rank).
    args = ["train.max_steps=1", "optim.lr=0", "train.eval_batches=3"]
    one = train(tmp_path / "one", *args)
    two = train(tmp_path / "two", *args, "parallel.zero_stage=3", launcher="torchrun", nproc=2)
    a = last_by_step(read_metrics(tmp_path / "one" / "metrics.jsonl"), "eval_loss")[1]
    b = last_by_step(read_metrics(tmp_path / "two" / "metrics.jsonl"), "eval_loss")[1]
    assert b == pytest.approx(a, abs=2e-6), (a, b)  # was 6.4000 vs 6.4850: per-rank counts
    for proc in (one, two):
        assert proc.stdout.index("checkpoint saved") < proc.stdout.index("eval @ step 1")
        assert "model gpt_debug 0.64M params" in proc.stdout  # ZeRO-3 partitioned: was 0.00M


def test_init_from_a_checkpoint_with_another_tokenizer_is_refused_before_step_1(tmp_path):
    other = tmp_path / "other"
    (other / "tokenizer").mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        ["a tokenizer trained on other text"] * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]),
    )
    tok.save(str(other / "tokenizer" / "tokenizer.json"))
    (other / "config.yaml").write_text("model: {}\n")
    proc = train(tmp_path / "run", f"model.init_from={other}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"model.init_from={other}: the checkpoint was trained with tokenizer" in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
