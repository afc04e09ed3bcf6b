#!/usr/bin/env bash
# A two-node SLURM test cluster on this host, from Debian's slurm-wlm and munge:
# munged, slurmctld and two `slurmd -N` daemons (node1, node2; names resolved to 127.0.0.1),
# proctrack/linuxproc, no cgroups, no accounting.
#
#   tests/slurm_cluster.sh start [DIR]   write DIR/slurm.conf, start the daemons, wait for idle nodes
#   tests/slurm_cluster.sh stop  [DIR]   stop them (state and logs stay in DIR)
#
# DIR defaults to $SLURM_CLUSTER_DIR or /tmp/diffusion-dist-slurm. Clients (sbatch, squeue,
# scontrol) need SLURM_CONF=DIR/slurm.conf. Needs root: slurmd starts jobs as their users, and
# node names go into /etc/hosts.
set -euo pipefail

action=${1:?usage: $0 start|stop [DIR]}
dir=$(realpath -m "${2:-${SLURM_CLUSTER_DIR:-/tmp/diffusion-dist-slurm}}")
conf=$dir/slurm.conf
nodes=(node1 node2)

die() { echo "slurm_cluster: $*" >&2; exit 2; }

stop() {
    for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

if [[ $action == stop ]]; then
    stop
    exit 0
fi
[[ $action == start ]] || die "unknown action '$action' (start or stop)"
[[ $(id -u) == 0 ]] || die "needs root (slurmd launches jobs as their users; node names go into /etc/hosts)"
for program in munged slurmctld slurmd sbatch; do
    command -v "$program" >/dev/null || die "$program not found: apt-get install slurm-wlm munge"
done

stop  # leftovers of an earlier start in the same DIR
mkdir -p "$dir/state" "$dir/spool"

# Node names resolve to loopback: slurmd binds to them and the trainer's MASTER_ADDR is node1.
grep -qE "^127\.0\.0\.1\s.*\bnode1\b" /etc/hosts || echo "127.0.0.1 ${nodes[*]}" >> /etc/hosts

# munge authenticates every SLURM message; the package installs a key.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -f /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n </dev/null | unmunge >/dev/null || die "munged does not answer"
fi

# Ports away from the SLURM defaults, so a real installation on this host is left alone.
port=${SLURM_CLUSTER_PORT:-16817}
cpus=$(nproc)
host=$(hostname -s)
cat > "$conf" <<EOF
ClusterName=diffusion-dist-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again, until the
# credentials of its previous run have expired on the nodes; 10 s keeps requeue tests short.
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
InactiveLimit=0
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=$cpus State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF=$conf
slurmctld -f "$conf"
for node in "${nodes[@]}"; do
    slurmd -N "$node" -f "$conf"
done
sleep 1
for daemon in slurmctld "${nodes[@]/#/slurmd-}"; do  # a daemon that could not bind its port has exited
    pidfile=$dir/$daemon.pid
    [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null \
        || die "$daemon is not running (port $port+ taken by another cluster?); see $dir/$daemon.log"
done
for _ in $(seq 120); do
    states=$(sinfo -h -N -o "%N %T" 2>/dev/null | sort -u | awk '{print $2}' | sort -u | tr '\n' ' ')
    [[ $states == "idle " ]] && { echo "SLURM_CONF=$conf"; exit 0; }
    sleep 0.5
done
sinfo -N >&2 || true
tail -n 20 "$dir"/slurmctld.log "$dir"/slurmd-*.log >&2 || true
die "nodes did not become idle (states: ${states:-none}); logs in $dir"
