"""The `deepspeed` runner, except that a SIGTERM / SIGINT sent to it reaches the ranks and it exits with their status.

    python launchers/deepspeed_run.py --num_gpus 2 launchers/train.py recipes/gpt_debug.yaml ...

Same arguments as `deepspeed` (it runs deepspeed.launcher.runner in this process). Why it exists: for a run
on this host the runner installs no signal handler, so SIGTERM kills it (exit 143) and its child launch.py
never hears of it (the ranks notice their launcher is gone and write a stop checkpoint, but the job's
exit status is 143); Ctrl-C prints a KeyboardInterrupt traceback. Here the signal goes straight to the
ranks (the runner's grandchildren: not to launch.py, which would SIGKILL them after 30 s and exit 1);
they write their stop checkpoint and exit 0, launch.py exits 0, and so does this launcher. (A terminal's
Ctrl-C also reaches launch.py itself, which then exits 1 after the ranks stopped.)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install


def _children(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(p.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _to_ranks(signum: int, frame) -> None:
    for launch in _children(os.getpid()):
        for rank in _children(launch):
            try:
                os.kill(rank, signum)
            except ProcessLookupError:
                pass
    print(
        f"[launchers/deepspeed_run.py] {signal.Signals(signum).name}: passed to the ranks; they write a stop "
        f"checkpoint and exit",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str]) -> int:
    from deepspeed.launcher.runner import main as runner

    signal.signal(signal.SIGTERM, _to_ranks)
    signal.signal(signal.SIGINT, _to_ranks)
    runner(argv)  # exits with launch.py's status when it is not 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
