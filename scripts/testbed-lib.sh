# shellcheck shell=bash
# Shared by testbed-up.sh and testbed-down.sh (sourced, not run).

# Echo the pid in PIDFILE if it is alive, named COMM, and (optionally) its command line has
# MATCH: a pid file alone never identifies a process (pids are reused).
live_pid() {
    local pidfile=$1 comm=$2 match=${3:-} pid
    [ -s "$pidfile" ] || return 1
    pid=$(head -n1 "$pidfile" | tr -dc '0-9')
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    if [ -n "$match" ]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$match" || return 1
    fi
    printf '%s' "$pid"
}
