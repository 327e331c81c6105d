"""Crashes that real clusters see: a kill -9 while a checkpoint is written, one rank dying mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from helpers import ROOT, TINY, env, free_port, launch_cmd, losses

from llmtrain.train.checkpoint import resolve_checkpoint


def _popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # its own process group: kill -9 takes all of it


def test_kill_9_during_checkpoint_write_never_publishes_a_partial_checkpoint(tmp_path):
    out = tmp_path / "run"
    # gpt_debug's own width (~5M params, ~60 MB of optimizer state per save) makes a save take long
    # enough to be caught in the act; a checkpoint every step gives many chances.
    args = [a for a in TINY if not a.startswith(("model.", "checkpoint."))]
    cmd = [
        *launch_cmd("python", 1),
        str(ROOT / "recipes/gpt_debug.yaml"),
        *args,
        f"out_dir={out}",
        "train.max_steps=40",
        "checkpoint.interval=1",
        "checkpoint.keep_last=3",
    ]
    proc = _popen(cmd)
    root, seen_partial, deadline = out / "checkpoints", False, time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        done = list(root.glob("step_*")) if root.exists() else []
        if done and list(root.glob(".tmp-step_*")):  # a save is in flight and an older one is complete
            os.killpg(proc.pid, signal.SIGKILL)
            seen_partial = True
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert seen_partial, "never saw a checkpoint being written"
    partial = list(root.glob(".tmp-step_*"))
    latest = resolve_checkpoint(out)  # raises if `latest` names anything incomplete
    assert (latest / "trainer_state.json").is_file() and (latest / "state").is_dir()
    assert all(p.name != latest.name for p in partial)
    # Relaunch: the partial directory is cleaned up and the run continues from `latest` (a short
    # continuation keeps the test quick; the later max_steps override wins).
    resumed_at = int(latest.name.split("_")[1])
    relaunch = subprocess.run(
        [*cmd, f"train.max_steps={resumed_at + 2}"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"at step {resumed_at}" in relaunch.stdout
    assert not list(root.glob(".tmp-step_*"))
    assert max(losses(out)) == resumed_at + 2


def test_one_rank_killed_ends_the_job_in_bounded_time_naming_the_rank(tmp_path):
    out = tmp_path / "run"
    cmd = [
        *launch_cmd("torchrun", 2),
        str(ROOT / "recipes/gpt_debug.yaml"),
        *TINY,
        f"out_dir={out}",
        "train.max_steps=100000",
        "parallel.zero_stage=2",
    ]
    proc = _popen(cmd)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    victim = _worker_pid(proc.pid, local_rank=1)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - killed_at < 90
    assert "local_rank: 1" in output and "SIGKILL" in output, output[-3000:]


def test_rank_that_cannot_reach_the_master_is_named(tmp_path):
    """Rank 1 of 2 with no rank 0 listening (its node never started): a bounded wait, then an error that
    names the rank, the world and the address, not a hang."""
    rank1 = dict(env(), RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [
        *launch_cmd("python", 1),
        str(ROOT / "recipes/gpt_debug.yaml"),
        *TINY,
        f"out_dir={tmp_path / 'run'}",
        "parallel.collective_timeout_s=3",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=rank1, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert (
        f"rank 1 could not join the process group of 2 ranks at 127.0.0.1:{rank1['MASTER_PORT']} within 3 s"
        in proc.stderr
    ), proc.stderr[-3000:]


def _worker_pid(launcher_pid: int, local_rank: int) -> int:
    """The pid of the worker process with LOCAL_RANK=local_rank under a launcher."""
    for _ in range(200):
        for pid in Path("/proc").iterdir():
            if not pid.name.isdigit():
                continue
            try:
                environ = (pid / "environ").read_bytes().split(b"\0")
                stat = (pid / "stat").read_text().split()
            except OSError:
                continue
            if f"LOCAL_RANK={local_rank}".encode() in environ and int(stat[3]) == launcher_pid:
                return int(pid.name)
        time.sleep(0.1)
    raise AssertionError("worker process not found")
