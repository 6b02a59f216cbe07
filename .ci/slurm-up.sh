#!/usr/bin/env bash
# CI: bring up a one-node SLURM cluster on this machine (munge + slurmdbd + slurmctld +
# slurmd, started directly: no systemd). Idempotent: a second run only checks, prints `sinfo`.
#   bash .ci/slurm-up.sh
# State, spool, logs and pid files live under $SLURM_DIR (default /var/tmp/slurm).
# Accounting (sacct) goes through slurmdbd into the local MariaDB (127.0.0.1:3306, root, no
# password; database slurm_acct_db). submitit reads job states only from `sacct`: without it
# job.state stays "UNKNOWN" and a killed job's job.done()/job.result() never return.
# SLURM_ACCOUNTING=none skips slurmdbd (sacct then says "Slurm accounting storage is disabled").
set -euo pipefail

SLURM_DIR=${SLURM_DIR:-/var/tmp/slurm}
ACCOUNTING=${SLURM_ACCOUNTING:-slurmdbd}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
NODE=$(hostname -s)
DB=(mysql -uroot -h127.0.0.1 -P3306)

die() {
  echo "slurm-up: ERROR: $*" >&2
  for f in "$SLURM_DIR"/log/slurmdbd.log "$SLURM_DIR"/log/slurmctld.log "$SLURM_DIR"/log/slurmd.log; do
    if [[ -f $f ]]; then echo "--- tail $f" >&2; tail -n 8 "$f" >&2; fi
  done
  exit 1
}
trap 'die "unexpected failure (line $LINENO: $BASH_COMMAND)"' ERR
running() {  # a live (not zombie) process with this exact name
  local pid
  for pid in $(pgrep -x "$1"); do
    [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" == Z* ]] || return 0
  done
  return 1
}
stop() {  # stop a daemon we started, by the pid in its pid file
  local pidf=$SLURM_DIR/run/$1.pid
  running "$1" || return 0
  [[ -s $pidf ]] && kill "$(cat "$pidf")" 2>/dev/null || true
  for _ in $(seq 20); do running "$1" || return 0; sleep 0.5; done
  die "$1 (pid file $pidf) did not stop for the restart"
}
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
    --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -qq -o DPkg::Lock::Timeout=600 >/dev/null 2>&1 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
              --no-install-recommends "$@" >/dev/null; } \
    || die "apt-get install $* failed"
}

# 1. Packages (Debian bookworm: SLURM 22.05 + munge).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm-up: installing slurmctld slurmd slurm-client munge"
  apt_install slurmctld slurmd slurm-client munge
fi
if [[ $ACCOUNTING == slurmdbd ]] && ! command -v slurmdbd >/dev/null; then
  echo "slurm-up: installing slurmdbd"
  apt_install slurmdbd
fi

# 2. Munge: key + daemon.
if [[ ! -s /etc/munge/munge.key ]]; then
  install -d -o munge -g munge -m 700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- munged --force 2>/dev/null || munged --force \
    || die "munged failed to start (see /var/log/munge/munged.log)"
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  munge -n | unmunge >/dev/null 2>&1 || die "munge credential round-trip (munge -n | unmunge) fails"
fi
install -d -m 755 "$SLURM_DIR"/{state,spool,log,run} /etc/slurm

# 3. slurmdbd on the local MariaDB (job accounting for sacct, which submitit polls).
if [[ $ACCOUNTING == slurmdbd ]]; then
  command -v mysql >/dev/null || die "slurmdbd needs MariaDB at 127.0.0.1:3306 (no mysql client); or set SLURM_ACCOUNTING=none"
  if ! "${DB[@]}" -e 'select 1' >/dev/null 2>&1 && [[ -x /etc/init.d/mariadb ]]; then
    /etc/init.d/mariadb start >/dev/null 2>&1 || true
    for _ in $(seq 30); do "${DB[@]}" -e 'select 1' >/dev/null 2>&1 && break; sleep 1; done
  fi
  "${DB[@]}" -e 'select 1' >/dev/null 2>&1 \
    || die "MariaDB at 127.0.0.1:3306 (root, empty password) unreachable; slurmdbd needs it (or set SLURM_ACCOUNTING=none)"
  new_dbd="# Written by .ci/slurm-up.sh
AuthType=auth/munge
DbdHost=$NODE
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=root
StorageLoc=slurm_acct_db
LogFile=$SLURM_DIR/log/slurmdbd.log
PidFile=$SLURM_DIR/run/slurmdbd.pid"
  if [[ "$(cat "$DBD_CONF" 2>/dev/null)" != "$new_dbd" ]]; then
    printf '%s\n' "$new_dbd" >"$DBD_CONF"
    stop slurmdbd
  fi
  chmod 600 "$DBD_CONF"
  running slurmdbd || slurmdbd || die "slurmdbd failed to start"
  for _ in $(seq 30); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 1; done
  (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null || die "slurmdbd is not listening on port 6819"
  acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
AccountingStoragePort=6819"
else
  acct_lines="AccountingStorageType=accounting_storage/none"
fi

# 4. slurm.conf (rewritten only when its content changes; then slurmctld/slurmd restart).
mem_avail_mb=$(awk '/^MemAvailable:/ {print int($2/1024)}' /proc/meminfo)
real_mem=$(( mem_avail_mb * 85 / 100 / 1024 * 1024 ))   # ~85% of free, whole GiB: stable across runs
(( real_mem >= 1024 )) || real_mem=$(( mem_avail_mb * 85 / 100 ))
new_conf="# Written by .ci/slurm-up.sh: one-node CI cluster.
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldPidFile=$SLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$acct_lines
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE CPUs=$(nproc) RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
old_conf=$(cat "$CONF" 2>/dev/null || true)
# A RealMemory that differs only because free memory drifted is kept as it is.
strip_mem() { sed -E 's/ RealMemory=[0-9]+ / RealMemory=X /'; }
if [[ "$(strip_mem <<<"$old_conf")" != "$(strip_mem <<<"$new_conf")" ]]; then
  printf '%s\n' "$new_conf" >"$CONF"
  if running slurmctld || running slurmd; then echo "slurm-up: slurm.conf changed, restarting"; fi
  stop slurmd
  stop slurmctld
fi

# 5. Daemons (they daemonize themselves).
running slurmctld || slurmctld || die "slurmctld failed to start"
running slurmd || slurmd || die "slurmd failed to start"

# 6. Wait for the node to be usable.
state=""
for _ in $(seq 60); do
  state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1 || true)
  case $state in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  running slurmctld || die "slurmctld exited (node state: ${state:-none})"
  running slurmd || die "slurmd exited (node state: ${state:-none})"
  sleep 1
done
case $state in
  idle|mixed|allocated|completing) ;;
  *) die "node $NODE not ready after 60 s (sinfo state: '${state:-none}')" ;;
esac
if [[ $ACCOUNTING == slurmdbd ]]; then
  for _ in $(seq 30); do sacct -n -X -S now >/dev/null 2>&1 && break; sleep 1; done
  sacct -n -X -S now >/dev/null 2>&1 || die "sacct does not answer (slurmdbd not reachable?)"
fi
sinfo
