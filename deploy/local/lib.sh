# shellcheck shell=bash
# Shared lifecycle for the local service scripts (kafka.sh, redis.sh, mlflow.sh); sourced, not run.
#
# A service script sets SVC (its name), SVC_PORT, SVC_MATCH (a string its process's command line
# must contain) and defines three functions, then calls `svc_main "$@"`:
#   svc_prepare   one-time/every-start setup (configs, folders, downloads); may exit non-zero
#   svc_command   prints nothing; fills the array SVC_CMD with the foreground server command
#   svc_ready     returns 0 once the service answers real requests
#
# Each server runs in its own session (setsid), so it outlives the shell that started it, and its
# process group id equals its pid, so stop can signal helper processes (uvicorn workers, ...) too.

LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LOCAL_DIR/../.." && pwd)"
# shellcheck source=env.sh
. "$LOCAL_DIR/env.sh"

STATE="$SPECTUTOR_LOCAL_STATE"
LOG_DIR="$STATE/logs"
RUN_DIR="$STATE/run"
# shellcheck disable=SC2034 # read by the service scripts that source this file.
VENV="${SPECTUTOR_VENV:-$REPO_ROOT/.venv}"
# Generous by default: the first MLflow start on a 2-core machine runs its DB migrations.
READY_TIMEOUT="${SPECTUTOR_READY_TIMEOUT:-120}"
STOP_TIMEOUT="${SPECTUTOR_STOP_TIMEOUT:-30}"
# Logs are appended across restarts (handy after a crash); past this size the old one is set aside.
LOG_ROTATE_BYTES=$((50 * 1024 * 1024))

mkdir -p "$LOG_DIR" "$RUN_DIR"

say() { echo "$SVC: $*"; }
now_ms() { echo $((${EPOCHREALTIME//[.,]/} / 1000)); }
# "1.234s" since a now_ms timestamp: start times are what people compare, so keep the fraction.
elapsed() { local ms=$(($(now_ms) - $1)); printf '%d.%03ds' $((ms / 1000)) $((ms % 1000)); }
die() { echo "$SVC: error: $*" >&2; exit 1; }

svc_log() { echo "$LOG_DIR/$SVC.log"; }
svc_pidfile() { echo "$RUN_DIR/$SVC.pid"; }

# Prints the pid of our running server, or returns 1. A pid file whose process is gone, or whose
# pid now belongs to some other program (pids are reused), counts as stopped and is removed.
svc_pid() {
    local pidfile pid cmdline=""
    pidfile="$(svc_pidfile)"
    [[ -s "$pidfile" ]] || return 1
    pid="$(<"$pidfile")"
    if [[ "$pid" =~ ^[0-9]+$ ]]; then
        cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || true
    fi
    if [[ -n "$cmdline" && "$cmdline" == *"$SVC_MATCH"* ]]; then
        echo "$pid"
        return 0
    fi
    rm -f "$pidfile"
    return 1
}

# kill -0 also succeeds on a zombie, and our servers are reparented to whatever PID 1 is, which
# may reap late (or never, in some containers): an exited-but-unreaped server counts as gone.
pid_alive() {
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat="${stat##*) }"
    [[ -n "$stat" && "${stat:0:1}" != Z ]]
}

# True while any live (non-zombie) process remains in process group $1. Servers that fork helpers
# (MLflow's uvicorn) are stopped only once the helpers have finished their own shutdown too.
group_alive() {
    local f stat fields
    for f in /proc/[0-9]*/stat; do
        # Builtin read, not cat: this runs ten times a second over every process.
        read -r stat 2>/dev/null <"$f" || continue
        read -r -a fields <<<"${stat##*) }" # "STATE PPID PGRP ..."
        [[ "${fields[2]:-}" == "$1" && "${fields[0]}" != Z ]] && return 0
    done
    return 1
}

port_open() {
    # bash's /dev/tcp: no dependency on nc/curl just to see whether something listens.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

svc_tail_log() {
    local log
    log="$(svc_log)"
    echo "---- last 30 lines of $log ----" >&2
    tail -n 30 "$log" >&2 2>/dev/null || echo "(no log)" >&2
    echo "----" >&2
}

# What the server has logged since this start (the log file is shared with earlier runs).
svc_log_since_start() {
    tail -c "+$((${SVC_LOG_OFFSET:-0} + 1))" "$(svc_log)" 2>/dev/null
}

svc_status() {
    local pid
    if pid="$(svc_pid)"; then
        say "running (pid $pid, 127.0.0.1:$SVC_PORT)"
        return 0
    fi
    say "stopped"
    # 3 = "program is not running" in the LSB init-script convention.
    return 3
}

# Signals the whole process group, waits, and escalates to SIGKILL after STOP_TIMEOUT seconds.
svc_kill() {
    local pid="$1" deadline=$((SECONDS + STOP_TIMEOUT))
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    while group_alive "$pid"; do
        if ((SECONDS >= deadline)); then
            say "did not exit within ${STOP_TIMEOUT}s of SIGTERM; sending SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    # Children that ignored TERM after the leader exited would keep the port: finish them too.
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$(svc_pidfile)"
}

svc_stop() {
    local pid t0
    if ! pid="$(svc_pid)"; then
        say "not running; nothing to stop"
        return 0
    fi
    t0=$(now_ms)
    svc_kill "$pid"
    say "stopped (pid $pid) in $(elapsed "$t0")"
}

svc_start() {
    local pid log pidfile t0 deadline
    if pid="$(svc_pid)"; then
        say "already running (pid $pid, 127.0.0.1:$SVC_PORT)"
        return 0
    fi
    # Something else on our port (another Redis, a leftover broker) would make the server fail
    # with a bind error buried in its log, or worse, make readiness checks pass against it.
    if port_open "$SVC_PORT"; then
        die "127.0.0.1:$SVC_PORT is already in use by another process (not started by this script; see: ss -ltnp 'sport = :$SVC_PORT'). Stop it or set the port variable for $SVC."
    fi
    t0=$(now_ms)
    svc_prepare
    SVC_CMD=()
    svc_command

    log="$(svc_log)"
    pidfile="$(svc_pidfile)"
    if [[ -f "$log" ]] && (($(stat -c %s "$log") > LOG_ROTATE_BYTES)); then
        mv -f "$log" "$log.1"
    fi
    echo "==== $(date -Is) starting: ${SVC_CMD[*]}" >>"$log"
    SVC_LOG_OFFSET="$(stat -c %s "$log")"
    rm -f "$pidfile"
    # The child records its own pid and then execs the server, so the pid file names the server
    # itself (not a wrapper) and the server leads its own session and process group.
    # shellcheck disable=SC2016 # $$ and $@ belong to the child shell.
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "${SVC_CMD[@]}" </dev/null >>"$log" 2>&1 9>&- &
    for _ in $(seq 50); do [[ -s "$pidfile" ]] && break; sleep 0.1; done
    pid="$(<"$pidfile")" || die "server did not record its pid"

    deadline=$((SECONDS + READY_TIMEOUT))
    until svc_ready; do
        if ! pid_alive "$pid"; then
            echo "$SVC: error: exited during startup (pid $pid)" >&2
            svc_tail_log
            svc_kill "$pid" # helpers it forked may still be alive
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "$SVC: error: not ready within ${READY_TIMEOUT}s (SPECTUTOR_READY_TIMEOUT); stopping it" >&2
            svc_tail_log
            svc_kill "$pid"
            exit 1
        fi
        sleep 0.25
    done
    say "started (pid $pid) on 127.0.0.1:$SVC_PORT in $(elapsed "$t0"); log: $log"
}

# Two starts at once (parallel test jobs, a developer and `make test`) would both see "stopped"
# and launch twice; one lock per service serialises start/stop. fd 9 is closed for the server.
svc_lock() {
    exec 9>"$RUN_DIR/$SVC.lock"
    flock -w $((READY_TIMEOUT + STOP_TIMEOUT + 60)) 9 || die "timed out waiting for $RUN_DIR/$SVC.lock"
}

svc_main() {
    case "${1:-}" in
        start | stop | restart) svc_lock ;;
    esac
    case "${1:-}" in
        start) svc_start ;;
        stop) svc_stop ;;
        restart) svc_stop && svc_start ;;
        status) svc_status ;;
        *)
            echo "usage: $0 start|stop|restart|status" >&2
            exit 2
            ;;
    esac
}
