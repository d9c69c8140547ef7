# shellcheck shell=bash
# shellcheck disable=SC2034  # variables for the scripts that source this file
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

# ---------- fleet test bed (scripts/testbed-fleet.sh; stopped by testbed-down.sh) ----------
# Three fleet hosts, each a network namespace on the bridge tbbr0 plus a private mount and UTS
# namespace kept alive by a holder process, with its own dockerd and sshd.
FLEET_HOSTS=(host1 host2 host3)
FLEET_BRIDGE=tbbr0
FLEET_GATEWAY=10.77.0.1
FLEET_CIDR=10.77.0.0/24
FLEET_RUN=/run/togather-testbed/fleet          # pid files of the fleet's processes
FLEET_CONF=/etc/togather-testbed/fleet         # generated configs, host keys
FLEET_STATE=/var/lib/togather-fleet            # per-host /srv, /home/deploy, /tmp, docker data
FLEET_SOCK_DIR=/run/togather-fleet             # per-host docker socket, exec root, pid file
FLEET_PROXY_PORT=80                            # where each host's product proxy listens
FLEET_LB_ADDR=127.0.0.1:10080                  # the load balancer (HAProxy) over the proxies
FLEET_REGISTRY_NAME=registry.togather.test     # 127.0.0.1 in the root namespace, 10.77.0.1 on hosts
FLEET_REGISTRY_PORT=5000

fleet_index() { printf '%s' "${1#host}"; }                       # host2 -> 2
fleet_addr() { printf '10.77.0.%s' "$((10 + ${1#host}))"; }      # host2 -> 10.77.0.12
fleet_netns() { printf 'togather-%s' "$1"; }                     # host2 -> togather-host2
fleet_veth() { printf 'tb%s' "$1"; }                             # host2 -> tbhost2 (root end)
fleet_sock() { printf '%s/%s/docker.sock' "$FLEET_SOCK_DIR" "$1"; }

# The iptables rules the fleet adds in the root namespace (each: table, chain, rule...).
# Inter-host and host->outside traffic pass the FORWARD chain whose policy the root dockerd sets
# to DROP; outside traffic is masqueraded like docker0's.
fleet_iptables_rules() {
    cat <<RULES
filter DOCKER-USER -i $FLEET_BRIDGE -o $FLEET_BRIDGE -j ACCEPT -m comment --comment togather-fleet
filter DOCKER-USER -i $FLEET_BRIDGE ! -o $FLEET_BRIDGE -j ACCEPT -m comment --comment togather-fleet
filter DOCKER-USER -o $FLEET_BRIDGE -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT -m comment --comment togather-fleet
nat POSTROUTING -s $FLEET_CIDR ! -o $FLEET_BRIDGE -j MASQUERADE -m comment --comment togather-fleet
RULES
}
