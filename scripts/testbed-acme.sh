#!/usr/bin/env bash
# The ACME part of the test bed (issue 10): Debian's `pebble` (Let's Encrypt's test ACME server)
# and its `pebble-challtestsrv` as the DNS server for test domains. Run as root on Debian 12;
# scripts/testbed-up.sh calls it at the end, `make testbed-down` stops both processes by pid.
#
#   pebble-challtestsrv  DNS on 127.0.0.1:8053: every name resolves to 127.0.0.1 (A only, no
#                        AAAA), management API on 127.0.0.1:8055 (tests add per-domain A records
#                        with POST /add-a, e.g. a test proxy bound to another loopback address).
#   pebble               ACME directory https://127.0.0.1:14000/dir (listening on every address
#                        of the root namespace, so the fleet hosts reach it as 10.77.0.1:14000),
#                        management API https://127.0.0.1:15000. It resolves domains through
#                        challtestsrv and validates HTTP-01 on port 9080: the staging proxy's HTTP
#                        port of the demo. Certificates are for test domains only; the issuing
#                        root is new at each pebble start (kept in memory), so it is rewritten to
#                        /etc/togather-testbed/acme-root.pem on every run.
#
# Debian's package ships neither Pebble's test certificates nor its minica (the +ds source drops
# test/), so the API's TLS certificate comes from a CA made here once with openssl:
# /etc/togather-testbed/pebble/api-ca.pem is what an ACME client trusts (the demo's `ca_bundle`).
#
# Idempotent (a second run prints only the status line), every wait bounded, nothing secret.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd /

RUN_DIR=/run/togather-testbed
LOG_DIR=/var/log/togather-testbed
CONF_DIR=/etc/togather-testbed
PEBBLE_CONF_DIR=$CONF_DIR/pebble
PEBBLE_CONFIG=$PEBBLE_CONF_DIR/pebble-config.json
API_CA=$PEBBLE_CONF_DIR/api-ca.pem
API_CA_KEY=$PEBBLE_CONF_DIR/api-ca.key
API_CERT=$PEBBLE_CONF_DIR/api-cert.pem
API_KEY=$PEBBLE_CONF_DIR/api-key.pem
ACME_ROOT=$CONF_DIR/acme-root.pem
PEBBLE_PIDFILE=$RUN_DIR/pebble.pid
DNS_PIDFILE=$RUN_DIR/pebble-challtestsrv.pid
DNS_ADDR=127.0.0.1:8053
DNS_MGMT=127.0.0.1:8055
ACME_PORT=14000
MGMT_PORT=15000
HTTP01_PORT=9080        # the demo's staging proxy (examples/demo/config/deployment.yml)
TLSALPN01_PORT=5001     # unused: the product asks for HTTP-01 only

export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

# shellcheck source=scripts/testbed-lib.sh
. "$REPO/scripts/testbed-lib.sh"

die() { printf 'testbed-acme: ERROR: %s\n' "$*" >&2; exit 1; }
wait_for() {
    local limit=$1 i
    shift
    for ((i = 0; i < limit * 5; i++)); do
        "$@" && return 0
        sleep 0.2
    done
    "$@"
}

[ "$(id -u)" -eq 0 ] || die "must run as root"
mkdir -p "$RUN_DIR" "$LOG_DIR" "$PEBBLE_CONF_DIR"
chmod 755 "$PEBBLE_CONF_DIR"
# testbed-up.sh holds the test bed lock already and says so; run alone, take it here.
if [ "${TOGATHER_TESTBED_LOCK_HELD:-}" != 1 ]; then
    exec 9>"$RUN_DIR/lock"
    flock -w 900 9 || die "another testbed-up/down holds $RUN_DIR/lock"
fi
notes=()

# ---------- package ----------
missing=()
for p in pebble openssl curl; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    {
        timeout 900 apt-get update &&
        timeout 1800 apt-get install -y -o Dpkg::Options::=--force-confold "${missing[@]}"
    } >>"$LOG_DIR/apt.log" 2>&1 9>&- || { tail -n 30 "$LOG_DIR/apt.log" >&2; die "apt-get failed (see $LOG_DIR/apt.log)"; }
    notes+=("installed ${missing[*]}")
fi

# ---------- the API's TLS certificate (a CA of our own, made once) ----------
if [ ! -s "$API_CA" ] || [ ! -s "$API_CA_KEY" ]; then
    rm -f "$API_CA" "$API_CA_KEY" "$API_CERT" "$API_KEY"
    (umask 077; openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=togather test bed pebble API CA" -keyout "$API_CA_KEY" -out "$API_CA" \
        >>"$LOG_DIR/pebble.log" 2>&1) || die "could not create the pebble API CA"
    chmod 644 "$API_CA"
    notes+=("API CA created")
fi
if [ ! -s "$API_CERT" ] || [ ! -s "$API_KEY" ] ||
        ! openssl verify -CAfile "$API_CA" "$API_CERT" >/dev/null 2>&1 ||
        ! openssl x509 -in "$API_CERT" -noout -checkend 2592000 >/dev/null 2>&1; then
    csr=$(mktemp)
    ext=$(mktemp)
    trap 'rm -f "$csr" "$ext"' EXIT
    printf 'subjectAltName=DNS:localhost,DNS:pebble.togather.test,IP:127.0.0.1,IP:10.77.0.1\n' >"$ext"
    (umask 077; openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=localhost" -keyout "$API_KEY" -out "$csr" >>"$LOG_DIR/pebble.log" 2>&1 &&
     openssl x509 -req -in "$csr" -CA "$API_CA" -CAkey "$API_CA_KEY" -CAcreateserial \
        -days 825 -extfile "$ext" -out "$API_CERT" >>"$LOG_DIR/pebble.log" 2>&1) ||
        die "could not issue the pebble API certificate"
    chmod 644 "$API_CERT"
    rm -f "$csr" "$ext"
    notes+=("API certificate issued")
fi

# ---------- pebble's config ----------
config=$(cat <<EOF
{
  "pebble": {
    "listenAddress": "0.0.0.0:$ACME_PORT",
    "managementListenAddress": "127.0.0.1:$MGMT_PORT",
    "certificate": "$API_CERT",
    "privateKey": "$API_KEY",
    "httpPort": $HTTP01_PORT,
    "tlsPort": $TLSALPN01_PORT,
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false
  }
}
EOF
)
config_changed=0
if [ "$(cat "$PEBBLE_CONFIG" 2>/dev/null)" != "$config" ]; then
    printf '%s\n' "$config" >"$PEBBLE_CONFIG.tmp"
    mv -f "$PEBBLE_CONFIG.tmp" "$PEBBLE_CONFIG"
    config_changed=1
fi

# stop_pid NAME PID: SIGTERM, bounded wait, SIGKILL.
stop_pid() {
    local pid=$2 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do [ -d "/proc/$pid" ] || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}
listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# ---------- the DNS server ----------
dns_match="-dns01 $DNS_ADDR"
if ! dns_pid=$(live_pid "$DNS_PIDFILE" pebble-challtes "$dns_match"); then
    listening "${DNS_MGMT##*:}" && die "something else listens on $DNS_MGMT"
    setsid pebble-challtestsrv -defaultIPv4 127.0.0.1 -defaultIPv6 "" -dns01 "$DNS_ADDR" \
        -management "$DNS_MGMT" -http01 "" -https01 "" -tlsalpn01 "" \
        </dev/null >>"$LOG_DIR/pebble-challtestsrv.log" 2>&1 9>&- &
    echo $! >"$DNS_PIDFILE"
    notes+=("challtestsrv started")
fi
dns_up() { listening "${DNS_MGMT##*:}" && listening "${DNS_ADDR##*:}"; }
wait_for 20 dns_up || { tail -n 20 "$LOG_DIR/pebble-challtestsrv.log" >&2; die "pebble-challtestsrv not answering on $DNS_MGMT"; }
dns_pid=$(live_pid "$DNS_PIDFILE" pebble-challtes "$dns_match") || die "challtestsrv answers but is not the process in $DNS_PIDFILE"

# ---------- pebble ----------
if pid=$(live_pid "$PEBBLE_PIDFILE" pebble "$PEBBLE_CONFIG") && [ "$config_changed" = 1 ]; then
    stop_pid pebble "$pid"
    notes+=("pebble restarted for its new config")
fi
if ! pid=$(live_pid "$PEBBLE_PIDFILE" pebble "$PEBBLE_CONFIG"); then
    listening "$ACME_PORT" && die "something else listens on port $ACME_PORT"
    # PEBBLE_VA_NOSLEEP: validate at once; PEBBLE_WFE_NONCEREJECT=0: no random bad-nonce errors.
    PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 setsid pebble -config "$PEBBLE_CONFIG" \
        -dnsserver "$DNS_ADDR" </dev/null >>"$LOG_DIR/pebble.log" 2>&1 9>&- &
    echo $! >"$PEBBLE_PIDFILE"
    notes+=("pebble started")
fi
pebble_up() { curl -fsS -m 2 --cacert "$API_CA" -o /dev/null "https://127.0.0.1:$ACME_PORT/dir" 2>/dev/null; }
wait_for 20 pebble_up || { tail -n 20 "$LOG_DIR/pebble.log" >&2; die "pebble not answering on https://127.0.0.1:$ACME_PORT/dir"; }
pid=$(live_pid "$PEBBLE_PIDFILE" pebble "$PEBBLE_CONFIG") || die "pebble answers but is not the process in $PEBBLE_PIDFILE"

# ---------- the issuing root, for clients that verify what pebble issued ----------
root=$(curl -fsS -m 5 --cacert "$API_CA" "https://127.0.0.1:$MGMT_PORT/roots/0") ||
    die "cannot read pebble's root certificate from https://127.0.0.1:$MGMT_PORT/roots/0"
if [ "$(cat "$ACME_ROOT" 2>/dev/null)" != "$root" ]; then
    printf '%s\n' "$root" >"$ACME_ROOT.tmp"
    chmod 644 "$ACME_ROOT.tmp"
    mv -f "$ACME_ROOT.tmp" "$ACME_ROOT"
    notes+=("root written")
fi

detail="directory https://127.0.0.1:$ACME_PORT/dir, HTTP-01 on port $HTTP01_PORT, DNS $DNS_ADDR, pebble $pid, challtestsrv $dns_pid"
note_text=$(printf '%s, ' "${notes[@]}"); note_text=${note_text%, }
printf 'acme: ok (%s%s)\n' "$detail" "${note_text:+; $note_text}"
