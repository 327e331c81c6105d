"""Ranks never outlive their launcher: kill -9 of torchrun, SIGTERM to the deepspeed runner."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from helpers import BIN, ROOT, TINY, TRAIN, env, free_port, launch_cmd


def _start(launcher: str, out: Path) -> subprocess.Popen:
    cmd = [
        *launch_cmd(launcher, 2),
        str(ROOT / "recipes/gpt_debug.yaml"),
        *TINY,
        f"out_dir={out}",
        "train.max_steps=100000",
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) if p.name.isdigit() else None
        except (OSError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _orphan_ranks_stop(launcher: str, sig: int, tmp_path: Path) -> tuple[float, str]:
    out = tmp_path / launcher
    proc = _start(launcher, out)
    tree: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        tree = _descendants(proc.pid)
        proc.send_signal(sig)  # only the launcher process, as `kill` does
        killed = time.time()
        while _alive(tree) and time.time() - killed < 60:
            time.sleep(0.2)
        gone_after = time.time() - killed
        output, _ = proc.communicate(timeout=30)
    finally:
        for pid in _alive([proc.pid, *tree]):
            os.kill(pid, signal.SIGKILL)
    assert not _alive(tree), f"{launcher}: ranks still alive 60 s after the launcher died"
    return gone_after, output


def test_ranks_stop_when_torchrun_is_killed_or_the_deepspeed_runner_is_terminated(tmp_path):
    gone_after, output = _orphan_ranks_stop("torchrun", signal.SIGKILL, tmp_path)
    assert gone_after < 30, gone_after
    # the kernel's parent-death signal (or the watchdog) turned it into a stop: checkpoint, exit
    assert "stop requested by signal" in output, output[-3000:]
    assert (tmp_path / "torchrun" / "checkpoints" / "latest").is_file()

    # The deepspeed runner dies of SIGTERM (it installs no handler for a local run, and its launch.py
    # child never hears of it); the ranks see it gone, checkpoint and exit 0, so launch.py exits 0 too.
    gone_after, output = _orphan_ranks_stop("deepspeed", signal.SIGTERM, tmp_path)
    assert gone_after < 30, gone_after
    assert "stop requested by signal" in output, output[-3000:]
    assert (tmp_path / "deepspeed" / "checkpoints" / "latest").is_file()


def _sigterm_through(
    wrapper: str, nproc_flag: str, out: Path, *launch_args: str, port_flag: str = "--master_port"
) -> tuple[int, str]:
    """SIGTERM to `launchers/<wrapper>` running 2 ranks once they have logged a step: (exit code, output)."""
    cmd = [
        str(BIN / "python"),
        str(ROOT / "launchers" / wrapper),
        nproc_flag,
        *launch_args,
        f"{port_flag}={free_port()}",
        TRAIN,
        str(ROOT / "recipes/gpt_debug.yaml"),
        *TINY,
        f"out_dir={out}",
        "train.max_steps=100000",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stop requested by signal" in output and "Traceback" not in output, output[-3000:]
    assert (out / "checkpoints" / "latest").is_file() and not (out / "run.lock").exists()
    return proc.returncode, output


def test_sigterm_to_the_torchrun_wrapper_ends_in_a_stop_checkpoint_and_exit_0(tmp_path):
    """Plain torchrun exits 1 with a SignalException traceback here although its ranks exited 0
    (it re-raises the signal after shutting them down); launchers/torchrun.py reports the ranks' verdict."""
    code, output = _sigterm_through("torchrun.py", "--nproc_per_node=2", tmp_path / "run")
    assert code == 0, output[-3000:]
    assert "all 2 ranks of this node wrote their stop checkpoint" in output


def test_sigterm_to_the_deepspeed_wrapper_ends_in_a_stop_checkpoint_and_exit_0(tmp_path):
    """The deepspeed runner dies of SIGTERM (exit 143); launchers/deepspeed_run.py passes it to the ranks and
    exits with their status."""
    code, output = _sigterm_through("deepspeed_run.py", "--num_gpus=2", tmp_path / "run")
    assert code == 0, output[-3000:]


def test_sigterm_to_the_accelerate_wrapper_ends_in_a_stop_checkpoint_and_exit_0(tmp_path):
    """`accelerate launch` runs torchrun underneath and exits 143 (128 + SIGTERM) here although its ranks
    exited 0; launchers/accelerate_run.py reports the ranks' verdict."""
    flags = ("--multi_gpu", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no")
    code, output = _sigterm_through(
        "accelerate_run.py", "--num_processes=2", tmp_path / "run", *flags, port_flag="--main_process_port"
    )
    assert code == 0, output[-3000:]
    assert "all 2 ranks of this node wrote their stop checkpoint" in output


def test_ranks_orphaned_during_start_up_exit_at_once(tmp_path):
    """torchrun killed right after it spawned its ranks: they used to wait for its c10d store until the
    collective timeout (19+ minutes); now they are gone within seconds and nothing is written."""
    out = tmp_path / "early"
    proc = _start("torchrun", out)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_descendants(proc.pid)) < 2:
            time.sleep(0.01)
        tree = _descendants(proc.pid)
        proc.kill()
        killed = time.time()
        while _alive(tree) and time.time() - killed < 30:
            time.sleep(0.1)
        gone_after = time.time() - killed
        proc.communicate(timeout=30)
    finally:
        for pid in _alive(_descendants(proc.pid) + tree):
            os.kill(pid, signal.SIGKILL)
    assert len(tree) >= 2 and gone_after < 30, (tree, gone_after)
    assert not (out / "metrics.jsonl").exists()
