#!/usr/bin/env bash
# Start a real two-node SLURM cluster on this one host (root only; Debian/Ubuntu).
#
# Layout (all private to this script, nothing in /etc/slurm is touched):
#   host network namespace : munged, slurmctld on the bridge address 10.89.0.1 ("llmctl")
#   netns llmslurm-n1      : slurmd for node "llmnode1" at 10.89.0.11, its own hostname (UTS ns)
#   netns llmslurm-n2      : slurmd for node "llmnode2" at 10.89.0.12, its own hostname (UTS ns)
# The nodes reach each other and the controller through a bridge (llmslurm0), and nothing else (no
# route out: like many compute nodes, they have no internet). Each node sees $LLMTRAIN_SLURM_DIR/hosts
# bind-mounted on /etc/hosts in its own mount namespace, so the node names in $SLURM_JOB_NODELIST
# resolve inside jobs as on a real cluster; the host's /etc is not changed. Each slurmd has its own
# spool, pid and log files under $LLMTRAIN_SLURM_DIR. Jobs run as the submitting user (root here).
#
# Idempotent: what is already running is left alone; the script ends when `sinfo` shows both
# nodes idle. Usage:
#   bash tests/cluster/slurm_up.sh          # then: export SLURM_CONF=/var/tmp/llmtrain-slurm/slurm.conf
#   bash tests/cluster/slurm_down.sh        # stop everything and remove the namespaces
# Environment: LLMTRAIN_SLURM_DIR (state dir, default /var/tmp/llmtrain-slurm),
#   LLMTRAIN_SLURM_CPUS (CPUs per node, default: this host's core count),
#   LLMTRAIN_SLURM_NO_INSTALL=1 (fail instead of running apt-get when slurm/munge are missing).
set -euo pipefail

DIR=${LLMTRAIN_SLURM_DIR:-/var/tmp/llmtrain-slurm}
CPUS=${LLMTRAIN_SLURM_CPUS:-$(nproc)}
NET=10.89.0
BRIDGE=llmslurm0
NODES=(llmnode1 llmnode2)
ADDRS=("$NET.11" "$NET.12")
CONF=$DIR/slurm.conf
t0=$EPOCHREALTIME

say() { awk -v a="$EPOCHREALTIME" -v b="$t0" -v m="$*" 'BEGIN { printf "[slurm_up %5.1fs] %s\n", a - b, m }'; }
die() { echo "slurm_up: ERROR: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (starts daemons, creates network namespaces)"

install_packages() {
    local missing=()
    for bin in slurmctld slurmd munged ip; do command -v "$bin" >/dev/null || missing+=("$bin"); done
    [[ ${#missing[@]} == 0 ]] && return 0
    [[ ${LLMTRAIN_SLURM_NO_INSTALL:-0} == 1 ]] && die "missing ${missing[*]} and LLMTRAIN_SLURM_NO_INSTALL=1"
    echo "slurm_up: installing slurm-wlm munge iproute2 (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 procps >/dev/null
}

start_munge() {
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        touch "$DIR/run/munged.ours"
        for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
        munge -n </dev/null | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
    fi
}

setup_network() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$NET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    ip link set lo up
    {
        echo "127.0.0.1 localhost"
        echo "$NET.1 llmctl"
        echo "${ADDRS[0]} ${NODES[0]}"
        echo "${ADDRS[1]} ${NODES[1]}"
    } >"$DIR/hosts"
    local i ns
    for i in 0 1; do
        ns=llmslurm-n$((i + 1))
        ip netns list | grep -qw "$ns" || ip netns add "$ns"
        if ! ip link show "v-$ns" >/dev/null 2>&1; then
            ip link add "v-$ns" type veth peer name eth0 netns "$ns"
            ip link set "v-$ns" master "$BRIDGE" up
            ip -n "$ns" addr add "${ADDRS[i]}/24" dev eth0
        fi
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
}

write_conf() {
    cat >"$CONF.new" <<EOF
# Written by tests/cluster/slurm_up.sh: two slurmd "nodes" in network namespaces on one host.
ClusterName=llmtrain
SlurmctldHost=llmctl($NET.1)
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups: two slurmd share this kernel's cgroup tree, and the sandbox may not delegate it.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
# A requeued job may start again once its credential expired (default 120 s): keep tests quick.
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=2
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=60
MessageTimeout=20
KillWait=10
MinJobAge=3600
InactiveLimit=0
NodeName=${NODES[0]} NodeAddr=${ADDRS[0]} CPUs=$CPUS RealMemory=1000 State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=${ADDRS[1]} CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.new"; then rm "$CONF.new"; return 0; fi
    # A changed configuration: the daemons running the old one must go.
    if alive "$DIR/run/slurmctld.pid" || compgen -G "$DIR/run/slurmd-*.pid" >/dev/null; then
        say "configuration changed: restarting the cluster"
        bash "$(dirname "$0")/slurm_down.sh" --keep-munge
    fi
    mv "$CONF.new" "$CONF"
}

alive() {  # the pid file $1 names a running slurm daemon (not a pid reused after a crash)
    local pid
    [[ -f $1 ]] && pid=$(cat "$1") && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurm* ]]
}

start_daemons() {
    export SLURM_CONF=$CONF
    if ! alive "$DIR/run/slurmctld.pid"; then
        # slurmctld only runs where gethostname() is SlurmctldHost: give it its own UTS namespace.
        # -i: ignore state left by an earlier run whose config may differ.
        unshare --uts /bin/sh -c "hostname llmctl && exec slurmctld -f '$CONF' -i"
    fi
    local i ns
    for i in 0 1; do
        ns=llmslurm-n$((i + 1))
        mkdir -p "$DIR/spool/${NODES[i]}"
        alive "$DIR/run/slurmd-${NODES[i]}.pid" && continue
        # Own network, UTS and mount namespaces: gethostname() is the node name and /etc/hosts
        # names every node, so slurmd, srun and torch/gloo inside jobs see what they would see on
        # a real node. (Not `ip netns exec`: it remounts /sys, hiding the cgroup mounts slurmd
        # 22.05 insists on reading even with proctrack/linuxproc.)
        nsenter --net="/run/netns/$ns" unshare --uts --mount /bin/sh -c \
            "mount --bind '$DIR/hosts' /etc/hosts && hostname ${NODES[i]} && exec slurmd -f '$CONF' -N ${NODES[i]}"
    done
}

wait_idle() {
    local out=""
    for _ in $(seq 120); do
        out=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
        if [[ $(grep -cE '^llmnode[12] idle$' <<<"$out") == 2 ]]; then return 0; fi
        # A node left drained by an earlier run does not return by itself: resume it.
        grep -qE 'drain|down' <<<"$out" && scontrol update nodename=llmnode[1-2] state=resume 2>/dev/null || true
        sleep 0.5
    done
    echo "$out" >&2
    tail -n 20 "$DIR"/log/*.log >&2 || true
    die "nodes not idle after 60 s (sinfo above, logs in $DIR/log)"
}

install_packages
mkdir -p "$DIR"/{ctld,spool,run,log}
say "packages present"
start_munge
say "munged up"
write_conf
setup_network
say "network: bridge $BRIDGE $NET.1, nodes ${ADDRS[*]}"
start_daemons
wait_idle
say "cluster up: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')"
cat <<EOF
SLURM is up. Use it with:
    export SLURM_CONF=$CONF
    sinfo; sbatch --nodes 2 launchers/slurm/train.sbatch recipes/gpt_debug.yaml
Logs: $DIR/log   Tear down: bash $(dirname "$0")/slurm_down.sh
EOF
