#!/usr/bin/env bash
# A real one-node SLURM on this machine (Debian slurm-wlm + munge), so that segx's
# hydra/launcher=submitit_slurm sweep can be tested without a cluster.
#
#   bash scripts/slurm-local.sh [start|stop|status]     (as root)
#
# start (default): installs slurm-wlm and munge if missing, creates a munge key if missing, writes
#   /etc/slurm/slurm.conf for this host, starts munged, slurmctld and slurmd directly (containers
#   have no systemd) and waits until the node is idle. Safe to run again: running daemons are kept
#   when the configuration did not change, restarted when it did. It also installs a small sacct
#   stand-in at /usr/local/bin/sacct (see install_sacct_shim: without it, a sweep whose job was
#   cancelled or killed waits forever).
# stop: stops the three daemons and removes the sacct stand-in.  status: prints sinfo.
#
# Logs: /var/log/munge/munged.log, /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET=/run/munge/munge.socket.2
READY_TIMEOUT_S=${SLURM_LOCAL_TIMEOUT_S:-60}

die() { echo "slurm-local: error: $*" >&2; exit 1; }
say() { echo "slurm-local: $*"; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts system daemons)"
}

# pid of a running daemon, by its pid file; empty when not running.
daemon_pid() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

stop_daemon() {
    local name=$1 pidfile=$2 pid
    pid=$(daemon_pid "$pidfile")
    [[ -n $pid ]] || { rm -f "$pidfile"; return 0; }
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; say "stopped $name (pid $pid)"; return 0; }
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    say "killed $name (pid $pid): it ignored SIGTERM for 10 s"
}

install_packages() {
    local missing=()
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null; then
        missing+=(slurm-wlm)
    fi
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    say "installing ${missing[*]} (apt-get)"
    # --no-install-recommends: slurm-wlm recommends dozens of plugin and -dev packages that a
    # one-node test cluster never uses; its dependencies (slurmctld, slurmd, slurm-client,
    # slurm-wlm-basic-plugins) are all it needs.
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >/tmp/slurm-local-apt.log 2>&1 \
        || die "apt-get install ${missing[*]} failed; read /tmp/slurm-local-apt.log"
}

setup_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        # One key shared by every node of the "cluster"; here the only node. munged refuses keys
        # that other users can read, hence the owner and mode.
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" >/dev/null 2>&1 \
                || die "mungekey could not create $MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
        say "created $MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
}

start_munge() {
    if [[ -n $(daemon_pid /run/munge/munged.pid) ]] && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    stop_daemon munged /run/munge/munged.pid
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # munged must run as the munge user (it refuses root without --force); runuser needs no PAM
    # session or password.
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        --log-file=/var/log/munge/munged.log \
        || die "munged did not start; read /var/log/munge/munged.log"
    for _ in $(seq 1 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && { say "munged is running"; return 0; }
        sleep 0.2
    done
    die "munged does not answer (munge -n | unmunge fails); read /var/log/munge/munged.log"
}

write_conf() {
    local host cpus mem_mb real_mb margin_mb tmp
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # Leave memory for the OS, the daemons and the submitting process; slurmd drains a node whose
    # configured RealMemory exceeds what it sees, so the margin also absorbs small fluctuations.
    margin_mb=$(( mem_mb / 10 > 1024 ? mem_mb / 10 : 1024 ))
    real_mb=$(( mem_mb - margin_mb ))
    (( real_mb >= 512 )) || die "only ${mem_mb} MB of memory; a SLURM node needs at least 1.5 GB"

    install -d -m 0755 "$CONF_DIR"
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by scripts/slurm-local.sh (segx): a one-node SLURM for testing the submitit launcher.
# Rerun the script after editing it; do not edit this file by hand.
ClusterName=segx-local
# Controller and compute node are this machine; 127.0.0.1 because the short hostname may not
# resolve to an interface address inside a container.
SlurmctldHost=${host}(127.0.0.1)
# The daemons run as root: a single-machine test cluster gains nothing from a separate user, and
# root avoids ownership problems on the state and spool directories.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s);
# 30 s keeps the preemption/requeue test short and still leaves a slow machine time to launch steps.
AuthInfo=cred_expire=30
CredType=cred/munge
MpiDefault=none
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
# Containers have no writable cgroup hierarchy for slurm: track job processes through /proc, bind no
# CPUs, and gather no accounting from cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd/MySQL: no accounting database (so sacct does not work; squeue/scontrol do).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Schedule single cores and memory, so that several 1-CPU jobs share the node (like a real cluster).
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that does not ask for memory would get the whole node and run alone.
DefMemPerCPU=1024
# Batch jobs may be requeued (submitit requeues itself with scontrol requeue on preemption/timeout).
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or times out: SLURM's
# default, what most clusters keep, and the time segx has to end the MLflow run KILLED.
KillWait=30
# A node that was down comes back as soon as slurmd registers with a valid configuration.
ReturnToService=2
# Use the CPUs and memory written here even if slurmd counts differently (containers often see the
# host's CPUs or memory), instead of draining the node.
SlurmdParameters=config_overrides
# Reject at submission a job that can never run here (more CPUs than the node has, an unknown
# partition): sbatch fails at once instead of leaving the job, and a submitit sweep, pending forever.
EnforcePartLimits=ALL
# Finished jobs stay visible to squeue/scontrol for 5 minutes; without an accounting database
# this is the only place their final state (COMPLETED, FAILED, ...) can be read.
MinJobAge=300
SchedulerType=sched/backfill
# A requeued job becomes eligible when its delay (cred_expire) ends, which is no scheduling event:
# it waits for the next periodic pass (default every 60 s); every 5 s is cheap on one node.
SchedulerParameters=sched_interval=5,bf_interval=5
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        CONF_CHANGED=0
    else
        install -m 0644 "$tmp" "$CONF"
        rm -f "$tmp"
        CONF_CHANGED=1
        say "wrote $CONF (node ${host}: CPUs=${cpus} RealMemory=${real_mb} MB)"
    fi
    # Debian's slurmd reads cgroup.conf only for cgroup plugins; none is configured.
    install -d -m 0755 "$LOG_DIR" "$RUN_DIR" "$STATE_DIR" "$SPOOL_DIR"
}

# The daemons fork and write their pid file a moment later; wait for it (bounded).
wait_pidfile() {
    local name=$1 pidfile=$2 log=$3
    for _ in $(seq 1 50); do
        [[ -n $(daemon_pid "$pidfile") ]] && return 0
        sleep 0.2
    done
    die "$name did not stay up (no live pid in $pidfile); read $log"
}

start_slurm() {
    if (( CONF_CHANGED )); then
        stop_daemon slurmd "$RUN_DIR/slurmd.pid"
        stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
    fi
    if [[ -z $(daemon_pid "$RUN_DIR/slurmctld.pid") ]]; then
        # Without -D the daemons fork into the background and write their pid files.
        /usr/sbin/slurmctld -f "$CONF" \
            || die "slurmctld did not start; read ${LOG_DIR}/slurmctld.log"
        wait_pidfile slurmctld "$RUN_DIR/slurmctld.pid" "${LOG_DIR}/slurmctld.log"
        say "started slurmctld"
    fi
    if [[ -z $(daemon_pid "$RUN_DIR/slurmd.pid") ]]; then
        /usr/sbin/slurmd -f "$CONF" \
            || die "slurmd did not start; read ${LOG_DIR}/slurmd.log"
        wait_pidfile slurmd "$RUN_DIR/slurmd.pid" "${LOG_DIR}/slurmd.log"
        say "started slurmd"
    fi
}

# submitit (hydra/launcher=submitit_slurm) learns that a job ended without a result (cancelled,
# killed for memory, node lost) only from `sacct`. Without an accounting database the real sacct
# fails, submitit reads the state as UNKNOWN and the sweep waits forever. This stand-in answers
# submitit's query (`sacct -o JobID,State,NodeList --parsable2 -j ID ...`) from squeue, which
# remembers finished jobs for MinJobAge seconds; it defers to the real sacct whenever that works.
SACCT_SHIM=/usr/local/bin/sacct
SACCT_SHIM_MARK="# segx slurm-local sacct stand-in"

install_sacct_shim() {
    if [[ -e $SACCT_SHIM ]] && ! grep -qF "$SACCT_SHIM_MARK" "$SACCT_SHIM"; then
        say "kept $SACCT_SHIM (not ours); submitit cannot see cancelled jobs unless it works"
        return 0
    fi
    cat >"$SACCT_SHIM" <<SHIM
#!/usr/bin/env bash
$SACCT_SHIM_MARK (scripts/slurm-local.sh; removed by its stop).
# Only the columns submitit reads are produced: JobID|State|NodeList, whatever -o asks.
if out=\$(/usr/bin/sacct "\$@" 2>/dev/null); then printf '%s\n' "\$out"; exit 0; fi
ids=()
while [[ \$# -gt 0 ]]; do
    case \$1 in -j|--jobs) ids+=("\$2"); shift 2 ;; -j*) ids+=("\${1#-j}"); shift ;; *) shift ;; esac
done
echo "JobID|State|NodeList"
[[ \${#ids[@]} -gt 0 ]] || exit 0
(IFS=,; squeue -h -r -t all -j "\${ids[*]}" -o '%i|%T|%N' 2>/dev/null)
exit 0
SHIM
    chmod 0755 "$SACCT_SHIM"
}

remove_sacct_shim() {
    if [[ -e $SACCT_SHIM ]] && grep -qF "$SACCT_SHIM_MARK" "$SACCT_SHIM"; then
        rm -f "$SACCT_SHIM"
    fi
}

wait_ready() {
    local host state deadline
    host=$(hostname -s)
    deadline=$(( SECONDS + READY_TIMEOUT_S ))
    while (( SECONDS < deadline )); do
        [[ -n $(daemon_pid "$RUN_DIR/slurmctld.pid") ]] \
            || die "slurmctld exited; read ${LOG_DIR}/slurmctld.log"
        [[ -n $(daemon_pid "$RUN_DIR/slurmd.pid") ]] \
            || die "slurmd exited; read ${LOG_DIR}/slurmd.log"
        state=$(sinfo -h -N -n "$host" -o %T 2>/dev/null | head -n1 || true)
        case $state in
            idle|mixed|allocated|completing)
                say "ready: partition debug, node ${host} is ${state} ($(nproc) CPUs); try: srun -n1 hostname"
                return 0 ;;
            drain*|down*|fail*)
                # A node left down/drained by an earlier run: clear it once slurmd is registered.
                scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    die "node ${host} not idle after ${READY_TIMEOUT_S} s (state: ${state:-none}; reason: $(sinfo -h -N -n "$host" -o %E 2>/dev/null)); read ${LOG_DIR}/slurmctld.log and ${LOG_DIR}/slurmd.log"
}

cmd_start() {
    need_root
    install_packages
    setup_munge
    start_munge
    CONF_CHANGED=0
    write_conf
    start_slurm
    install_sacct_shim
    wait_ready
}

cmd_stop() {
    need_root
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
    stop_daemon munged /run/munge/munged.pid
    remove_sacct_shim
}

cmd_status() {
    command -v sinfo >/dev/null || die "SLURM is not installed; run: bash scripts/slurm-local.sh start"
    sinfo || die "slurmctld does not answer; run: bash scripts/slurm-local.sh start (log: ${LOG_DIR}/slurmctld.log)"
}

case ${1:-start} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) die "unknown command '${1}'; use start, stop or status" ;;
esac
