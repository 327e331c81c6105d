#!/usr/bin/env bash
# The per-node task of a multi-node run: starts this node's ranks with torchrun.
#
# run.sbatch starts exactly one copy per node (`srun --ntasks-per-node=1`); it can also be started
# by hand on each host of a cluster without SLURM (set NNODES and NODE_RANK yourself):
#
#   MASTER_ADDR=host0 MASTER_PORT=29500 NNODES=2 NODE_RANK=<0|1> LLMTRAIN_RUN_DIR=runs/x \
#       bash launchers/slurm/node.sh launchers/train.py recipes/gpt_debug.yaml out_dir=runs/x
#
# Environment (SLURM_* are set by srun; the others have defaults):
#   MASTER_ADDR, MASTER_PORT      rendezvous host (node rank 0) and TCP port          (required)
#   SLURM_NNODES | NNODES         number of nodes                                      (default 1)
#   SLURM_NODEID | NODE_RANK      this node's rank                                     (default 0)
#   LLMTRAIN_PROCS_PER_NODE       ranks on this node (default: SLURM_GPUS_ON_NODE, else 1)
#   LLMTRAIN_PYTHON               interpreter for the entry script                     (default python)
#   LLMTRAIN_RUN_DIR              rank output goes to $LLMTRAIN_RUN_DIR/logs/rank<R>.log (default .)
#   LLMTRAIN_SHUTDOWN_TIMEOUT     seconds torchrun gives ranks to checkpoint after a signal (100)
set -euo pipefail

: "${MASTER_ADDR:?MASTER_ADDR must name the host of node rank 0}"
: "${MASTER_PORT:?MASTER_PORT must be set}"
nnodes=${SLURM_NNODES:-${NNODES:-1}}
node_rank=${SLURM_NODEID:-${NODE_RANK:-0}}
nproc=${LLMTRAIN_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
python=${LLMTRAIN_PYTHON:-python}
launchers=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export LLMTRAIN_LOG_DIR=${LLMTRAIN_RUN_DIR:-.}/logs
mkdir -p "$LLMTRAIN_LOG_DIR"

echo "[node.sh] host=$(hostname) node_rank=$node_rank nnodes=$nnodes procs_per_node=$nproc" \
     "master=$MASTER_ADDR:$MASTER_PORT restart=${SLURM_RESTART_COUNT:-0} $(date -Is)"

# Preemption warning (SIGUSR1, sent by run.sbatch through `scancel --signal=USR1`): the ranks must
# get it and torchrun must not. torchrun would treat it as a death signal and exit non-zero after
# its ranks stopped cleanly, and srun --kill-on-bad-exit would then kill ranks still checkpointing
# on other nodes. So torchrun starts with SIGUSR1 ignored (the ranks inherit that until the trainer
# installs its handler) and this script passes the signal to torchrun's children, the ranks. With
# proctrack/cgroup or linuxproc SLURM also signals every rank itself: the trainer must treat a
# repeated signal as one. SIGTERM is forwarded to the ranks by torchrun itself, which then waits
# --shutdown_timeout seconds before SIGKILL. torchrun runs through launchers/torchrun.py: plain torchrun
# exits 1 after a SIGTERM even when every rank wrote its stop checkpoint and exited 0; the wrapper exits 0
# then, so a preempted or cancelled job step ends cleanly.
# Each rank's stdout+stderr is appended to logs/rank<RANK>.log (append: a requeued job adds to it).
(
    trap '' USR1
    exec "$python" "$launchers/torchrun.py" \
        --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --max_restarts 0 \
        --shutdown_timeout "${LLMTRAIN_SHUTDOWN_TIMEOUT:-100}" \
        --no-python bash -c 'exec "$@" >>"$LLMTRAIN_LOG_DIR/rank$RANK.log" 2>&1' rank-exec \
        "$python" "$@"
) &
torchrun_pid=$!
trap 'echo "[node.sh] SIGUSR1 $(date -Is): passing it to the ranks"; pkill -USR1 -P "$torchrun_pid"' USR1
# SLURM signals torchrun directly; a second SIGTERM would cut its graceful shutdown short.
trap 'echo "[node.sh] SIGTERM $(date -Is): torchrun stops the ranks"' TERM
# `wait` returns early (status > 128) when a trapped signal arrives: wait again while torchrun lives.
set +e
while kill -0 "$torchrun_pid" 2>/dev/null; do wait "$torchrun_pid"; done
wait "$torchrun_pid"
rc=$?
echo "[node.sh] torchrun exited $rc $(date -Is)"
exit "$rc"
