"""Ranks that do not outlive their launcher (torch-free: the entry scripts call it before importing torch).

A rank started by a launcher (torchrun, deepspeed, accelerate) watches it: when the launcher process (or,
under the deepspeed runner, either of its two launcher processes) dies, the rank sends itself SIGTERM.
During start-up that ends it at once (no 19-minute wait in the c10d store for a rendezvous that will
never complete); during training it is a graceful stop (stop checkpoint, exit 0); if the rank is still
alive ORPHAN_GRACE_S later, it exits hard. The direct parent is also covered by the kernel
(PR_SET_PDEATHSIG), which fires even while Python is blocked in C++. A rank whose launcher died before
it could look (its environment says a launcher started it, but none is above it) exits at once.
Plain `python` and srun tasks watch nothing: a shell that exits after `nohup` must not stop a run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

ORPHAN_GRACE_S = 60.0  # time an orphaned rank has to finish its stop checkpoint before it exits hard
# argv entries (basenames) that mark a launcher process; our own entry scripts are not among them
LAUNCHERS = {
    "torchrun",
    "torch.distributed.run",
    "torch.distributed.launch",
    "deepspeed",
    "deepspeed.launcher.launch",
    "deepspeed.launcher.runner",
    "accelerate",
    "torchrun.py",
    "deepspeed_run.py",
}
# set in a rank's environment by torchrun/accelerate (the elastic agent) and by deepspeed's launch.py
LAUNCHED_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_SIZE")
PR_SET_PDEATHSIG = 1
_watching: list[tuple[int, str | None]] | None = None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], start time [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ppid(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def launcher_chain(pid: int | None = None) -> list[tuple[int, str | None]]:
    """(pid, start time) of the launcher processes above this one: the consecutive ancestors whose
    command line starts a launcher (torchrun; deepspeed's runner and its launch.py; accelerate)."""
    chain: list[tuple[int, str | None]] = []
    pid = _ppid(pid or os.getpid())
    while pid > 1:
        argv = [Path(a).name for a in _cmdline(pid)[:5]]
        fields = _stat(pid)
        # an empty command line is a process caught while it exits (its memory is gone, its children not
        # yet handed to init): watch it too, it is about to be gone
        if not fields or (argv != [""] and not LAUNCHERS.intersection(argv)):
            break
        chain.append((pid, fields[19]))
        pid = int(fields[1])
    return chain


def watch_launcher(poll_s: float = 1.0) -> list[tuple[int, str | None]]:
    """Stop this rank when its launcher dies (see the module docstring). Returns the watched chain.
    Idempotent: the entry scripts call it first thing, the trainer again."""
    global _watching
    if _watching is not None:
        return _watching
    chain = launcher_chain() if sys.platform == "linux" else []
    _watching = chain
    if not chain and sys.platform == "linux" and any(k in os.environ for k in LAUNCHED_ENV) and os.getppid() == 1:
        print(
            f"llmtrain: rank {os.environ.get('RANK')} was started by a launcher that is gone; exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
    if not chain:
        return chain  # plain python or srun: nothing of ours to outlive (srun's step kills its tasks)
    if threading.current_thread() is threading.main_thread():
        # a launcher that ignores SIGTERM itself (node.sh's torchrun) must not hand that on to the ranks
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watchdog thread below still covers it
    threading.Thread(target=_watch, args=(chain, poll_s), name="llmtrain-launcher-watch", daemon=True).start()
    return chain


def _running(pid: int, start: str | None) -> bool:
    """The process with this pid and start time exists and is not a zombie (dead, not yet reaped)."""
    fields = _stat(pid)
    if not fields:
        return False
    return fields[0] != "Z" and fields[19] == start


def _watch(chain: list[tuple[int, str | None]], poll_s: float) -> None:
    while True:
        gone = [pid for pid, start in chain if not _running(pid, start)]
        if gone or os.getppid() != chain[0][0]:
            break
        time.sleep(poll_s)
    print(
        f"llmtrain: launcher process {(gone or [chain[0][0]])[0]} is gone; rank {os.environ.get('RANK')} "
        f"stops (stop checkpoint if training, else exit)",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_S)
    os._exit(1)
