#!/usr/bin/env bash
# Stop what scripts/testbed-up.sh started, by pid file only: the test bed sshd, dockerd, and
# PostgreSQL only when testbed-up started it. Packages, users, keys, images, the databases and
# the ssh config stay. Idempotent: with nothing running it does nothing and exits 0.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
RUN_DIR=/run/togather-testbed
CONF_DIR=/etc/togather-testbed
SSHD_PIDFILE=$RUN_DIR/sshd.pid
DOCKERD_PIDFILE=$RUN_DIR/dockerd.pid
PG_MARKER=$RUN_DIR/postgresql.started
PG_VERSION=15
PG_CLUSTER=main

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
cd /

status() { printf '%s: %s\n' "$1" "$2"; }
die() { printf 'testbed-down: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ -d "$RUN_DIR" ] || { status testbed "nothing to stop"; exit 0; }

exec 9>"$RUN_DIR/lock"
flock -w 900 9 || die "another testbed-up/down holds $RUN_DIR/lock"

# shellcheck source=scripts/testbed-lib.sh
. "$HERE/testbed-lib.sh"

# stop NAME PIDFILE COMM MATCH WAIT_SECONDS: SIGTERM, wait bounded, then SIGKILL.
stop() {
    local name=$1 pidfile=$2 comm=$3 match=$4 wait_s=$5 pid i
    if ! pid=$(live_pid "$pidfile" "$comm" "$match"); then
        rm -f "$pidfile"
        status "$name" "not running under testbed-up (nothing to stop)"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 5; i++)); do
        [ -d "/proc/$pid" ] || break
        sleep 0.2
    done
    if [ -d "/proc/$pid" ]; then
        printf 'testbed-down: warning: %s (pid %s) still running after %s s, sending SIGKILL\n' \
            "$name" "$pid" "$wait_s" >&2
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 25; i++)); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
    fi
    [ -d "/proc/$pid" ] && die "$name (pid $pid) did not exit"
    rm -f "$pidfile"
    status "$name" "stopped (pid $pid)"
}

stop sshd "$SSHD_PIDFILE" sshd "$CONF_DIR/sshd_config" 10
# dockerd stops its containers (10 s grace each, in parallel) and its containerd first.
stop docker "$DOCKERD_PIDFILE" dockerd "" 90

# PostgreSQL: only if testbed-up started this very postmaster.
if [ -s "$PG_MARKER" ]; then
    marker_pid=$(tr -dc '0-9' <"$PG_MARKER")
    pg_data=$(pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $6 }')
    cur_pid=$(head -n1 "$pg_data/postmaster.pid" 2>/dev/null | tr -dc '0-9' || true)
    if [ -n "$marker_pid" ] && [ "$marker_pid" = "$cur_pid" ] && [ -d "/proc/$cur_pid" ]; then
        timeout 120 pg_ctlcluster -m fast "$PG_VERSION" "$PG_CLUSTER" stop ||
            die "pg_ctlcluster $PG_VERSION $PG_CLUSTER stop failed"
        status postgres "stopped (pid $cur_pid)"
    else
        status postgres "not running under testbed-up (left alone)"
    fi
    rm -f "$PG_MARKER"
else
    status postgres "not started by testbed-up (left alone)"
fi
