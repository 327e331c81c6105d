"""Resuming through the real launcher: nothing is unpickled, corruption and other shapes are refused in
one line, changed hyperparameters are in effect, divergence never poisons the resume point."""

from __future__ import annotations

import json
import pickle
import resource
import shutil
import signal
import subprocess

import pytest
import torch
from helpers import ROOT, TINY, env, launch_cmd, losses, train

from llmtrain.errors import CheckpointError
from llmtrain.parallel.consolidate import consolidate, load_model_weights
from llmtrain.train.metrics import read_metrics
from llmtrain.train.schedule import lr_multiplier

SCHEDULE = ["optim.decay_steps=6"]


@pytest.fixture(scope="module")
def full6(tmp_path_factory):
    out = tmp_path_factory.mktemp("full6")
    train(out, "train.max_steps=6", *SCHEDULE)
    return out


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A run stopped at step 4 of the same schedule (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("run4")
    train(out, "train.max_steps=4", "checkpoint.interval=2", *SCHEDULE)
    return out


@pytest.fixture
def copy4(run4, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    return out


class Payload:
    """Unpickling this creates `marker`: what an attacker's code would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_planted_in_deepspeed_state_never_runs_and_the_resume_is_exact(copy4, full6, tmp_path):
    marker = tmp_path / "payload-ran"
    state = copy4 / "checkpoints" / "step_00000004" / "state"
    planted = list(state.glob("*.pt"))
    assert planted and all(p.stat().st_size > 0 for p in planted)  # DeepSpeed's files are still written
    for pt in planted:
        torch.save({"module": Payload(marker), "optimizer": Payload(marker)}, pt)
    with open(marker.with_suffix(".probe"), "wb") as f:  # the payload does run when unpickled
        pickle.dump(Payload(marker.with_suffix(".ran")), f)
    pickle.loads(marker.with_suffix(".probe").read_bytes())
    assert marker.with_suffix(".ran").exists()
    proc = train(copy4, "train.max_steps=6", *SCHEDULE)
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert not marker.exists()
    a, b = losses(full6), losses(copy4)
    assert [b[s] for s in (5, 6)] == [a[s] for s in (5, 6)]  # bit-for-bit


def _flip16(path, at=None):
    raw = bytearray(path.read_bytes())
    at = len(raw) - 64 if at is None else at  # inside the tensor data, past the safetensors header
    for i in range(at, at + 16):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_a_universal_file_refuse_the_resume_in_one_line(copy4):
    target = copy4 / "checkpoints" / "step_00000004" / "universal" / "wte.weight.safetensors"
    _flip16(target)
    proc = train(copy4, "train.max_steps=6", *SCHEDULE, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert str(target) in err and "sha256" in err and "train.resume=" in err and "Traceback" not in proc.stderr


def test_flipped_bytes_in_a_consolidated_model_are_an_error(run4, tmp_path):
    out = tmp_path / "model"
    consolidate(run4, out)
    load_model_weights(out)  # verifies
    _flip16(out / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        load_model_weights(out)
    ckpt_file = run4 / "checkpoints" / "step_00000004" / "universal" / "lm_head.weight.safetensors"
    if not ckpt_file.exists():  # tied embeddings: the head is wte
        ckpt_file = run4 / "checkpoints" / "step_00000004" / "universal" / "ln_f.weight.safetensors"
    copy = tmp_path / "ckpt"
    shutil.copytree(run4 / "checkpoints" / "step_00000004", copy)
    _flip16(copy / "universal" / ckpt_file.name)
    with pytest.raises(CheckpointError, match=ckpt_file.name):
        load_model_weights(copy)


def test_another_model_shape_is_refused_before_anything_is_written(copy4):
    config = (copy4 / "config.yaml").read_bytes()
    proc = train(copy4, "train.max_steps=6", *SCHEDULE, "model.n_layer=1", "train.seed=5", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "cannot resume" in err and "model.n_layer=1 (saved 2)" in err and "train.seed=5" in err
    assert "Traceback" not in proc.stderr
    assert (copy4 / "config.yaml").read_bytes() == config  # still the config of the checkpoints


def test_a_changed_lr_is_in_effect_and_logged(copy4, full6):
    proc = train(copy4, "train.max_steps=6", *SCHEDULE, "optim.lr=0.02")
    assert (
        "applying changed keys: checkpoint.interval 2 -> 0, optim.lr 0.001 -> 0.02, train.max_steps 4 -> 6"
        in proc.stdout
    )
    f = lr_multiplier(
        type("O", (), {"warmup_steps": 2, "decay_steps": 6, "min_lr_ratio": 0.1, "schedule": "cosine"})(), 6
    )
    logged = {r["step"]: r["lr"] for r in read_metrics(copy4 / "metrics.jsonl") if "lr" in r}
    assert logged[5] == pytest.approx(0.02 * f(4)) and logged[6] == pytest.approx(0.02 * f(5))
    meta = json.loads((copy4 / "checkpoints" / "step_00000006" / "universal" / "meta.json").read_text())
    assert meta["lr_scheduler"]["base_lrs"] == [0.02, 0.02]  # what the optimizer ran with
    assert meta["lr_scheduler"]["_last_lr"] == pytest.approx([0.02 * f(6)] * 2)
    a, b = losses(full6), losses(copy4)
    assert b[5] == a[5] and b[6] != a[6]  # step 5's loss precedes its update; step 6 saw the new lr


def test_divergence_falls_back_to_the_good_checkpoint_and_a_sane_rerun_completes(tmp_path):
    """The issue's reproduction (lr 1e10, no warmup, a checkpoint every step): the first checkpoint holds
    weights ~1e10 and the next step is NaN, so it never becomes good; the rerun starts afresh."""
    out = tmp_path / "run"
    bad = [
        "optim.lr=1e10",
        "optim.warmup_steps=0",
        "checkpoint.interval=1",
        "train.max_nonfinite_steps=2",
        "checkpoint.keep_last=1",
    ]
    proc = train(out, "train.max_steps=6", *bad, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "The last good checkpoint: none yet" in proc.stderr and "starts afresh" in proc.stderr
    assert not (out / "checkpoints" / "latest").exists()
    proc = train(out, "train.max_steps=6", "checkpoint.interval=1", "checkpoint.keep_last=1")
    assert "resumed from" not in proc.stdout and "done: step 6" in proc.stdout


def test_divergence_after_good_steps_keeps_and_names_the_good_checkpoint(copy4):
    """Good until step 4 (the final checkpoint of a completed run); a resume at lr 1e10 diverges. keep_last=1
    does not prune step 4; `latest` goes back to it; the advised rerun with a sane lr continues from it."""
    assert (copy4 / "checkpoints" / "good").read_text().strip() == "step_00000004"
    bad = ["optim.lr=1e10", "checkpoint.interval=1", "train.max_nonfinite_steps=2", "checkpoint.keep_last=1"]
    proc = train(copy4, "train.max_steps=8", *SCHEDULE, *bad, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    good = copy4 / "checkpoints" / "step_00000004"
    assert f"The last good checkpoint is {good}" in proc.stderr
    assert (copy4 / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    proc = train(copy4, "train.max_steps=8", *SCHEDULE, "checkpoint.interval=1", "checkpoint.keep_last=1")
    assert "at step 4" in proc.stdout and "done: step 8" in proc.stdout
    assert all(v is not None for v in losses(copy4).values())


def _fsize_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_disk_full_during_a_save_is_one_line_and_publishes_nothing(copy4):
    """A 1 MiB file-size limit makes every write of the step-6 checkpoint fail, as a full disk would."""
    cmd = [
        *launch_cmd("python", 1),
        str(ROOT / "recipes/gpt_debug.yaml"),
        *TINY,
        f"out_dir={copy4}",
        "train.max_steps=6",
        *SCHEDULE,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, preexec_fn=_fsize_limit
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "cannot write checkpoint step_00000006" in err and "free space" in err and "Traceback" not in proc.stderr
    root = copy4 / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000004" and not list(root.glob(".tmp-*"))
