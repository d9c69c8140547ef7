#!/usr/bin/env bash
# Bring up the FLEET test bed (issue 9) on top of the local one (run scripts/testbed-up.sh first;
# `make testbed-fleet` does both). As root on Debian 12, no systemd needed:
#
#   host1..host3   each a network namespace on the bridge tbbr0 (10.77.0.1/24; hosts .11-.13),
#                  with a private mount + UTS namespace (own /srv, /home/deploy, /tmp,
#                  /etc/hosts, hostname) held by a `sleep` holder process, its own dockerd
#                  (data root /var/lib/togather-fleet/hostN/docker, socket
#                  /run/togather-fleet/hostN/docker.sock) and its own sshd on 10.77.0.1N:22
#                  (ssh aliases togather-host1..3, user deploy, SetEnv DOCKER_HOST so plain
#                  `docker` over SSH reaches that host's daemon).
#   registry       Debian's docker-registry (CNCF distribution 2.8) on 10.77.0.1:5000, plain
#                  HTTP, no auth; named registry.togather.test:5000 everywhere (see below).
#   load balancer  HAProxy on 127.0.0.1:10080 over the hosts' proxies on 10.77.0.1N:80.
#                  HAProxy rather than nginx: it retries a failed connect on another server
#                  (redispatch) and takes a dead host out with active checks, and it is not the
#                  product's own nginx, so the two configs never get mixed up. Also
#                  127.78.0.1:9080 over the same proxies, for the ACME server (Pebble)
#                  validating HTTP-01 on a fleet: round robin, no stickiness.
#
# The registry name: the root dockerd trusts plain HTTP only on 127.0.0.0/8 (and must not be
# restarted to change that), the fleet dockerds trust it through --insecure-registry. So the
# name registry.togather.test resolves to 127.0.0.1 in the root namespace (/etc/hosts block;
# HAProxy forwards 127.0.0.1:5000 to 10.77.0.1:5000) and to 10.77.0.1 on each host (its own
# /etc/hosts): one image name everywhere, `docker push` from the root daemon and `docker pull`
# on the hosts both work.
#
# Idempotent like testbed-up.sh (a second run prints only "ok" lines); every wait is bounded;
# nothing secret is printed or put on a command line. Stopped by scripts/testbed-down.sh.
set -euo pipefail

SECONDS=0
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd /

RUN_DIR=/run/togather-testbed
LOG_DIR=/var/log/togather-testbed
DEPLOY_USER=deploy
PG_VERSION=15
PG_CLUSTER=main
BASE_IMAGE=debian:bookworm-slim
MARK_BEGIN="# BEGIN togather-testbed-fleet"
# The swarm of issue 12 (section 8): host1 its only manager, host2 and host3 workers; the
# `cluster` environment publishes its app on SWARM_APP_PORT (host mode) on every node and
# HAProxy serves them on SWARM_LB_ADDR.
SWARM_MANAGER=host1
SWARM_APP_PORT=8090
SWARM_LB_ADDR=127.0.0.1:11080
# ACME on the fleet (tests/e2e/test_fleet_tls.py): Pebble validates HTTP-01 on port 9080 of
# whatever a test domain resolves to; a domain pointed here reaches the hosts' port 80 through
# a round-robin load balancer without stickiness, like a cloud one.
ACME_LB_ADDR=127.78.0.1:9080
MARK_END="# END togather-testbed-fleet"

export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

# shellcheck source=scripts/testbed-lib.sh
. "$REPO/scripts/testbed-lib.sh"

status() { printf '%s: %s\n' "$1" "$2"; }
# status_notes NAME DETAIL [NOTE...] -> "NAME: ok (DETAIL; NOTE, NOTE)"
status_notes() {
    local name=$1 detail=$2 notes
    shift 2
    notes=$(printf '%s, ' "$@"); notes=${notes%, }
    if [ -n "$notes" ]; then detail=${detail:+$detail; }$notes; fi
    status "$name" "ok${detail:+ ($detail)}"
}
die() { printf 'testbed-fleet: ERROR: %s\n' "$*" >&2; exit 1; }

TMP_PATHS=()
cleanup() {
    local p
    for p in "${TMP_PATHS[@]}"; do [ -n "$p" ] && rm -rf "$p"; done
    return 0
}
trap cleanup EXIT

# write_file DEST MODE OWNER < content: replace DEST (atomically) only when the content differs.
# Sets WROTE=1 when it wrote. (Same contract as in testbed-up.sh.)
WROTE=0
write_file() {
    local dest=$1 mode=$2 owner=$3 tmp content current=""
    content=$(cat; printf x); content=${content%x}
    if [ -f "$dest" ]; then current=$(cat "$dest"; printf x); current=${current%x}; fi
    if [ -f "$dest" ] && [ "$content" = "$current" ]; then
        WROTE=0
    else
        tmp=$(mktemp "$(dirname "$dest")/.tb.XXXXXX")
        TMP_PATHS+=("$tmp")
        printf '%s' "$content" >"$tmp"
        chmod "$mode" "$tmp"
        chown "$owner" "$tmp"
        mv -f "$tmp" "$dest"
        WROTE=1
    fi
    [ "$(stat -c '%a' "$dest")" = "${mode#0}" ] || chmod "$mode" "$dest"
    [ "$(stat -c '%U:%G' "$dest")" = "$owner" ] || chown "$owner" "$dest"
}

# write_in_place DEST < content: like write_file but keeps the inode (for a file that is
# bind-mounted into a host: a rename would be invisible there).
write_in_place() {
    local dest=$1 content current=""
    content=$(cat; printf x); content=${content%x}
    if [ -f "$dest" ]; then current=$(cat "$dest"; printf x); current=${current%x}; fi
    if [ -f "$dest" ] && [ "$content" = "$current" ]; then WROTE=0; return 0; fi
    printf '%s' "$content" >"$dest"
    WROTE=1
}

# FILE with our marked block (from stdin) replaced where it stands, or appended; on stdout.
# In place, not moved to the end: testbed-up.sh moves its own block to the end of the same files
# (ssh config, pg_hba.conf), and two scripts that both move theirs would rewrite them every run.
with_block() {
    local file=$1 block body
    block=$(cat)
    if [ -f "$file" ] && grep -qxF -- "$MARK_BEGIN" "$file"; then
        BLOCK=$block awk -v b="$MARK_BEGIN" -v e="$MARK_END" '
            $0 == b { print b; print ENVIRON["BLOCK"]; skip = 1; next }
            $0 == e { print e; skip = 0; next }
            skip { next }
            { print }
        ' "$file"
        return 0
    fi
    # Before testbed-up.sh's block, which that script keeps last.
    if [ -f "$file" ] && grep -qxF -- "# BEGIN togather-testbed" "$file"; then
        BLOCK=$block awk -v b="$MARK_BEGIN" -v e="$MARK_END" '
            $0 == "# BEGIN togather-testbed" { print b; print ENVIRON["BLOCK"]; print e; print "" }
            { print }
        ' "$file"
        return 0
    fi
    body=$( [ -f "$file" ] && awk '
        /^[[:space:]]*$/ { blank = blank $0 "\n"; next }
        { printf "%s%s\n", blank, $0; blank = "" }
    ' "$file")
    if [ -n "$body" ]; then printf '%s\n\n' "$body"; fi
    printf '%s\n%s\n%s\n' "$MARK_BEGIN" "$block" "$MARK_END"
}

# block_file FILE < block: put our marked block in FILE, keeping its mode and owner.
block_file() {
    local file=$1 content
    content=$(with_block "$file")
    write_file "$file" "$(stat -c '%a' "$file")" "$(stat -c '%U:%G' "$file")" <<<"$content"
}

# wait_for SECONDS CMD...: run CMD every 0.2 s until it succeeds, at most SECONDS.
wait_for() {
    local limit=$1 i
    shift
    for ((i = 0; i < limit * 5; i++)); do
        "$@" && return 0
        sleep 0.2
    done
    "$@"
}

same_ns() { [ "$(readlink "/proc/$1/ns/$3" 2>/dev/null)" = "$(readlink "/proc/$2/ns/$3" 2>/dev/null)" ]; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ -d "$RUN_DIR" ] || die "$RUN_DIR missing: run scripts/testbed-up.sh (make testbed) first"
mkdir -p "$FLEET_RUN" "$FLEET_CONF" "$FLEET_STATE" "$FLEET_SOCK_DIR" "$LOG_DIR"

exec 9>"$RUN_DIR/lock"
flock -w 900 9 || die "another testbed-up/down/fleet holds $RUN_DIR/lock"

# ---------- 0. what the local test bed must already provide ----------
ROOT_HOME=$(getent passwd root | cut -d: -f6)
OP_KEY=$ROOT_HOME/.ssh/togather_testbed_ed25519
KNOWN_HOSTS=$ROOT_HOME/.ssh/togather_fleet_known_hosts
SSH_CONFIG=$ROOT_HOME/.ssh/config
id -u "$DEPLOY_USER" >/dev/null 2>&1 || die "no $DEPLOY_USER user: run scripts/testbed-up.sh first"
DEPLOY_HOME=$(getent passwd "$DEPLOY_USER" | cut -d: -f6)
if [ ! -s "$OP_KEY.pub" ] || [ ! -s "$DEPLOY_HOME/.ssh/authorized_keys" ]; then
    die "no operator key / authorized_keys: run scripts/testbed-up.sh first"
fi
timeout 15 docker info >/dev/null 2>&1 || die "the root dockerd does not answer: run scripts/testbed-up.sh first"
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "no $BASE_IMAGE image: run scripts/testbed-up.sh first"
iptables -w 10 -L DOCKER-USER -n >/dev/null 2>&1 || die "no iptables chain DOCKER-USER (the root dockerd makes it)"

# ---------- 1. packages ----------
# Everything this script (and the fleet's e2e tests) run beyond testbed-up.sh's packages:
# nsenter/unshare/flock/runuser (util-linux), ip/ss (iproute2), iptables, sysctl (procps),
# hostname, curl, sshd, the registry, HAProxy.
APT_PKGS=(docker-registry haproxy iproute2 iptables procps hostname util-linux curl openssh-server)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    status "fleet packages" "ok"
else
    # Their postinst must start no service: Debian's own docker-registry would take *:5000
    # (ours listens on 10.77.0.1:5000, HAProxy on 127.0.0.1:5000). Without systemd and a runlevel invoke-rc.d starts nothing anyway;
    # a policy-rc.d that denies every start makes sure (one already there is left alone).
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# togather testbed-fleet.sh: no service starts during apt-get install\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        TMP_PATHS+=("$policy")
    fi
    {
        timeout 900 apt-get update &&
        timeout 1800 apt-get install -y -o Dpkg::Options::=--force-confold "${missing[@]}"
    } >>"$LOG_DIR/apt.log" 2>&1 9>&- || { tail -n 30 "$LOG_DIR/apt.log" >&2; die "apt-get failed (see $LOG_DIR/apt.log)"; }
    if [[ " ${TMP_PATHS[*]} " == *" $policy "* ]]; then rm -f "$policy"; fi
    status "fleet packages" "ok (installed ${missing[*]})"
fi

# ---------- 2. bridge and root-namespace firewall ----------
notes=()
if ! ip link show "$FLEET_BRIDGE" >/dev/null 2>&1; then
    ip link add "$FLEET_BRIDGE" type bridge
    notes+=("created")
fi
if ! ip -4 -o addr show dev "$FLEET_BRIDGE" | grep -qF " $FLEET_GATEWAY/24 "; then
    ip addr add "$FLEET_GATEWAY/24" dev "$FLEET_BRIDGE"
    notes+=("address set")
fi
if ! ip -o link show "$FLEET_BRIDGE" | grep -q '[<,]UP[,>]'; then
    ip link set "$FLEET_BRIDGE" up
    notes+=("up")
fi
# While the bridge is down, traffic to the fleet's addresses must fail here, not follow the
# default route off the machine: an unreachable route under the bridge's (it stays after down).
if ! ip route show table main type unreachable | grep -q "^unreachable $FLEET_CIDR "; then
    ip route add unreachable "$FLEET_CIDR" metric 4000
    notes+=("unreachable fallback route added")
fi
if [ "$(cat /proc/sys/net/ipv4/ip_forward)" != 1 ]; then
    sysctl -q -w net.ipv4.ip_forward=1
    notes+=("ip_forward on")
fi
while read -r table chain rule; do
    [ -n "$table" ] || continue
    # shellcheck disable=SC2086  # the rule is a list of words
    if ! iptables -w 10 -t "$table" -C "$chain" $rule 2>/dev/null; then
        iptables -w 10 -t "$table" -I "$chain" 1 $rule
        notes+=("iptables $table/$chain rule added")
    fi
done < <(fleet_iptables_rules)
status_notes "fleet bridge" "$FLEET_BRIDGE $FLEET_GATEWAY/24" "${notes[@]}"

# The registry name in the root namespace (see the header).
block_file /etc/hosts <<<"127.0.0.1 $FLEET_REGISTRY_NAME"
[ "$WROTE" = 1 ] && status "fleet /etc/hosts" "ok ($FLEET_REGISTRY_NAME -> 127.0.0.1 added)"

# ---------- 3. the hosts ----------
install -d -m 700 "$ROOT_HOME/.ssh"
known_hosts_lines=()

# What a holder mounts over the root namespace's paths (its argv[0] names them, so a holder of
# an older layout is recognised and replaced). /etc/docker: dockerd's key.json is the daemon ID.
HOLDER_SPEC="srv,home,tmp,hosts,etc-docker"
# holder_pid HOST: the live holder of HOST (current layout), in HOST's network namespace.
holder_pid() {
    local h=$1 pid
    pid=$(live_pid "$FLEET_RUN/$h-holder.pid" sleep "togather-fleet-${h}[$HOLDER_SPEC] ") || return 1
    [ "$(stat -L -c %i "/proc/$pid/ns/net")" = "$(stat -L -c %i "/run/netns/$(fleet_netns "$h")")" ] || return 1
    printf '%s' "$pid"
}

# stop_pid NAME PID: SIGTERM, bounded wait, SIGKILL (a process of a host whose holder is gone).
stop_pid() {
    local name=$1 pid=$2 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 300; i++)); do [ -d "/proc/$pid" ] || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    printf 'testbed-fleet: warning: %s (pid %s) needed SIGKILL\n' "$name" "$pid" >&2
}

for h in "${FLEET_HOSTS[@]}"; do
    n=$(fleet_index "$h")
    addr=$(fleet_addr "$h")
    ns=$(fleet_netns "$h")
    veth=$(fleet_veth "$h")
    state=$FLEET_STATE/$h
    sockdir=$FLEET_SOCK_DIR/$h
    conf=$FLEET_CONF/$h
    sock=$(fleet_sock "$h")
    dockerd_conf=$conf/daemon.json
    sshd_conf=$conf/sshd_config
    hostkey=$conf/ssh_host_ed25519_key
    notes=()

    # network namespace, veth into the bridge, address, default route
    if [ ! -e "/run/netns/$ns" ]; then
        ip netns add "$ns"
        notes+=("netns created")
    fi
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip -n "$ns" link del eth0 2>/dev/null || true
        ip link add "$veth" type veth peer name eth0 netns "$ns"
        notes+=("veth created")
    fi
    [ "$(basename "$(readlink "/sys/class/net/$veth/master" 2>/dev/null)")" = "$FLEET_BRIDGE" ] ||
        ip link set "$veth" master "$FLEET_BRIDGE"
    ip -o link show "$veth" | grep -q '[<,]UP[,>]' || ip link set "$veth" up
    ip -n "$ns" -o link show lo | grep -q '[<,]UP[,>]' || ip -n "$ns" link set lo up
    ip -n "$ns" -4 -o addr show dev eth0 | grep -qF " $addr/24 " || {
        ip -n "$ns" addr add "$addr/24" dev eth0; notes+=("address set"); }
    ip -n "$ns" -o link show eth0 | grep -q '[<,]UP[,>]' || ip -n "$ns" link set eth0 up
    ip -n "$ns" route show default | grep -qF "via $FLEET_GATEWAY" ||
        ip -n "$ns" route replace default via "$FLEET_GATEWAY" dev eth0

    # per-host directories and files
    install -d -m 755 "$state" "$conf" "$sockdir"
    install -d -m 755 "$state/srv"
    install -d -m 755 -o "$DEPLOY_USER" -g "$DEPLOY_USER" "$state/srv/togather"
    install -d -m 1777 "$state/tmp"
    install -d -m 755 "$state/etc-docker" /etc/docker
    install -d -m 710 "$state/docker"
    if [ ! -d "$state/home" ]; then
        cp -a /etc/skel "$state/home.tmp" && chown -R "$DEPLOY_USER:$DEPLOY_USER" "$state/home.tmp"
        chmod 755 "$state/home.tmp"
        mv "$state/home.tmp" "$state/home"
        notes+=("deploy home created")
    fi
    install -d -m 700 -o "$DEPLOY_USER" -g "$DEPLOY_USER" "$state/home/.ssh"
    if ! cmp -s "$DEPLOY_HOME/.ssh/authorized_keys" "$state/home/.ssh/authorized_keys"; then
        install -m 600 -o "$DEPLOY_USER" -g "$DEPLOY_USER" "$DEPLOY_HOME/.ssh/authorized_keys" "$state/home/.ssh/authorized_keys"
        notes+=("authorized_keys copied")
    fi
    # /etc/hosts of the host, bind-mounted over /etc/hosts: edited in place, never renamed.
    [ -f "$state/hosts" ] || : >"$state/hosts"
    write_in_place "$state/hosts" <<EOF
127.0.0.1	localhost
$addr	$h
$FLEET_GATEWAY	$FLEET_REGISTRY_NAME togather-gateway
$(for o in "${FLEET_HOSTS[@]}"; do [ "$o" = "$h" ] || printf '%s\t%s\n' "$(fleet_addr "$o")" "$o"; done)
EOF
    chmod 644 "$state/hosts"

    # the holder: private mount + UTS namespaces inside the host's network namespace
    if ! holder=$(holder_pid "$h"); then
        # Processes of this host left from an earlier holder sit in a stale mount namespace.
        for what in sshd dockerd; do
            case $what in
                sshd) p=$(live_pid "$FLEET_RUN/$h-sshd.pid" sshd "$sshd_conf") || continue ;;
                dockerd) p=$(live_pid "$sockdir/docker.pid" dockerd "$dockerd_conf") || continue ;;
            esac
            stop_pid "$h $what" "$p"
            notes+=("stale $what stopped")
        done
        if p=$(live_pid "$FLEET_RUN/$h-holder.pid" sleep "togather-fleet-$h"); then
            stop_pid "$h old holder" "$p"
            notes+=("holder of an older layout replaced")
        fi
        rm -f "$FLEET_RUN/$h-holder.pid"
        # shellcheck disable=SC2016  # expanded by the inner bash
        setsid nsenter --net="/run/netns/$ns" unshare --mount --uts --propagation private \
            bash -c 'set -e
                hostname "$1"
                mount --bind "$2/srv" /srv
                mount --bind "$2/home" "$3"
                mount --bind "$2/tmp" /tmp
                mount --bind "$2/hosts" /etc/hosts
                mount --bind "$2/etc-docker" /etc/docker
                exec -a "togather-fleet-$1[$4]" sleep infinity' holder "$h" "$state" "$DEPLOY_HOME" "$HOLDER_SPEC" \
            </dev/null >>"$LOG_DIR/fleet-$h-holder.log" 2>&1 9>&- &
        echo $! >"$FLEET_RUN/$h-holder.pid"
        wait_for 10 holder_pid "$h" >/dev/null ||
            { tail -n 5 "$LOG_DIR/fleet-$h-holder.log" >&2; die "$h: holder did not start"; }
        holder=$(holder_pid "$h")
        notes+=("namespaces held by pid $holder")
    fi
    in_host() { nsenter --mount="/proc/$holder/ns/mnt" --net="/proc/$holder/ns/net" --uts="/proc/$holder/ns/uts" "$@"; }

    # dockerd
    write_file "$dockerd_conf" 644 root:root <<EOF
{
  "data-root": "$state/docker",
  "exec-root": "$sockdir/exec",
  "pidfile": "$sockdir/docker.pid",
  "hosts": ["unix://$sock"],
  "group": "docker",
  "bip": "172.31.$((100 + n)).1/24",
  "insecure-registries": ["$FLEET_REGISTRY_NAME:$FLEET_REGISTRY_PORT", "$FLEET_GATEWAY:$FLEET_REGISTRY_PORT"],
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "2"}
}
EOF
    dockerd_changed=$WROTE
    host_docker() { timeout 15 docker -H "unix://$sock" "$@"; }
    if pid=$(live_pid "$sockdir/docker.pid" dockerd "$dockerd_conf") && ! same_ns "$pid" "$holder" mnt; then
        stop_pid "$h dockerd" "$pid"; notes+=("dockerd from another holder stopped")
    fi
    if pid=$(live_pid "$sockdir/docker.pid" dockerd "$dockerd_conf") && [ "$dockerd_changed" = 1 ]; then
        stop_pid "$h dockerd" "$pid"; notes+=("dockerd restarted for its new config")
    fi
    if ! pid=$(live_pid "$sockdir/docker.pid" dockerd "$dockerd_conf"); then
        rm -f "$sockdir/docker.pid"
        # Not `ip netns exec` (it remounts /sys and dockerd loses the cgroup mounts): nsenter.
        in_host setsid dockerd --config-file "$dockerd_conf" \
            </dev/null >>"$LOG_DIR/fleet-$h-dockerd.log" 2>&1 9>&- &
        notes+=("dockerd started")
    fi
    if ! wait_for 60 host_docker info >/dev/null 2>&1; then
        tail -n 20 "$LOG_DIR/fleet-$h-dockerd.log" >&2
        die "$h: dockerd did not answer on $sock within 60 s"
    fi
    pid=$(live_pid "$sockdir/docker.pid" dockerd "$dockerd_conf") || die "$h: dockerd answers but its pid file is wrong"

    # base image, same image ID as the root daemon's
    want=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")
    if [ "$(host_docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null)" != "$want" ]; then
        docker save "$BASE_IMAGE" | timeout 300 docker -H "unix://$sock" load -q >/dev/null ||
            die "$h: docker save | docker load of $BASE_IMAGE failed"
        notes+=("$BASE_IMAGE loaded")
    fi

    # sshd on the host's address, port 22, its own host key
    if [ ! -s "$hostkey" ] || [ ! -s "$hostkey.pub" ]; then
        rm -f "$hostkey" "$hostkey.pub"
        ssh-keygen -q -t ed25519 -N '' -C "togather-fleet-$h" -f "$hostkey"
        notes+=("host key generated")
    fi
    chmod 600 "$hostkey"
    known_hosts_lines+=("$addr $(cut -d' ' -f1,2 "$hostkey.pub")")
    sshd_tmp=$(mktemp); TMP_PATHS+=("$sshd_tmp")
    cat >"$sshd_tmp" <<EOF
# Generated by togather-tasks scripts/testbed-fleet.sh; rewritten on every run.
ListenAddress $addr
Port 22
HostKey $hostkey
PidFile $FLEET_RUN/$h-sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin no
AllowUsers $DEPLOY_USER
StrictModes yes
UseDNS no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 50
ClientAliveInterval 15
ClientAliveCountMax 4
SetEnv DOCKER_HOST=unix://$sock
Subsystem sftp internal-sftp
EOF
    /usr/sbin/sshd -t -f "$sshd_tmp" || die "$h: generated sshd config does not validate"
    write_file "$sshd_conf" 644 root:root <"$sshd_tmp"
    sshd_changed=$WROTE
    sshd_listening() { in_host ss -Hltn "sport = :22" 2>/dev/null | grep -qF "$addr:22"; }
    if pid=$(live_pid "$FLEET_RUN/$h-sshd.pid" sshd "$sshd_conf") && ! same_ns "$pid" "$holder" mnt; then
        stop_pid "$h sshd" "$pid"; notes+=("sshd from another holder stopped")
    fi
    if pid=$(live_pid "$FLEET_RUN/$h-sshd.pid" sshd "$sshd_conf"); then
        if [ "$sshd_changed" = 1 ]; then kill -HUP "$pid"; notes+=("sshd reloaded"); sleep 1; fi
    else
        sshd_listening && die "$h: something else listens on $addr:22"
        rm -f "$FLEET_RUN/$h-sshd.pid"
        mkdir -p /run/sshd && chmod 755 /run/sshd
        in_host /usr/sbin/sshd -f "$sshd_conf" -E "$LOG_DIR/fleet-$h-sshd.log" 9>&-
        notes+=("sshd started")
    fi
    sshd_up() { live_pid "$FLEET_RUN/$h-sshd.pid" sshd "$sshd_conf" >/dev/null && sshd_listening; }
    wait_for 10 sshd_up || { tail -n 20 "$LOG_DIR/fleet-$h-sshd.log" >&2; die "$h: sshd not listening on $addr:22 within 10 s"; }
    sshd_pid=$(live_pid "$FLEET_RUN/$h-sshd.pid" sshd "$sshd_conf")
    dockerd_pid=$(live_pid "$sockdir/docker.pid" dockerd "$dockerd_conf")
    status_notes "fleet $h" "$addr, holder $holder, dockerd $dockerd_pid, sshd $sshd_pid" "${notes[@]}"
done

# ---------- 4. ssh aliases (strict known_hosts) ----------
notes=()
write_file "$KNOWN_HOSTS" 644 root:root < <(printf '%s\n' "${known_hosts_lines[@]}")
[ "$WROTE" = 1 ] && notes+=("known_hosts written")
[ -f "$SSH_CONFIG" ] || install -m 600 /dev/null "$SSH_CONFIG"
block_file "$SSH_CONFIG" < <(
    for h in "${FLEET_HOSTS[@]}"; do
        cat <<EOF
Host togather-$h
  HostName $(fleet_addr "$h")
  Port 22
  User $DEPLOY_USER
  IdentityFile ~/.ssh/togather_testbed_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile ~/.ssh/togather_fleet_known_hosts
  StrictHostKeyChecking yes
EOF
    done
)
[ "$WROTE" = 1 ] && notes+=("ssh config block written")
status_notes "fleet ssh config" "aliases togather-host1..${#FLEET_HOSTS[@]}" "${notes[@]}"

# ---------- 5. PostgreSQL admits the fleet ----------
pg_field() { pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $'"$1"' }'; }
PG_PORT=$(pg_field 3)
[ -n "$PG_PORT" ] || die "no PostgreSQL cluster $PG_VERSION/$PG_CLUSTER: run scripts/testbed-up.sh first"
case "$(pg_field 4)" in online*) ;; *) die "PostgreSQL $PG_VERSION/$PG_CLUSTER is not online: run scripts/testbed-up.sh first" ;; esac
listen=$(runuser -u postgres -- psql -X -Atq -p "$PG_PORT" -d postgres -c 'SHOW listen_addresses')
case ",${listen// /}," in
    *,\*,* | *,0.0.0.0,* | *,"$FLEET_GATEWAY",*) ;;
    *) die "PostgreSQL listens on '$listen' only; testbed-up.sh sets listen_addresses = '*'" ;;
esac
notes=()
PG_HBA=/etc/postgresql/$PG_VERSION/$PG_CLUSTER/pg_hba.conf
# Hosts connect from 10.77.0.1N, their containers through the hosts' own NAT (same sources).
block_file "$PG_HBA" <<EOF
host    all             all             $FLEET_CIDR            scram-sha-256
EOF
if [ "$WROTE" = 1 ]; then
    timeout 60 pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" reload >>"$LOG_DIR/postgresql.log" 2>&1 9>&- ||
        die "pg_ctlcluster $PG_VERSION $PG_CLUSTER reload failed"
    notes+=("pg_hba.conf admits $FLEET_CIDR, reloaded")
fi
status_notes "fleet postgres" "$FLEET_GATEWAY:$PG_PORT" "${notes[@]}"

# ---------- 6. the registry ----------
REG_CONF=$FLEET_CONF/registry.yml
REG_PIDFILE=$FLEET_RUN/registry.pid
REG_DATA=$FLEET_STATE/registry
install -d -m 755 "$REG_DATA"
write_file "$REG_CONF" 644 root:root <<EOF
# Generated by togather-tasks scripts/testbed-fleet.sh. Plain HTTP, no auth (test bed only).
version: 0.1
log:
  level: info
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: $REG_DATA
  delete:
    enabled: true
http:
  addr: $FLEET_GATEWAY:$FLEET_REGISTRY_PORT
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
EOF
reg_changed=$WROTE
notes=()
if pid=$(live_pid "$REG_PIDFILE" docker-registry "$REG_CONF") && [ "$reg_changed" = 1 ]; then
    stop_pid registry "$pid"; notes+=("restarted for its new config")
fi
if ! pid=$(live_pid "$REG_PIDFILE" docker-registry "$REG_CONF"); then
    setsid docker-registry serve "$REG_CONF" </dev/null >>"$LOG_DIR/fleet-registry.log" 2>&1 9>&- &
    echo $! >"$REG_PIDFILE"
    notes+=("started")
fi
reg_up() { curl -fsS -m 2 -o /dev/null "http://$FLEET_GATEWAY:$FLEET_REGISTRY_PORT/v2/" 2>/dev/null; }
wait_for 20 reg_up || { tail -n 20 "$LOG_DIR/fleet-registry.log" >&2; die "registry not answering on $FLEET_GATEWAY:$FLEET_REGISTRY_PORT"; }
pid=$(live_pid "$REG_PIDFILE" docker-registry "$REG_CONF") || die "registry answers but is not the process in $REG_PIDFILE"
status_notes "fleet registry" "$FLEET_REGISTRY_NAME:$FLEET_REGISTRY_PORT = $FLEET_GATEWAY:$FLEET_REGISTRY_PORT, pid $pid" "${notes[@]}"

# ---------- 7. the load balancer (and the registry's loopback door) ----------
LB_CONF=$FLEET_CONF/haproxy.cfg
LB_PIDFILE=$FLEET_RUN/haproxy.pid
LB_SOCK=$FLEET_RUN/haproxy.sock
write_file "$LB_CONF" 644 root:root < <(
    cat <<EOF
# Generated by togather-tasks scripts/testbed-fleet.sh: the fleet's "cloud load balancer".
# A failed connect (dead host) is retried on another server (redispatch) and active checks
# take the host out within ~2 s. A host's 5xx is passed through, never retried: the load
# balancer must not hide a host whose proxy routes to a stopped slot.
global
    pidfile $LB_PIDFILE
    stats socket $LB_SOCK mode 600 level admin
    maxconn 2000

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 10s
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response

frontend fleet
    bind $FLEET_LB_ADDR
    default_backend fleet_proxies

backend fleet_proxies
    balance roundrobin
    default-server check inter 1s fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down
EOF
    for h in "${FLEET_HOSTS[@]}"; do
        printf '    server %s %s:%s\n' "$h" "$(fleet_addr "$h")" "$FLEET_PROXY_PORT"
    done
    cat <<EOF

# The swarm's load balancer (issue 12): the app's port published in host mode on every node
# (no IPVS here, so no ingress routing mesh). A node without a task, or whose task is being
# replaced, fails the HTTP check on /health within ~1 s and is skipped; a request that hits it
# before that (refused connect, or a keep-alive connection closed by a stopping task) is
# retried on another node (redispatch + retry-on). A 5xx is passed through, never retried.
frontend swarm
    bind $SWARM_LB_ADDR
    default_backend swarm_nodes

backend swarm_nodes
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    retries 3
    default-server check inter 500ms fastinter 250ms downinter 500ms fall 1 rise 2 observe layer4 error-limit 1 on-error mark-down
EOF
    for h in "${FLEET_HOSTS[@]}"; do
        printf '    server %s %s:%s\n' "$h" "$(fleet_addr "$h")" "$SWARM_APP_PORT"
    done
    cat <<EOF

# The ACME server's door to the fleet (see ACME_LB_ADDR): every request to the next host in
# turn, no stickiness and no health check (the deploy starts every host's proxy before any
# host orders a certificate). The hosts are listed in reverse: hosts that validate one after
# another in their own order (deployment.parallel: 1) then never all land on themselves,
# whatever turn the rotation is at, so at least one validation is forwarded.
frontend acme_http01
    bind $ACME_LB_ADDR
    default_backend acme_fleet_proxies

backend acme_fleet_proxies
    balance roundrobin
EOF
    for ((i = ${#FLEET_HOSTS[@]} - 1; i >= 0; i--)); do
        printf '    server %s %s:%s\n' "${FLEET_HOSTS[$i]}" "$(fleet_addr "${FLEET_HOSTS[$i]}")" "$FLEET_PROXY_PORT"
    done
    cat <<EOF

# The registry seen from the root namespace (the root dockerd trusts plain HTTP on 127.0.0.0/8).
frontend registry_loopback
    mode tcp
    bind 127.0.0.1:$FLEET_REGISTRY_PORT
    timeout client 300s
    default_backend registry

backend registry
    mode tcp
    timeout server 300s
    server registry $FLEET_GATEWAY:$FLEET_REGISTRY_PORT
EOF
)
lb_changed=$WROTE
haproxy -c -q -f "$LB_CONF" || die "generated $LB_CONF does not validate"
notes=()
if pid=$(live_pid "$LB_PIDFILE" haproxy "$LB_CONF"); then
    if [ "$lb_changed" = 1 ]; then
        haproxy -D -f "$LB_CONF" -p "$LB_PIDFILE" -sf "$pid" </dev/null >>"$LOG_DIR/fleet-haproxy.log" 2>&1 9>&- ||
            die "haproxy reload failed (see $LOG_DIR/fleet-haproxy.log)"
        notes+=("reloaded")
    fi
else
    rm -f "$LB_PIDFILE"
    haproxy -D -f "$LB_CONF" -p "$LB_PIDFILE" </dev/null >>"$LOG_DIR/fleet-haproxy.log" 2>&1 9>&- ||
        { tail -n 20 "$LOG_DIR/fleet-haproxy.log" >&2; die "haproxy did not start (see $LOG_DIR/fleet-haproxy.log)"; }
    notes+=("started")
fi
lb_up() {
    live_pid "$LB_PIDFILE" haproxy "$LB_CONF" >/dev/null &&
        ss -Hltn "sport = :${FLEET_LB_ADDR##*:}" | grep -qF "$FLEET_LB_ADDR" &&
        ss -Hltn "sport = :${SWARM_LB_ADDR##*:}" | grep -qF "$SWARM_LB_ADDR" &&
        ss -Hltn "sport = :${ACME_LB_ADDR##*:}" | grep -qF "$ACME_LB_ADDR"
}
wait_for 10 lb_up || die "haproxy not listening on $FLEET_LB_ADDR"
pid=$(live_pid "$LB_PIDFILE" haproxy "$LB_CONF")
status_notes "fleet load balancer" "haproxy on $FLEET_LB_ADDR -> 10.77.0.11-13:$FLEET_PROXY_PORT, $SWARM_LB_ADDR -> 10.77.0.11-13:$SWARM_APP_PORT, $ACME_LB_ADDR -> 10.77.0.13-11:$FLEET_PROXY_PORT, pid $pid" "${notes[@]}"

# ---------- 8. the swarm (issue 12) ----------
# One manager (host1), two workers. Why one: the tool keeps its state file and lock on the
# primary host, which must be a manager (it runs the docker service commands); three managers
# would add Raft quorum rules to a test bed whose hosts all die with the machine, and a quorum
# of three is lost when a test takes down one more. A real cluster wants three managers (see
# the README). Swarm state lives in each host's docker data root, so the swarm survives a
# testbed-down and comes back by itself; this section only repairs what is missing.
swarm_docker() { timeout 60 docker -H "unix://$(fleet_sock "$1")" "${@:2}"; }
swarm_info() { swarm_docker "$1" info --format "$2" 2>/dev/null; }
manager_ready() { [ "$(swarm_info "$SWARM_MANAGER" '{{.Swarm.ControlAvailable}}')" = true ]; }
node_state() { swarm_docker "$SWARM_MANAGER" node inspect -f '{{.Status.State}}' "$1" 2>/dev/null; }
node_ready() { [ "$(node_state "$1")" = ready ]; }
notes=()
m_state=$(swarm_info "$SWARM_MANAGER" '{{.Swarm.LocalNodeState}}')
if [ "$m_state" = active ] && ! manager_ready; then
    swarm_docker "$SWARM_MANAGER" swarm leave --force >/dev/null  # a worker of another swarm
    m_state=inactive
    notes+=("$SWARM_MANAGER left a swarm it did not manage")
fi
if [ "$m_state" != active ]; then
    swarm_docker "$SWARM_MANAGER" swarm init --advertise-addr "$(fleet_addr "$SWARM_MANAGER")" \
        --listen-addr "$(fleet_addr "$SWARM_MANAGER"):2377" --task-history-limit 2 >/dev/null ||
        die "docker swarm init on $SWARM_MANAGER failed"
    notes+=("swarm initialised on $SWARM_MANAGER")
fi
wait_for 30 manager_ready || die "$SWARM_MANAGER is not a swarm manager after 30 s"
for h in "${FLEET_HOSTS[@]}"; do
    [ "$h" = "$SWARM_MANAGER" ] && continue
    w_state=$(swarm_info "$h" '{{.Swarm.LocalNodeState}}')
    w_node=$(swarm_info "$h" '{{.Swarm.NodeID}}')
    if [ "$w_state" = active ] || [ "$w_state" = pending ]; then
        # Known to our manager: ready now, or after a restart within a bounded moment.
        if [ -n "$w_node" ] && [ -n "$(node_state "$w_node")" ] && wait_for 20 node_ready "$w_node"; then
            continue
        fi
        swarm_docker "$h" swarm leave --force >/dev/null 2>&1 || true
        notes+=("$h left a stale swarm")
    fi
    # The join token reaches `docker swarm join` as an argument of a local process only
    # (test bed; never printed or logged).
    token=$(swarm_docker "$SWARM_MANAGER" swarm join-token -q worker) || die "cannot read the worker token"
    swarm_docker "$h" swarm join --token "$token" --advertise-addr "$(fleet_addr "$h")" \
        --listen-addr "$(fleet_addr "$h"):2377" "$(fleet_addr "$SWARM_MANAGER"):2377" >/dev/null ||
        die "$h could not join the swarm"
    unset token
    notes+=("$h joined as a worker")
done
# Nodes left Down by an earlier leave and join (a new node ID for the same host) go away.
while read -r id state; do
    [ "$state" = down ] || continue
    swarm_docker "$SWARM_MANAGER" node rm --force "$id" >/dev/null 2>&1 && notes+=("stale node $id removed")
done < <(swarm_docker "$SWARM_MANAGER" node ls --format '{{.ID}} {{.Status}}' | tr '[:upper:]' '[:lower:]')
# Every node Ready and Active (a test that drains a node makes it active again itself).
nodes_ready() { [ "$(swarm_docker "$SWARM_MANAGER" node ls --format '{{.Status}}/{{.Availability}}' | grep -c '^Ready/Active$')" = "${#FLEET_HOSTS[@]}" ]; }
if ! nodes_ready; then
    for id in $(swarm_docker "$SWARM_MANAGER" node ls -q); do
        if [ "$(swarm_docker "$SWARM_MANAGER" node inspect -f '{{.Spec.Availability}}' "$id")" != active ]; then
            swarm_docker "$SWARM_MANAGER" node update --availability active "$id" >/dev/null
            notes+=("node $id made active")
        fi
    done
fi
wait_for 30 nodes_ready || { swarm_docker "$SWARM_MANAGER" node ls >&2; die "not every swarm node is Ready and Active after 30 s"; }
status_notes "fleet swarm" "$SWARM_MANAGER manager, ${#FLEET_HOSTS[@]} nodes ready; LB $SWARM_LB_ADDR -> :$SWARM_APP_PORT" "${notes[@]}"

# The demo's `cluster` environment (engine swarm) shares production's database and secrets
# (testbed-up.sh writes .env.production, its DATABASE_URL already on the fleet's gateway, which
# every node reaches): .env.cluster is that file with ENVIRONMENT=cluster, mode 600, rewritten
# only when it differs, so `inv deploy --env=cluster` works in examples/demo after this script.
ENV_DIR=$REPO/examples/demo/config/environments
[ -f "$ENV_DIR/.env.production" ] || die "$ENV_DIR/.env.production is missing: run scripts/testbed-up.sh first"
grep -q '^ENVIRONMENT=' "$ENV_DIR/.env.production" || die "$ENV_DIR/.env.production has no ENVIRONMENT line"
old_umask=$(umask); umask 077
write_file "$ENV_DIR/.env.cluster" 600 root:root < <(sed 's/^ENVIRONMENT=.*/ENVIRONMENT=cluster/' "$ENV_DIR/.env.production")
umask "$old_umask"
if [ "$WROTE" = 1 ]; then
    status "demo env cluster" "ok ($ENV_DIR/.env.cluster written from .env.production)"
else
    status "demo env cluster" "ok"
fi

# ---------- 9. end-to-end checks ----------
# Over SSH as deploy: plain `docker` reaches the host's own daemon; PostgreSQL answers from the
# host; containers on the host reach PostgreSQL and the outside (the Debian mirror, for apt).
ids=()
for h in "${FLEET_HOSTS[@]}"; do
    out=$(timeout 60 ssh -F "$SSH_CONFIG" -o BatchMode=yes -o ConnectTimeout=10 "togather-$h" \
        "hostname; docker info --format '{{.ID}} {{.DockerRootDir}}'; pg_isready -q -h $FLEET_GATEWAY -p $PG_PORT -t 5 && echo pg" 2>&1) ||
        { printf '%s\n' "$out" >&2; die "ssh togather-$h check failed"; }
    read -r name id root pg <<<"$(printf '%s' "$out" | paste -sd' ' -)"
    [ "$name" = "$h" ] || die "togather-$h: hostname is '$name'"
    [ "$root" = "$FLEET_STATE/$h/docker" ] || die "togather-$h: docker over SSH reaches $root, not $h's daemon"
    [ "$pg" = pg ] || die "togather-$h: PostgreSQL on $FLEET_GATEWAY:$PG_PORT does not answer"
    ids+=("$id")
    status "ssh $DEPLOY_USER@togather-$h" "ok (hostname $name, docker $root, postgres reachable)"
done
[ "$(printf '%s\n' "${ids[@]}" | sort -u | wc -l)" = "${#FLEET_HOSTS[@]}" ] || die "fleet daemons share an ID"

# A container on host1 reaches PostgreSQL and the Debian mirror (what `RUN apt-get` needs).
mirror=$(sed -n 's,^URIs: *http://\([^/]*\)/.*,\1,p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mirror=${mirror:-deb.debian.org}
if ! out=$(timeout 60 docker -H "unix://$(fleet_sock host1)" run --rm --network bridge "$BASE_IMAGE" \
        bash -c "exec 3<>/dev/tcp/$FLEET_GATEWAY/$PG_PORT && exec 4<>/dev/tcp/$mirror/80 && echo ok" 2>&1) ||
        [ "$out" != ok ]; then
    printf '%s\n' "$out" >&2
    die "a container on host1 cannot reach $FLEET_GATEWAY:$PG_PORT and $mirror:80 (check the iptables rules)"
fi
status "fleet egress" "ok (a container on host1 reaches postgres and $mirror:80)"

# Registry round trip: push from the root daemon, pull by digest on host1 (once per registry).
REF=$FLEET_REGISTRY_NAME:$FLEET_REGISTRY_PORT/togather/base
if curl -fsS -m 5 "http://$FLEET_GATEWAY:$FLEET_REGISTRY_PORT/v2/togather/base/tags/list" 2>/dev/null | grep -q '"bookworm-slim"'; then
    status "fleet registry round trip" "ok"
else
    docker tag "$BASE_IMAGE" "$REF:bookworm-slim"
    out=$(timeout 300 docker push "$REF:bookworm-slim" 2>&1) || { printf '%s\n' "$out" >&2; die "docker push $REF failed"; }
    digest=$(printf '%s\n' "$out" | sed -n 's/.*digest: \(sha256:[0-9a-f]*\).*/\1/p' | tail -n1)
    [ -n "$digest" ] || die "docker push printed no digest"
    timeout 300 docker -H "unix://$(fleet_sock host1)" pull -q "$REF@$digest" >/dev/null ||
        die "host1 could not pull $REF@$digest"
    status "fleet registry round trip" "ok (pushed $REF:bookworm-slim from the root daemon, host1 pulled it by digest)"
fi

status "fleet testbed" "ready in $SECONDS s"
