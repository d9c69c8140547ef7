#!/usr/bin/env bash
# Stop what scripts/testbed-up.sh and scripts/testbed-fleet.sh started, by pid file only: the
# fleet (load balancer, registry, each host's sshd, dockerd and namespaces, the bridge), the ACME
# test server (pebble, pebble-challtestsrv), the test bed sshd, dockerd, and PostgreSQL only when testbed-up started it. Packages, users, keys,
# images, the databases and the ssh config stay. Idempotent: with nothing running it does nothing and exits 0.
#   --fleet-only   stop only the fleet (`make testbed-fleet-down`); the local test bed stays up.
set -euo pipefail

FLEET_ONLY=0
case "${1:-}" in
    --fleet-only) FLEET_ONLY=1 ;;
    '') ;;
    *) printf 'usage: %s [--fleet-only]\n' "$0" >&2; exit 2 ;;
esac

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

# ---------- the fleet (scripts/testbed-fleet.sh), when it was started ----------
# Load balancer and registry, then per host sshd, dockerd (its containers) and the namespace
# holder; then whatever is still in a host's network namespace (only processes the host's
# daemons started, e.g. shims of a SIGKILLed dockerd), the namespaces, the bridge and our
# iptables rules. Data (images, /srv, registry blobs), configs, keys and the ssh config stay.
if [ -d "$FLEET_RUN" ] || [ -d "$FLEET_SOCK_DIR" ] || ip link show "$FLEET_BRIDGE" >/dev/null 2>&1; then
    stop "fleet load balancer" "$FLEET_RUN/haproxy.pid" haproxy "$FLEET_CONF/haproxy.cfg" 10
    stop "fleet registry" "$FLEET_RUN/registry.pid" docker-registry "$FLEET_CONF/registry.yml" 10
    for h in "${FLEET_HOSTS[@]}"; do
        stop "fleet $h sshd" "$FLEET_RUN/$h-sshd.pid" sshd "$FLEET_CONF/$h/sshd_config" 10
    done
    # The three dockerds stop (and stop their containers, 10 s grace each) in parallel.
    stop_jobs=()
    for h in "${FLEET_HOSTS[@]}"; do
        stop "fleet $h dockerd" "$FLEET_SOCK_DIR/$h/docker.pid" dockerd "$FLEET_CONF/$h/daemon.json" 90 &
        stop_jobs+=($!)
    done
    for j in "${stop_jobs[@]}"; do wait "$j" || die "a fleet dockerd did not stop"; done
    for h in "${FLEET_HOSTS[@]}"; do
        stop "fleet $h holder" "$FLEET_RUN/$h-holder.pid" sleep "togather-fleet-$h" 10
        ns=$(fleet_netns "$h")
        if [ -e "/run/netns/$ns" ]; then
            left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
            if [ -n "${left// /}" ]; then
                printf 'testbed-down: warning: stopping leftover pids in %s: %s\n' "$ns" "$left" >&2
                # shellcheck disable=SC2086  # a list of pids
                kill -TERM $left 2>/dev/null || true
                for ((i = 0; i < 50; i++)); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.2; done
                left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
                # shellcheck disable=SC2086
                [ -z "${left// /}" ] || kill -KILL $left 2>/dev/null || true
            fi
            ip netns del "$ns"
            status "fleet $h netns" "deleted ($ns)"
        fi
        ip link del "$(fleet_veth "$h")" 2>/dev/null || true
    done
    if ip link show "$FLEET_BRIDGE" >/dev/null 2>&1; then
        ip link del "$FLEET_BRIDGE"
        status "fleet bridge" "deleted ($FLEET_BRIDGE)"
    fi
    while read -r table chain rule; do
        [ -n "$table" ] || continue
        # shellcheck disable=SC2086  # the rule is a list of words
        while iptables -w 10 -t "$table" -C "$chain" $rule 2>/dev/null; do
            iptables -w 10 -t "$table" -D "$chain" $rule
        done
    done < <(fleet_iptables_rules)
    rm -rf "$FLEET_RUN"
    rm -rf --one-file-system "$FLEET_SOCK_DIR"
    # The unreachable route for 10.77.0.0/24 stays: no traffic to a fleet address leaves the machine.
    status "fleet" "stopped"
elif [ "$FLEET_ONLY" = 1 ]; then
    status "fleet" "nothing to stop"
fi
[ "$FLEET_ONLY" = 1 ] && exit 0

stop pebble "$RUN_DIR/pebble.pid" pebble "$CONF_DIR/pebble/pebble-config.json" 10
stop pebble-challtestsrv "$RUN_DIR/pebble-challtestsrv.pid" pebble-challtes "-dns01 127.0.0.1:8053" 10
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
