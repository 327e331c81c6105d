"""Graceful stop on SIGTERM / SIGINT / SIGUSR1, and ranks that do not outlive their launcher.

SIGTERM (SLURM preemption, `scancel`, `kill`), SIGUSR1 (`#SBATCH --signal`) and SIGINT (Ctrl-C, which a
terminal sends to the launcher and every rank) all mean "checkpoint and stop": the handler only sets a
flag; at each step the ranks agree (an all-reduce of a flag: the step's own finiteness check carries it
where the runner has one, else `agreed`) so that all of them checkpoint at the same step and exit 0
together; a rank that got no signal still stops. A second Ctrl-C
interrupts at once.

A rank also stops when its launcher dies (llmtrain/train/orphan.py): it sends itself SIGTERM, which
during training is the stop above.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from llmtrain.train.orphan import watch_launcher  # noqa: F401  (the trainer starts it with the stop handling)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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

    @property
    def requested(self) -> bool:
        """This rank was signalled (not a collective; see `agreed`)."""
        return self.signum is not None

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
        """Tell the launchers/ wrappers that this rank stopped cleanly after a signal (they exit 0 then)."""
        folder = os.environ.get("LLMTRAIN_STOP_DIR")
        if folder and "RANK" in os.environ:
            (Path(folder) / f"rank{os.environ['RANK']}").write_text(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@contextmanager
def stop_marks() -> Iterator[Path]:
    """A folder, for a launcher wrapper's lifetime, where its ranks leave their mark_stopped() marks."""
    with tempfile.TemporaryDirectory(prefix="llmtrain-stop-") as marks:
        os.environ["LLMTRAIN_STOP_DIR"] = marks
        yield Path(marks)


def node_stopped(marks: Path) -> int:
    """The number of this node's ranks when every one of them stopped cleanly after a signal, else 0."""
    stopped = sorted(marks.glob("rank*"))
    expected = {int(p.read_text() or 0) for p in stopped}
    return len(stopped) if stopped and expected == {len(stopped)} else 0
