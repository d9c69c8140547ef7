"""HTTPS at the edge, the pure part: the `proxy.tls` settings and their checks (run at every
config load, before anything changes), the nginx pieces the proxy's site config is built from,
and what the ACME client on each host is told. No SSH here (certs.py runs things on hosts).

Two ways to a certificate:
- `acme`: obtained on the host by lego (HTTP-01 through the proxy's HTTP port) on the first
  deploy that needs it, renewed there by the long-running `acme` Compose service;
- `certificate` + `key`: files the operator provides, uploaded to the host.

Either way nginx finds the certificate and its key in one file, `tls/site.pem`, named through a
variable so nginx reads it at each TLS handshake (nginx 1.15.9+): a renewal replaces the file
atomically and needs no reload at all.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import ssl
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID

q = shlex.quote
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
DEFAULT_RENEW_BEFORE_DAYS = 30
# Inside the proxy container: <remote_dir>/nginx/upstream is mounted at /etc/nginx/togather.
PROXY_CONF_DIR = "/etc/nginx/togather"
APP_INCLUDE = "/etc/nginx/togather-app.conf"
# One file with the key and the chain (mode 600, owned by the nginx worker) and a public copy of
# the chain for inspection (certs.show reads it as the deploy user).
SITE_PEM = "site.pem"
SITE_CRT = "site.crt"
CHALLENGE_PATH = "/.well-known/acme-challenge/"
# RFC 1123 labels; at least two of them; lowercase (nginx and ACME compare names lowercased).
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})+$")
EMAIL_RE = re.compile(r"^[^@\s'\"\\]+@[^@\s'\"\\]+\.[^@\s'\"\\]+$")


@dataclass(frozen=True)
class AcmeSettings:
    email: str
    directory: str
    ca_bundle: Path | None  # local file: a private ACME server's CA (the test bed's Pebble)
    renew_before_days: int
    # A fleet's proxies, `address:port` as the hosts reach each other (acme.peers): where a
    # challenge this host has no file for is asked for (empty: one host, nothing to ask).
    peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsSettings:
    """`proxy.tls` of one environment, resolved: paths absolute, defaults applied."""

    domains: tuple[str, ...]
    https_port: int
    redirect: bool
    hsts: int | None  # max-age in seconds, None: no Strict-Transport-Security header
    acme: AcmeSettings | None
    certificate: Path | None
    key: Path | None
    # What the served certificate is checked against (inv health): None, the system trust
    # store; a private ACME server's issuing root otherwise (the test bed's Pebble).
    verify_ca: Path | None = None

    @property
    def server_name(self) -> str:
        """The name asked for in SNI (health checks, verification)."""
        return self.domains[0]


def _path(root: Path, value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def resolve(raw: dict[str, Any], root: Path, https_port: int, hosts: tuple[str, ...] = (),
            proxy_port: int = 80) -> TlsSettings:
    """The settings of a `proxy.tls` block that passed `problems` (and, for the environment's
    `hosts`, `fleet_problems`). Relative paths are relative to the project's root, like the
    secrets file."""
    acme = raw.get("acme")
    certificate = _path(root, raw.get("certificate"))
    domains = tuple(d.lower() for d in (acme or raw).get("domains") or ())
    if not domains and certificate:
        domains = certificate_names(load_chain(certificate.read_bytes())[0])
    hsts = raw.get("hsts", False)
    return TlsSettings(
        domains=domains,
        https_port=https_port,
        redirect=raw.get("redirect", True),
        hsts=None if hsts is False else int(hsts),
        acme=AcmeSettings(
            email=acme["email"],
            directory=acme.get("directory", LETS_ENCRYPT),
            ca_bundle=_path(root, acme.get("ca_bundle")),
            renew_before_days=acme.get("renew_before_days", DEFAULT_RENEW_BEFORE_DAYS),
            peers=tuple(_host_port(address, proxy_port)
                        for address in peer_addresses(acme, hosts).values()),
        ) if acme else None,
        certificate=certificate,
        key=_path(root, raw.get("key")),
        verify_ca=_path(root, raw.get("verify_ca")),
    )


# --- checks ---------------------------------------------------------------------------------


def domain_problem(domain: str) -> str | None:
    if domain.startswith("*."):
        return (f"{domain}: a wildcard needs the DNS-01 challenge; the ACME client here uses "
                "HTTP-01: list each name")
    try:
        ipaddress.ip_address(domain)
    except ValueError:
        pass
    else:
        return f"{domain}: an IP address, not a domain name"
    if not DOMAIN_RE.match(domain):
        return (f"{domain!r} is not a valid domain name (lowercase letters, digits, dashes and "
                "dots, at least two labels, e.g. app.example.com)")
    return None


def problems(raw: dict[str, Any], root: Path, where: str, *,
             now: datetime | None = None) -> list[str]:
    """Everything wrong with a `proxy.tls` block, each as `where.key: what and the fix`.
    Reads the local files it names (never printing their content)."""
    now = now or datetime.now(UTC)
    acme, certificate, key = raw.get("acme"), raw.get("certificate"), raw.get("key")
    found = _bundle_problems(_path(root, raw.get("verify_ca")), f"{where}.verify_ca")
    if acme and (certificate or key):
        return [*found, f"{where}: give either acme (certificates obtained automatically) or "
                        "certificate + key (files you provide), not both"]
    if not acme and not (certificate or key):
        return [*found, f"{where}: give either acme: {{domains: [...], email: ...}} or "
                        "certificate: <file> + key: <file>"]
    if acme:
        return found + _acme_problems(acme, root, f"{where}.acme")
    return found + _provided_problems(raw, root, where, now)


def _acme_problems(acme: dict[str, Any], root: Path, where: str) -> list[str]:
    found = []
    domains = acme.get("domains") or []
    if not domains:
        found.append(f"{where}.domains: missing: list the domain names the certificate is for "
                     "(e.g. [app.example.com])")
    found += [f"{where}.domains: {p}" for d in domains if (p := domain_problem(d))]
    if not acme.get("email"):
        found.append(f"{where}.email: missing: the contact address the ACME server sends "
                     "expiry notices to")
    elif not EMAIL_RE.match(acme["email"]):
        found.append(f"{where}.email: {acme['email']!r} is not an e-mail address")
    return found + _bundle_problems(_path(root, acme.get("ca_bundle")), f"{where}.ca_bundle")


# --- a fleet behind a load balancer ----------------------------------------------------------
# The ACME server's HTTP-01 request reaches the load balancer, which may send it to any host:
# every host answers every host's challenge (its own webroot first, then its peers).

# Let's Encrypt issues at most this many new certificates per week for one exact set of names;
# each host of a fleet obtains its own.
LETS_ENCRYPT_DUPLICATE_LIMIT = 5


def host_address(host: str) -> str | None:
    """The IP address an SSH host entry (`[user@]address[:port]`) names, None for a name (an
    ~/.ssh/config alias or a DNS name: not necessarily what the hosts call each other)."""
    name = host.rpartition("@")[2].partition(":")[0]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None


def peer_addresses(acme: dict[str, Any], hosts: tuple[str, ...]) -> dict[str, str]:
    """Each host's address for its peers: acme.peers, else the address in the host entry.
    Empty for one host (nothing to forward to)."""
    if len(hosts) < 2:
        return {}
    given = acme.get("peers") or {}
    return {host: str(given.get(host) or host_address(host)) for host in hosts}


def fleet_problems(raw: dict[str, Any], hosts: tuple[str, ...], bind: str,
                   where: str) -> list[str]:
    """A fleet (several hosts) with ACME: each host's address for its peers (acme.peers, or
    an IP address as the host entry), valid, distinct, not loopback; the proxy listening on
    every address (its peers reach it on the host's own)."""
    acme = raw.get("acme")
    if not acme or len(hosts) < 2:
        return []
    given = acme.get("peers") or {}
    found = [f"{where}.acme.peers: {name!r} is not a host of this environment (its hosts: "
             f"{', '.join(hosts)})" for name in given if name not in hosts]
    missing = [h for h in hosts if h not in given and host_address(h) is None]
    if missing:
        example = ", ".join(f"{h}: 10.0.0.{11 + i}" for i, h in enumerate(hosts))
        found.append(
            f"{where}.acme.peers: missing for {', '.join(missing)}: a fleet with ACME answers "
            "each host's HTTP-01 challenge on every host (the load balancer may send the "
            "ACME server's request to any of them), so each host needs the address the "
            "others reach its proxy at (a private one), e.g. peers: {" + example + "}")
    seen: dict[str, str] = {}
    for host, value in given.items():
        problem = _peer_problem(str(value))
        if problem:
            found.append(f"{where}.acme.peers.{host}: {problem}")
            continue
        address = str(ipaddress.ip_address(value))
        if address in seen:
            found.append(f"{where}.acme.peers.{host}: {value} is also the address of "
                         f"{seen[address]}")
        seen[address] = host
    if bind not in ("0.0.0.0", "::"):  # noqa: S104 - comparing, not binding
        found.append(f"proxy.bind: {bind}: a fleet with ACME forwards challenges between the "
                     "hosts' proxies, each at its own address: bind 0.0.0.0")
    return found


def _peer_problem(value: str) -> str | None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return (f"{value!r} is not an IP address (nginx would resolve a name once, at "
                "start: give the address itself)")
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        return f"{value} cannot reach another host (loopback, unspecified or multicast)"
    return None


def fleet_warnings(raw: dict[str, Any], hosts: tuple[str, ...]) -> list[str]:
    """More hosts than Let's Encrypt issues certificates per week for one set of names: each
    host obtains its own, so the later hosts' orders are refused until the week passes."""
    acme = raw.get("acme")
    if not acme or acme.get("directory", LETS_ENCRYPT) != LETS_ENCRYPT \
            or len(hosts) <= LETS_ENCRYPT_DUPLICATE_LIMIT:
        return []
    return [f"proxy.tls.acme: {len(hosts)} hosts each obtain their own certificate for "
            f"{', '.join(acme.get('domains') or [])}, and Let's Encrypt issues at most "
            f"{LETS_ENCRYPT_DUPLICATE_LIMIT} new certificates per week for one exact set of "
            "names: the first deploy (or a change of domains) fails on the later hosts "
            "(rateLimited) until the week passes. Use at most "
            f"{LETS_ENCRYPT_DUPLICATE_LIMIT} hosts per set of names, a certificate you provide "
            "(certificate + key, uploaded to every host), or TLS at the load balancer"]


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _bundle_problems(bundle: Path | None, where: str) -> list[str]:
    if bundle is None:
        return []
    data, problem = _read(bundle, where)
    if problem:
        return [problem]
    if not _certificates_in(data):
        return [f"{where}: {bundle} holds no PEM certificate"]
    return []


def _provided_problems(raw: dict[str, Any], root: Path, where: str, now: datetime) -> list[str]:
    certificate, key = _path(root, raw.get("certificate")), _path(root, raw.get("key"))
    if not certificate or not key:
        missing = "key" if certificate else "certificate"
        return [f"{where}.{missing}: missing: a provided certificate needs both certificate "
                "and key"]
    found = [f"{where}.domains: {p}" for d in raw.get("domains") or []
             if (p := domain_problem(d))]
    cert_data, problem = _read(certificate, f"{where}.certificate")
    key_data, key_problem = _read(key, f"{where}.key")
    found += [p for p in (problem, key_problem) if p]
    if not key_problem:
        mode = stat.S_IMODE(key.stat().st_mode)
        if mode & 0o077:
            found.append(f"{where}.key: {key} has mode {mode:03o}: a private key must not be "
                         f"readable by group or others: run `chmod 600 {key}`")
    if problem or key_problem:
        return found
    try:
        chain = load_chain(cert_data)
    except ValueError:
        return [*found, f"{where}.certificate: {certificate} is not a PEM certificate"]
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        return [*found, f"{where}.key: {key} is encrypted with a passphrase: nginx cannot "
                        "use it unattended; give the key without a passphrase (mode 600)"]
    except ValueError:
        return [*found, f"{where}.key: {key} is not a PEM private key"]
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(private.public_key()):
        found.append(f"{where}.key: {key} does not match the certificate {certificate} "
                     "(a key of another certificate?)")
    if leaf.not_valid_after_utc <= now:
        found.append(f"{where}.certificate: {certificate} expired on "
                     f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: renew it")
    names = certificate_names(leaf)
    for domain in raw.get("domains") or []:
        if not domain_problem(domain) and not covers(names, domain):
            found.append(f"{where}.domains: {domain} is not covered by the certificate "
                         f"{certificate} (it names {', '.join(names) or 'no domain'})")
    if not raw.get("domains") and not names:
        found.append(f"{where}.domains: the certificate {certificate} names no DNS domain: "
                     "list the domains it serves")
    return found


def _read(path: Path, where: str) -> tuple[bytes, str | None]:
    try:
        return path.read_bytes(), None
    except FileNotFoundError:
        return b"", f"{where}: {path}: file not found"
    except IsADirectoryError:
        return b"", f"{where}: {path} is a directory, not a file"
    except OSError as exc:
        return b"", f"{where}: {path}: cannot read ({exc.strerror})"


def _certificates_in(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def load_chain(data: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM file, leaf first; ValueError when there is none."""
    return x509.load_pem_x509_certificates(data)


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower() for n in san.value.get_values_for_type(x509.DNSName))


def covers(names: tuple[str, ...], domain: str) -> bool:
    """Whether a certificate naming `names` is valid for `domain` (one-label wildcards)."""
    for name in names:
        if name == domain:
            return True
        if name.startswith("*.") and domain.partition(".")[2] == name[2:]:
            return True
    return False


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator wants to know about a certificate being served."""

    domains: tuple[str, ...]
    issuer: str
    not_after: datetime
    serial: str

    def days_left(self, now: datetime | None = None) -> float:
        now = now or datetime.now(UTC)
        return (self.not_after - now).total_seconds() / 86400

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        return {"domains": list(self.domains), "issuer": self.issuer,
                "not_after": self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "days_left": round(self.days_left(now), 1), "serial": self.serial}


def describe(cert: x509.Certificate) -> CertificateInfo:
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertificateInfo(
        domains=certificate_names(cert),
        issuer=str(issuer[0].value) if issuer else cert.issuer.rfc4514_string(),
        not_after=cert.not_valid_after_utc,
        serial=format(cert.serial_number, "x"),
    )


PROVIDED = "provided"


def needs_certificate(tls: TlsSettings, current: CertificateInfo | None,
                      now: datetime | None = None, issued_by: str | None = None) -> str | None:
    """Why the ACME client must obtain a certificate now (None: the one on the host serves):
    none yet, another source (`issued_by`: the directory it came from, or PROVIDED; None
    when unknown), the domains changed, or it is within the renewal window (the renewal
    service should have renewed it; a deploy does not serve one about to expire)."""
    if tls.acme is None:
        return None
    if current is None:
        return "no certificate on the host yet"
    if issued_by == PROVIDED:
        return "the certificate on the host was provided, not issued by the ACME server"
    if issued_by and issued_by != tls.acme.directory:
        return f"the ACME server changed ({issued_by} -> {tls.acme.directory})"
    if set(current.domains) != set(tls.domains):
        return (f"the domains changed ({', '.join(current.domains)} -> "
                f"{', '.join(tls.domains)})")
    if current.days_left(now) < tls.acme.renew_before_days:
        return f"it expires in {current.days_left(now):.0f} days"
    return None


# --- checking what a proxy serves ------------------------------------------------------------

CertificateVerificationError = ssl.SSLCertVerificationError


def probe_context() -> ssl.SSLContext:
    """For the internal checks through the proxy (the switch verification): TLS without
    verification, the certificate is reported separately."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verify_context(trust: Path | None) -> ssl.SSLContext:
    """For the expiry report: the system trust store, or the configured CA file."""
    return ssl.create_default_context(cafile=str(trust) if trust else None)


# --- nginx ----------------------------------------------------------------------------------


def https_server_block(tls: TlsSettings, listen: str, limits: str = "") -> str:
    """The HTTPS server of the proxy's site config (http level). The certificate path holds a
    variable, so nginx reads the file at each handshake: a renewal needs no reload. Session
    cache and tickets let returning clients skip the full handshake."""
    # togather-app.conf adds the header from this variable (empty, hence no header, unless
    # set here after the include): a server-level add_header would not reach its location.
    hsts = f'    set $togather_hsts "max-age={tls.hsts}";\n' if tls.hsts else ""
    return (
        "map $ssl_server_name $togather_tls_file {\n"
        f"    default {PROXY_CONF_DIR}/tls/{SITE_PEM};\n"
        "}\n"
        "server {\n"
        f"    listen {listen} ssl http2;\n"
        "    ssl_certificate $togather_tls_file;\n"
        "    ssl_certificate_key $togather_tls_file;\n"
        "    ssl_protocols TLSv1.2 TLSv1.3;\n"
        "    ssl_prefer_server_ciphers off;\n"
        "    ssl_session_cache shared:togather_tls:10m;\n"
        "    ssl_session_timeout 1d;\n"
        "    ssl_session_tickets on;\n"
        f"{limits}"
        f"    include {APP_INCLUDE};\n"
        f"{hsts}"
        "}\n"
    )


def http_locations(tls: TlsSettings | None) -> str:
    """What the plain HTTP server serves: without TLS, the app; with it, the ACME challenge
    files (always over HTTP, that is how HTTP-01 works), then the app or, when `redirect` is
    on, a 301 to the same URL over HTTPS."""
    if tls is None:
        return f"    include {APP_INCLUDE};\n"
    port = "" if tls.https_port == 443 else f":{tls.https_port}"
    rest = (f"    location / {{\n        return 301 https://$host{port}$request_uri;\n    }}\n"
            if tls.redirect else f"    include {APP_INCLUDE};\n")
    peers = tls.acme.peers if tls.acme else ()
    return (f"    location ^~ {CHALLENGE_PATH} {{\n"
            f"        root {PROXY_CONF_DIR}/acme;\n"
            "        default_type text/plain;\n"
            f"        try_files $uri {'@togather_acme_peers' if peers else '=404'};\n"
            "    }\n"
            f"{_peers_location(len(peers)) if peers else ''}"
            f"{rest}")


# A challenge asked for by a peer carries this header: answered from the webroot or 404,
# never forwarded again, so a request travels one hop at most (no loop, whatever the peers).
ACME_HOP_HEADER = "X-Togather-Acme-Hop"
# An HTTP-01 token's path: the token is base64url (RFC 8555, 8.1).
CHALLENGE_PATH_RE = r"/\.well-known/acme-challenge/[A-Za-z0-9_-]+$"
PEER_CONNECT_TIMEOUT = "1s"
PEER_READ_TIMEOUT = "3s"
PEER_TOTAL_TIMEOUT = "8s"


def acme_peers_block(tls: TlsSettings | None) -> str:
    """The http-level part of challenge forwarding in a fleet (empty otherwise): which
    requests are forwarded, the peers' proxies as one upstream group, every host's own
    address included (the same site.conf on every host; asked by itself, a host answers 404
    from the webroot it just looked in, and nginx moves on), and the log line of each
    forwarded challenge. max_fails=0: a 404 or a
    host down never takes a peer out of the group (a challenge is rare; its token may be
    on the host that just came back)."""
    if tls is None or tls.acme is None or not tls.acme.peers:
        return ""
    servers = "".join(f"    server {peer} max_fails=0;\n" for peer in tls.acme.peers)
    return ("upstream togather_acme_peers {\n"
            f"{servers}"
            "}\n"
            # Forwarded: no hop header, and a token as ACME makes them (base64url), nothing
            # else: no other path of a peer is reached from its neighbours' addresses.
            'map "$http_x_togather_acme_hop:$uri" $togather_acme_forwarded {\n'
            f'    "~^:{CHALLENGE_PATH_RE}" 1;\n'
            "    default 0;\n"
            "}\n"
            "log_format togather_acme 'acme-challenge $uri not in the webroot here: asked "
            "$upstream_addr, answered $upstream_status, sent $status';\n")


def _peers_location(peers: int) -> str:
    """Where a challenge this host has no file for goes: each peer in turn until one has it
    (a 404, an error or a timeout moves on; at most one try per peer, 8 s in all). The hop
    header marks the request for the peer; one with the header, or for anything but a
    token, is never forwarded (acme_peers_block's map)."""
    return ("    location @togather_acme_peers {\n"
            "        if ($togather_acme_forwarded = 0) {\n"
            "            return 404;\n"
            "        }\n"
            "        access_log /dev/stdout togather_acme if=$togather_acme_forwarded;\n"
            "        proxy_pass http://togather_acme_peers;\n"
            "        proxy_set_header Host $host;\n"
            f"        proxy_set_header {ACME_HOP_HEADER} 1;\n"
            "        proxy_pass_request_body off;\n"
            '        proxy_set_header Content-Length "";\n'
            f"        proxy_connect_timeout {PEER_CONNECT_TIMEOUT};\n"
            f"        proxy_read_timeout {PEER_READ_TIMEOUT};\n"
            f"        proxy_send_timeout {PEER_READ_TIMEOUT};\n"
            "        proxy_next_upstream error timeout http_404 http_502 http_503 http_504;\n"
            f"        proxy_next_upstream_tries {peers};\n"
            f"        proxy_next_upstream_timeout {PEER_TOTAL_TIMEOUT};\n"
            "    }\n")


# --- the ACME client's configuration on the host ---------------------------------------------


def acme_env(tls: TlsSettings, *, reuse_key: bool) -> str:
    """`<remote_dir>/acme/acme.env`, read by togather-acme in the acme container (line by line,
    never sourced). Every value was validated: no blank, quote or line break.

    `reuse_key`: a renewal keeps the private key. The nginx engine needs it: at each handshake
    nginx opens the certificate and then the key, two reads of tls/site.pem; a renewal with a
    new key renamed in between pairs the old certificate with the new key and fails that
    handshake ("key values mismatch"). With the key kept, either pairing matches."""
    assert tls.acme is not None
    lines = {
        "ACME_DOMAINS": ",".join(tls.domains),
        "ACME_EMAIL": tls.acme.email,
        "ACME_DIRECTORY": tls.acme.directory,
        "ACME_RENEW_DAYS": str(tls.acme.renew_before_days),
        "ACME_CA_BUNDLE": "/acme/ca-bundle.pem" if tls.acme.ca_bundle else "",
        "ACME_REUSE_KEY": "1" if reuse_key else "0",
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())
