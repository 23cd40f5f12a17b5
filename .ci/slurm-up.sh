#!/usr/bin/env bash
# A single-node SLURM for the cohort tests: `.ci/slurm-up.sh STATE_DIR` writes
# STATE_DIR/slurm.conf, starts munged (unless one answers already), slurmctld and slurmd in the
# background, waits until the node is idle and prints the slurm.conf path. Clients (sbatch,
# squeue, scancel, dask-jobqueue) find it through SLURM_CONF. `.ci/slurm-up.sh --down STATE_DIR`
# stops the slurmctld and slurmd it started (munged is left running: others may use it).
#
# Known to work on Debian 12 as root without systemd or cgroups: `apt-get install slurm-wlm
# munge` (which creates the munge key). Exit code 3 with one line on stderr when this machine
# cannot run it (not root, not installed, a daemon that does not come up).
set -euo pipefail

die() { echo "slurm-up: $*" >&2; exit 3; }

if [[ "${1:-}" == "--down" ]]; then
  state="${2:?usage: slurm-up.sh --down STATE_DIR}"
  for name in slurmd slurmctld; do
    if [[ -s "$state/$name.pid" ]]; then kill "$(cat "$state/$name.pid")" 2>/dev/null || true; fi
  done
  exit 0
fi

state="$(realpath -m "${1:?usage: slurm-up.sh STATE_DIR}")"
[[ "$(id -u)" == 0 ]] || die "needs root (slurmd runs jobs as their users)"
for exe in munged slurmctld slurmd sinfo; do
  command -v "$exe" >/dev/null || die "$exe not installed (apt-get install slurm-wlm munge)"
done
mkdir -p "$state/spool" "$state/ctld"

# munged, as the munge user, with its socket folder owned by munge.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- munged || die "munged did not start"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null 2>&1 || die "munged does not answer"
fi

# Two free TCP ports for slurmctld and slurmd (others may run a SLURM on this machine).
read -r ctld_port slurmd_port < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
host="$(hostname -s)"
total_mb="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
cat > "$state/slurm.conf" <<EOF
ClusterName=wsiproto-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pidfile
SlurmdPidFile=$state/slurmd.pidfile
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=$((total_mb / 2)) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$state/slurm.conf"

slurmctld -D -f "$SLURM_CONF" >"$state/slurmctld.out" 2>&1 &
echo $! > "$state/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" >"$state/slurmd.out" 2>&1 &
echo $! > "$state/slurmd.pid"

for _ in $(seq 150); do
  if [[ "$(sinfo -h -N -o %t 2>/dev/null)" == idle* ]]; then
    echo "$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
"$0" --down "$state"
die "the node did not become idle in 30 s; see $state/slurmctld.log and $state/slurmd.log"
