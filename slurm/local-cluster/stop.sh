#!/usr/bin/env bash
# Stop the local SLURM cluster started by start.sh (slurmd, slurmctld, munged).  Idempotent.
set -uo pipefail
STATE=/var/lib/dcm-slurm
stop() {  # pidfile
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$1"
}
stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
stop /run/munge/munged.pid
echo "local SLURM cluster stopped"
