"""`accelerate launch`, except that a SIGTERM / SIGINT its ranks answered with a stop checkpoint ends in exit 0.

    python launchers/accelerate_run.py --multi_gpu --num_processes 2 launchers/train.py recipes/gpt_debug.yaml ...

Same arguments as `accelerate launch` (it runs accelerate's launch command in this process). Why it exists:
for a multi-process launch accelerate runs torchrun underneath, which on SIGTERM or SIGINT passes the
signal to the ranks, waits for them and re-raises it; accelerate turns that into exit 128 + the signal
(143 for SIGTERM), even when every rank wrote its stop checkpoint and exited 0, so schedulers report a
clean preemption as a failure. Here each rank that stopped cleanly after a signal leaves a mark in
LLMTRAIN_STOP_DIR (llmtrain/train/preemption.py, as for launchers/torchrun.py); when all of this node's
ranks did, the launcher exits 0. Anything else keeps accelerate's own exit and output.
"""

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

_STOP_EXITS = {128 + signal.SIGTERM: signal.SIGTERM, 128 + signal.SIGINT: signal.SIGINT}


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    from llmtrain.train.preemption import node_stopped, stop_marks

    args = launch_command_parser().parse_args(argv)
    with stop_marks() as marks:
        try:
            launch_command(args)
        except SystemExit as exc:
            sig = _STOP_EXITS.get(exc.code) if isinstance(exc.code, int) else None
            ranks = node_stopped(marks)
            if sig is None or not ranks:
                raise
            print(
                f"[launchers/accelerate_run.py] {sig.name}: all {ranks} ranks of this node wrote their stop "
                f"checkpoint and exited 0",
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
