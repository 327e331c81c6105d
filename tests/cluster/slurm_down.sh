#!/usr/bin/env bash
# Stop the two-node SLURM cluster started by slurm_up.sh and remove its network namespaces.
# Idempotent. Jobs still in the queue are cancelled. munged is stopped only if slurm_up.sh started
# it (and not with --keep-munge). Logs and state stay in $LLMTRAIN_SLURM_DIR unless --purge is given.
set -uo pipefail

purge=0 keep_munge=0
for arg in "$@"; do
    case $arg in
        --purge) purge=1 ;;
        --keep-munge) keep_munge=1 ;;
        *) echo "usage: $0 [--purge] [--keep-munge]" >&2; exit 2 ;;
    esac
done

DIR=${LLMTRAIN_SLURM_DIR:-/var/tmp/llmtrain-slurm}
BRIDGE=llmslurm0
NAMESPACES=(llmslurm-n1 llmslurm-n2)
export SLURM_CONF=$DIR/slurm.conf

[[ $(id -u) == 0 ]] || { echo "slurm_down: must run as root" >&2; exit 1; }

any_alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

stop_daemons() {  # TERM every daemon named by a pid file in $@, SIGKILL what is left after 10 s
    local f pid pids=()
    for f in "$@"; do
        [[ -f $f ]] || continue
        pid=$(cat "$f")
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$f"
    done
    for _ in $(seq 100); do
        any_alive "${pids[@]}" || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    return 0
}

# Cancel jobs first so their processes end cleanly while the daemons still run.
if [[ -f $DIR/run/slurmctld.pid ]] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 30); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
    fi
fi

stop_daemons "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"

# Whatever is left inside the node namespaces (job steps of a killed job) was started by the cluster.
for ns in "${NAMESPACES[@]}"; do
    if ip netns list | grep -qw "$ns"; then
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        # shellcheck disable=SC2086
        [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
        ip netns del "$ns"
    fi
    ip link del "v-$ns" 2>/dev/null   # usually gone with its namespace already
done
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"

if [[ $keep_munge == 0 && -f $DIR/run/munged.ours ]]; then
    pid=$(cat /run/munge/munged.pid 2>/dev/null) && kill -TERM "$pid" 2>/dev/null
    rm -f "$DIR/run/munged.ours"
fi

[[ $purge == 1 ]] && rm -rf "$DIR"
echo "slurm_down: cluster stopped"
