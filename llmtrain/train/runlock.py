"""One job per run directory: `<out_dir>/run.lock`, taken by rank 0 before anything is written.

The lock is a file created with O_CREAT | O_EXCL (atomic on local filesystems and on NFSv3+ and the
parallel filesystems clusters share), holding the holder's host, pid, process start time and start date.
The holder touches it every HEARTBEAT_S seconds from a daemon thread and deletes it at exit. A lock is
stale, and the next job removes it, when its pid is gone (or is another process) on the same host, or when
its heartbeat is older than STALE_S seconds (a dead job on another host; this assumes the hosts' clocks
agree to well within STALE_S, as NTP keeps them). A live holder is never taken over: the second job
stops with one line naming it, before it reads or writes anything in the directory.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
STALE_S = 90.0


class RunDirLocked(UserError):
    """Another live job holds the run directory."""


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    now = process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """A held lock; `release()` (also run at exit) removes it if it is still ours."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="llmtrain-run-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the filesystem hiccuped; the next beat retries

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if _read(self.path).get("token") == self.holder["token"]:
            self.path.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # gone, or being written this instant


def stale_reason(path: Path, holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why the lock at `path` no longer protects a live job, or None while its holder lives."""
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if holder["pid"] == os.getpid() and holder.get("start") == process_start(os.getpid()):
            return "it was left by this process"
        if not _pid_alive(holder["pid"], holder.get("start")):
            return f"process {holder['pid']} on this host has exited"
    if age > STALE_S:
        return f"its heartbeat stopped {age:.0f} s ago (more than {STALE_S:.0f} s)"
    return None


def acquire(out_dir: str | Path) -> RunLock:
    """Take `<out_dir>/run.lock` or raise RunDirLocked naming the live holder (host, pid, since when)."""
    out = Path(out_dir)
    path = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _acquire(out, path)
    except OSError as exc:  # read-only, not a directory, no space: the user's out_dir, not a bug
        raise UserError(
            f"out_dir={out}: cannot create {path} ({exc.strerror or exc}); choose a writable out_dir"
        ) from None


def _acquire(out: Path, path: Path) -> RunLock:
    for _ in range(5):
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": process_start(os.getpid()),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "job": os.environ.get("SLURM_JOB_ID"),
            "token": uuid.uuid4().hex,
        }
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read(path)
            reason = stale_reason(path, other)
            if reason is None:
                raise RunDirLocked(_held_message(out, path, other)) from None
            _break(path, other, reason)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(holder))
            f.flush()
            os.fsync(f.fileno())
        return RunLock(path, holder)
    raise RunDirLocked(
        f"{path}: could not take the run directory's lock (other jobs keep taking it); "
        f"is another job starting in {out}?"
    )


def _break(path: Path, holder: dict[str, Any], reason: str) -> None:
    """Move a stale lock aside (an atomic rename: of two jobs breaking it at once, one wins) and drop it."""
    aside = path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    aside.unlink(missing_ok=True)
    from llmtrain.utils import eprint

    eprint(
        f"removed a stale lock {path} (host {holder.get('host')}, pid {holder.get('pid')}, since "
        f"{holder.get('since')}): {reason}"
    )


def _held_message(out: Path, path: Path, holder: dict[str, Any]) -> str:
    try:
        beat = f"; last heartbeat {time.time() - path.stat().st_mtime:.0f} s ago"
    except OSError:
        beat = ""
    job = f" (SLURM job {holder['job']})" if holder.get("job") else ""
    who = (
        f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"
        if holder
        else "a job that is writing its lock right now"
    )
    return (
        f"{out} is in use by another job: {who} ({path}{beat}). Wait for that job to end or stop it, or "
        f"choose another out_dir; a dead job's lock frees itself (at once on its own host, after "
        f"{STALE_S:.0f} s without heartbeat elsewhere)"
    )


def lock_run_dir(out_dir: str | Path) -> RunLock | None:
    """Collective: rank 0 takes the lock; every rank raises RunDirLocked if it could not (so all exit 2)."""
    import torch.distributed as dist

    from llmtrain.utils import rank

    lock, error = None, None
    if rank() == 0:
        try:
            lock = acquire(out_dir)
        except UserError as exc:  # every rank must raise it, or the others wait in the broadcast
            error = str(exc)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise (RunDirLocked if "in use by another job" in error else UserError)(error)
    return lock
