"""torchrun, except that a SIGTERM / SIGINT its ranks answered with a stop checkpoint ends in exit 0.

    python launchers/torchrun.py --nproc_per_node 2 launchers/train.py recipes/gpt_debug.yaml ...

Same arguments as `torchrun` (it runs torch.distributed.run in this process). Why it exists: on SIGTERM or
SIGINT, torchrun passes the signal to its ranks, waits for them (--shutdown_timeout), then re-raises the
signal as a SignalException, so it exits 1 with a traceback even when every rank wrote its stop
checkpoint and exited 0; schedulers then report a clean preemption as a failure. Here each rank that
stopped cleanly after a signal leaves a mark in LLMTRAIN_STOP_DIR (llmtrain/train/preemption.py); when
all of this node's ranks did, the launcher exits 0. Likewise, when the first rank to fail exited 2 (a
user error, which rank 0 printed as one line), it exits 2 without torchrun's ChildFailedError traceback.
Anything else keeps torchrun's own exit and output.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from llmtrain.train.preemption import node_stopped, stop_marks

    with stop_marks() as marks:
        try:
            torchrun(argv)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            if failure.exitcode != 2:
                raise
            # exit 2 is llmtrain's "error in the user's input", already printed as one line by rank 0;
            # torchrun's ChildFailedError report would bury it under a traceback
            print(f"[launchers/torchrun.py] rank {rank} exited 2 (the error above)", file=sys.stderr, flush=True)
            return 2
        except SignalException as exc:
            ranks = node_stopped(marks)
            if not ranks:
                raise
            print(
                f"[launchers/torchrun.py] {exc.sigval.name}: all {ranks} ranks of this node wrote their "
                f"stop checkpoint and exited 0",
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
