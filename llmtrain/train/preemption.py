"""Graceful stop on SIGTERM / SIGINT / SIGUSR1, and ranks that do not outlive their launcher.

SIGTERM (SLURM preemption, `scancel`, `kill`), SIGUSR1 (`#SBATCH --signal`) and SIGINT (Ctrl-C, which a
terminal sends to the launcher and every rank) all mean "checkpoint and stop": the handler only sets a
flag; at each step boundary the ranks agree (one all-reduce of a flag, MAX) so that all of them
checkpoint at the same step and exit 0 together; a rank that got no signal still stops. A second Ctrl-C
interrupts at once.

A rank started by a launcher (torchrun, deepspeed, accelerate) watches it: when the launcher process
(or, under the deepspeed runner, either of its two launcher processes) dies, the rank sends itself
SIGTERM: during start-up that ends it at once (no 19-minute wait in the c10d store); during training it
writes the stop checkpoint; if it is still alive ORPHAN_GRACE_S later, it exits hard. The direct parent
is also covered by the kernel (PR_SET_PDEATHSIG), which fires even while Python is blocked in C++.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
ORPHAN_GRACE_S = 60.0  # time an orphaned rank has to finish its stop checkpoint before it exits hard
# argv entries (basenames) that mark a launcher process; our own entry scripts are not among them
LAUNCHERS = {"torchrun", "torch.distributed.run", "torch.distributed.launch", "deepspeed",
             "deepspeed.launcher.launch", "deepspeed.launcher.runner", "accelerate", "torchrun.py"}
PR_SET_PDEATHSIG = 1


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has been signalled (collective)."""
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)

    def mark_stopped(self) -> None:
        """Tell launchers/torchrun.py that this rank stopped cleanly after a signal (it exits 0 then)."""
        folder = os.environ.get("LLMTRAIN_STOP_DIR")
        if folder and "RANK" in os.environ:
            (Path(folder) / f"rank{os.environ['RANK']}").write_text(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def launcher_chain(pid: int | None = None) -> list[tuple[int, str | None]]:
    """(pid, start time) of the launcher processes above this one: the consecutive ancestors whose
    command line starts a launcher (torchrun; deepspeed's runner and its launch.py; accelerate)."""
    from llmtrain.train.runlock import process_start

    chain, pid = [], _ppid(pid or os.getpid())
    while pid > 1:
        argv = [Path(a).name for a in _cmdline(pid)[:5]]
        if not LAUNCHERS.intersection(argv):
            break
        chain.append((pid, process_start(pid)))
        pid = _ppid(pid)
    return chain


def watch_launcher(poll_s: float = 1.0) -> list[tuple[int, str | None]]:
    """Stop this rank when its launcher dies (see the module docstring). Returns the watched chain."""
    chain = launcher_chain() if sys.platform == "linux" else []
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
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == start


def _watch(chain: list[tuple[int, str | None]], poll_s: float) -> None:
    while True:
        gone = [pid for pid, start in chain if not _running(pid, start)]
        if gone or os.getppid() != chain[0][0]:
            break
        time.sleep(poll_s)
    print(f"llmtrain: launcher process {(gone or [chain[0][0]])[0]} is gone; rank {os.environ.get('RANK')} "
          f"stops (stop checkpoint if training, else exit)", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_S)
    os._exit(1)
