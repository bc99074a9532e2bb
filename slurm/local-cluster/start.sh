#!/usr/bin/env bash
# A one-node SLURM cluster on localhost (Debian slurm-wlm + munge) for tests and trials.
# Idempotent: installs what is missing, (re)writes the config, starts munged, slurmctld and slurmd
# as root unless they already answer, and waits until the node is idle.  Stop with stop.sh.
# No systemd, no cgroups, no accounting database (Snakemake: slurm-status-command: squeue).
set -euo pipefail

PARTITION="${DCM_SLURM_PARTITION:-gpu}"   # the slurm profile's default partition
STATE=/var/lib/dcm-slurm                  # spool, state and logs of this cluster
CONF_DIR=/etc/slurm

if [ "$(id -u)" -ne 0 ]; then
  echo "error: start.sh must run as root (it starts munged, slurmctld and slurmd)" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurm-wlm and munge ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: one key, owned by the munge user
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# slurm.conf: this node's CPUs and memory (minus 1 GiB headroom)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log"
cat > "$CONF_DIR/slurm.conf.new" <<CONF
# written by dcm slurm/local-cluster/start.sh
ClusterName=dcm-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=300
MpiDefault=none
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
changed=0
if ! cmp -s "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf" 2>/dev/null; then
  mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
  changed=1
else
  rm -f "$CONF_DIR/slurm.conf.new"
fi

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$changed" = 1 ]; then   # a new config: restart what runs with the old one
  for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    running "$pid" && kill "$(cat "$pid")" && sleep 1
  done
fi
running "$STATE/slurmctld.pid" || /usr/sbin/slurmctld
running "$STATE/slurmd.pid" || /usr/sbin/slurmd

for _ in $(seq 60); do
  state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -1 || true)
case "$state" in
  idle|mixed|allocated) ;;
  *) echo "error: node localhost is '${state:-unreachable}', not idle; see $STATE/log/" >&2; exit 1 ;;
esac

cat <<USAGE
local SLURM cluster up: partition '$PARTITION', node localhost ($CPUS CPUs, ${MEM_MB} MB, no GPUs)
  sinfo; squeue                             # state
  sbatch -p $PARTITION --wrap 'hostname'    # a job
  # this node has no GPUs: point both launchers at a resources file with gpus: 0
  export DCM_SLURM_RESOURCES=/path/to/resources-cpu.yaml
  dcm launch prepare            # with launcher: slurm in params.yaml (submitit job)
  snakemake --profile workflow/profiles/slurm --default-resources slurm_partition=$PARTITION gres=none
  stop: slurm/local-cluster/stop.sh;  logs: $STATE/log/
USAGE
