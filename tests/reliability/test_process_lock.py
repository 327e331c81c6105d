"""One job per run directory (llmtrain/train/runlock.py), and Ctrl-C as a graceful stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from helpers import ROOT, TINY, env, launch_cmd, train

from llmtrain.errors import UserError
from llmtrain.train import runlock
from llmtrain.train.runlock import LOCK_NAME, RunDirLocked, acquire, process_start


def _plant(out, **holder):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"since": "2026-01-01T00:00:00+00:00", **holder}))
    return out / LOCK_NAME


def test_a_live_holder_is_named_and_a_dead_one_is_freed(tmp_path, capsys):
    host = socket.gethostname()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:  # a live process on this host holds it: refused, naming host, pid and since when
        _plant(tmp_path / "a", host=host, pid=sleeper.pid, start=process_start(sleeper.pid))
        with pytest.raises(
            RunDirLocked,
            match=rf"in use by another job: host {host}, pid {sleeper.pid}, "
            r"since 2026-01-01T00:00:00\+00:00",
        ):
            acquire(tmp_path / "a")
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = acquire(tmp_path / "a")  # the same pid, now dead: stale at once
    assert "has exited" in capsys.readouterr().err
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()

    # Another host: its pid cannot be checked, only its heartbeat (the file's mtime).
    path = _plant(tmp_path / "b", host="elsewhere", pid=4242)
    with pytest.raises(RunDirLocked, match="host elsewhere, pid 4242"):
        acquire(tmp_path / "b")
    (tmp_path / "file").write_text("")  # an out_dir that cannot be created: one line, not a traceback
    with pytest.raises(UserError, match=r"cannot create .*run.lock \(Not a directory\); choose a writable out_dir"):
        acquire(tmp_path / "file" / "run")

    old = time.time() - runlock.STALE_S - 5
    os.utime(path, (old, old))
    acquire(tmp_path / "b").release()
    assert "heartbeat stopped" in capsys.readouterr().err


def test_second_job_into_the_same_out_dir_exits_2_and_ctrl_c_stops_the_first_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = [
        *launch_cmd("python", 1),
        str(ROOT / "recipes/gpt_debug.yaml"),
        *TINY,
        f"out_dir={out}",
        "train.max_steps=100000",
    ]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        second = train(out, "train.max_steps=3", check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        line = [ln for ln in second.stderr.splitlines() if ln.startswith("error: ")]
        assert len(line) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"in use by another job: host {socket.gethostname()}, pid {first.pid}, since " in line[0]
        assert first.poll() is None  # untouched: still training
        first.send_signal(signal.SIGINT)  # Ctrl-C: a stop checkpoint, exit 0, no traceback
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output[-3000:]
    assert "stop requested by signal" in output and "Traceback" not in output, output[-3000:]
    assert (out / "checkpoints" / "latest").is_file()
    assert not (out / LOCK_NAME).exists()  # released at exit
