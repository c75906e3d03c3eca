#!/usr/bin/env bash
# A real 2-node Slurm cluster on loopback for tests and demos (Debian's slurm-wlm):
# slurmctld and two slurmd (nodes n1, n2) on this host, auth/none, state and logs under
# $ALIGNFLOW_SLURM_DIR (default .alignflow/slurm).
#   scripts/slurm_cluster.sh install   installs slurm-wlm when missing (apt-get; sudo if not root)
#   scripts/slurm_cluster.sh up        install, write slurm.conf (free ports), start, wait for n[1-2] idle
#   scripts/slurm_cluster.sh down      cancels every job, stops the daemons
#   scripts/slurm_cluster.sh env       prints the variable that points sbatch/squeue at it (SLURM_CONF)
# Not for a real cluster: no authentication, and both "nodes" share this host's CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${ALIGNFLOW_SLURM_DIR:-$(pwd)/.alignflow/slurm}
CONF=$DIR/slurm.conf
NODES=(n1 n2)

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q --no-install-recommends slurm-wlm >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends slurm-wlm >/dev/null; }
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  local user cpus
  user=$(id -un)
  cpus=$(nproc)
  mkdir -p "$DIR/state" "$DIR/spool"
  cat >"$CONF" <<EOF
ClusterName=alignflow-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/none
CredType=cred/none
# no cgroups inside containers
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the emulated nodes claim this host's CPUs each
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
JobCompType=jobcomp/none
# a cancelled job's processes get SIGKILL 5 s after SIGTERM (default 30)
KillWait=5
SlurmdTimeout=30
MinJobAge=300
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  install
  export SLURM_CONF=$CONF
  if alive "$DIR/slurmctld.pid" && sinfo -h >/dev/null 2>&1; then
    echo "slurm cluster already up ($CONF)"; return 0
  fi
  down >/dev/null 2>&1 || true
  write_conf
  slurmctld -c -f "$CONF"  # -c: a fresh cluster, no jobs recovered from an earlier one
  for n in "${NODES[@]}"; do slurmd -f "$CONF" -N "$n"; done
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" = "${#NODES[@]}" ]; then
      echo "slurm cluster up: nodes ${NODES[*]} idle (SLURM_CONF=$CONF)"; return 0
    fi
    sleep 0.5
  done
  echo "slurm cluster did not come up; logs in $DIR" >&2
  sinfo -N >&2 || true
  tail -n 20 "$DIR"/slurm*.log >&2 || true
  return 1
}

down() {
  export SLURM_CONF=$CONF
  if alive "$DIR/slurmctld.pid"; then scancel --user "$(id -un)" 2>/dev/null || true; sleep 1; fi
  for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
    alive "$pidfile" || { rm -f "$pidfile"; continue; }
    local pid; pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  echo "slurm cluster down"
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|up|down|env" >&2; exit 2 ;;
esac
