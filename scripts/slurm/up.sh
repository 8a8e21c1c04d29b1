#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (CI and local checks).
#
#   source <(bash scripts/slurm/up.sh STATE_DIR)    # prints `export SLURM_CONF=...`
#   bash scripts/slurm/down.sh STATE_DIR            # stops what up.sh started
#
# Everything lives in STATE_DIR: munge key and socket, slurm.conf, spool and state
# directories, logs, and the process ids of the three daemons (munged, slurmctld, slurmd),
# which are started in the foreground mode (-F / -D) in the background of this shell, so no
# systemd is needed.  Needs root (slurmd runs jobs as their submitting user) and the Debian
# packages slurm-wlm and munge (scripts/slurm/test.sh installs them when missing).
set -euo pipefail

STATE=${1:?usage: up.sh STATE_DIR}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
chmod 700 "$STATE"
mkdir -p "$STATE"/{munge,ctld,spool,log}

for exe in munged slurmctld slurmd sinfo scontrol; do
    command -v "$exe" >/dev/null || { echo "up.sh: $exe not found (apt-get install -y slurm-wlm munge)" >&2; exit 1; }
done

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
MEM_MB=$((MEM_MB * 9 / 10))   # leave some room for the daemons and the test driver
# two free TCP ports for slurmctld and slurmd (6817/6818 unless taken, e.g. by a real Slurm)
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT_BASE=${RLD_SLURM_PORT_BASE:-6817}
while ! { port_free "$PORT_BASE" && port_free $((PORT_BASE + 1)); }; do PORT_BASE=$((PORT_BASE + 2)); done
USER_NAME=$(id -un)

# --- munge: own key and socket, so nothing in /etc or /run is touched ----------------------
KEY="$STATE/munge/munge.key"
[ -f "$KEY" ] || { head -c 1024 /dev/urandom > "$KEY"; chmod 400 "$KEY"; }
SOCKET="$STATE/munge/munge.socket"
munged -F --force --key-file="$KEY" --socket="$SOCKET" \
    --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed" \
    --log-file="$STATE/log/munged.log" > "$STATE/log/munged.out" 2>&1 &
echo $! > "$STATE/munged.pid.started"
for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.2; done
[ -S "$SOCKET" ] || { echo "up.sh: munged did not start, see $STATE/log" >&2; exit 1; }

# --- slurm.conf ------------------------------------------------------------------------------
cat > "$STATE/slurm.conf" <<CONF
ClusterName=rldci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=$USER_NAME
SlurmdUser=root
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=5
MinJobAge=300
SchedulerParameters=sched_interval=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF="$STATE/slurm.conf"

slurmctld -D -i -f "$SLURM_CONF" > "$STATE/log/slurmctld.out" 2>&1 &
echo $! > "$STATE/slurmctld.pid.started"
slurmd -D -N "$HOST" -f "$SLURM_CONF" > "$STATE/log/slurmd.out" 2>&1 &
echo $! > "$STATE/slurmd.pid.started"

# wait until the node takes jobs
for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$HOST" -o %t 2>/dev/null || true)
    case "$state" in idle*|mix*|alloc*) break ;; esac
    sleep 1
done
state=$(sinfo -h -N -n "$HOST" -o %t 2>/dev/null || true)
case "$state" in
    idle*|mix*|alloc*) ;;
    *) echo "up.sh: node $HOST not ready (state '$state'); logs in $STATE/log" >&2
       tail -n 20 "$STATE"/log/*.log >&2 || true
       exit 1 ;;
esac
echo "export SLURM_CONF=$SLURM_CONF"
