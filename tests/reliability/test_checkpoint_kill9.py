"""The kill -9 campaign: 1- and 2-rank runs killed (the whole process group, as a node loss would) at
seeded moments, during saves too, then rerun until done: every loss ever logged equals the uninterrupted
run's loss of that step, bit for bit, so every resume was exact.

The moments are a fixed plan drawn from random.Random(SEED) (not random per run): a trigger (a step was
logged since the launch, or a checkpoint directory is being written) plus a delay. What the plan hits
still depends on timing; the assertions hold for any moment."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT, TINY, env, launch_cmd, train

from llmtrain.train.metrics import read_metrics

SEED = 2026
STEPS = 6
ARGS = [f"train.max_steps={STEPS}", f"optim.decay_steps={STEPS}", "checkpoint.interval=1", "checkpoint.keep_last=2"]


def _plan(kills: int, salt: int) -> list[tuple[str, float]]:
    rng = random.Random(SEED + salt)
    return [(rng.choice(["step", "save"]), round(rng.uniform(0.0, 0.3), 3)) for _ in range(kills)]


def _logged(out: Path) -> list[tuple[int, float]]:
    """Every loss logged, the records a resume superseded (steps computed again) included."""
    paths = [out / "metrics.superseded.jsonl", out / "metrics.jsonl"]
    return [(r["step"], r["loss"]) for p in paths if p.exists() for r in read_metrics(p) if "loss" in r]


def _kill_once(cmd: list[str], out: Path, trigger: str, delay: float) -> str:
    """Launch, wait for the trigger, sleep `delay`, SIGKILL the process group. Returns what happened."""
    launched, seen = time.time(), len(_logged(out))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    root, deadline = out / "checkpoints", time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if trigger == "step":
            fired = len(_logged(out)) > seen
        else:  # a save of this launch in flight
            fired = any(p.stat().st_ctime > launched for p in root.glob(".tmp-step_*")) if root.exists() else False
        if fired:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return f"killed on {trigger}+{delay}s"
        time.sleep(0.002)
    proc.wait(timeout=60)
    return f"finished before {trigger} (rc {proc.returncode})"


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout, kills", [(1, [], 3), (2, ["parallel.zero_stage=2"], 2)])
def test_kill_9_at_seeded_moments_resumes_exactly(tmp_path, nproc, layout, kills):
    launcher = "python" if nproc == 1 else "torchrun"
    reference = tmp_path / "reference"
    train(reference, *ARGS, *layout, launcher=launcher, nproc=nproc)
    expected = dict(_logged(reference))
    out = tmp_path / "run"
    cmd = [*launch_cmd(launcher, nproc), str(ROOT / "recipes/gpt_debug.yaml"), *TINY, f"out_dir={out}", *ARGS, *layout]
    events = [_kill_once(cmd, out, trigger, delay) for trigger, delay in _plan(kills, nproc)]
    final = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, (events, final.stderr[-3000:])
    killed = sum(e.startswith("killed") for e in events)
    logged = _logged(out)
    assert killed == kills, events  # every planned kill hit a live run
    assert {s for s, _ in logged} == set(range(1, STEPS + 1))
    assert all(loss == expected[step] for step, loss in logged), (events, logged, expected)  # recomputed too
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    print(f"{nproc} rank(s): {killed} of {kills} kills resumed exactly: {events}")
