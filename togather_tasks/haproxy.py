"""The site configuration of the HAProxy engine (`proxy.engine: haproxy`), pure: the frontends
(plain HTTP; HTTPS when proxy.tls is on) and one backend per slot, loaded after the image's
haproxy.cfg (docker/haproxy). It reads the same files on the host as the nginx engine: the slot
marker, the maintenance link, the verification token, the ACME webroot and tls/site.pem.

Why HAProxy is the default engine (nginx the other): on the 2-core test bed, with the proxy in
a CPU cgroup of its own, nginx's HTTPS path holds 81-83 % of the direct throughput and HAProxy,
doing the same to each request (the slot and maintenance lookups included), 92-94 % (README,
"Sustained throughput"); over HTTP 100 % and 108-110 %. The slot and the maintenance flag
are looked up in an in-memory map that togather.lua keeps in line with the files (20 ms), so a
request costs no system call, and the switch is still a rename(2) on the host that survives a
proxy restart and a reboot.
"""

from __future__ import annotations

import re
from typing import Any

from .tls import ACME_HOP_HEADER, PEER_CONNECT_TIMEOUT, PEER_READ_TIMEOUT, TlsSettings

RUNTIME_MAP = "/run/togather/runtime.map"
VERIFY_LIST = "/run/togather/verify.lst"
# tls/site.pem, or the image's placeholder until it exists (togather.lua writes it at load).
CRT_LIST = "/run/togather/crt.list"
# togather.lua checks the slot marker and the maintenance link every POLL seconds
# (POLL_MS): a change is in the proxy's map within one POLL, after any request it is answering.
POLL = 0.02
CHALLENGE_RE = r"^/\.well-known/acme-challenge/[A-Za-z0-9_-]+$"
_UNITS = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
# What site_changes names: the listen addresses, each slot's server and pool, the read timeout
# and the body limit.
_DIRECTIVE = re.compile(r"^[ \t]*(bind|server \S+|timeout server) (\S+)|(pool-max-conn) (\S+)"
                        r"|(content-length\)) gt (\d+)", re.MULTILINE)


def body_bytes(size: str | int) -> int:
    """proxy.max_body_size (nginx's size syntax, config.BODY_SIZE) in bytes; 0: no limit."""
    text = str(size).lower()
    if text[-1:] in _UNITS:
        return int(text[:-1]) * _UNITS[text[-1]]
    return int(text)


def directives(text: str) -> list[tuple[str, str]]:
    """`(what, value)` of each directive site_changes names, in order."""
    return [(a or c or "max body bytes", b or d or f)
            for a, b, c, d, _e, f in _DIRECTIVE.findall(text)]


def bind_address(bind: str, port: int) -> str:
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"


def backend(slot: str, server: str, proxy: dict[str, Any]) -> str:
    """One slot's backend: its address on the edge network (or, for a container from before
    that network, its published port), keep-alive connections shared between clients (up to
    proxy.keepalive idle ones, like the nginx engine's pool), and proxy.read_timeout."""
    return (f"backend togather_{slot}\n"
            f"    timeout server {proxy['read_timeout']}s\n"
            f"    server {slot} {server} pool-max-conn {proxy['keepalive']}"
            " pool-purge-delay 30s\n")


def app_rules(proxy: dict[str, Any], scheme: str) -> str:
    """What every frontend does before the app (the nginx engine's togather-app.conf): the
    slot and maintenance lookups, the maintenance page unless the request carries this host's
    verification token, the body limit, the forwarded headers, the slot header on every
    answer, and the backend of the slot."""
    limit = body_bytes(proxy["max_body_size"])
    return (
        f"    http-request set-var(txn.slot) str(slot),map({RUNTIME_MAP},blue)\n"
        f"    acl togather_closed str(maintenance),map({RUNTIME_MAP},0) -m str 1\n"
        f"    acl togather_verified req.hdr(x-togather-verify) -m str -f {VERIFY_LIST}\n"
        "    http-request use-service lua.togather_maintenance"
        " if togather_closed !togather_verified\n"
        + ("    http-request deny deny_status 413"
           f" if {{ req.hdr_val(content-length) gt {limit} }}\n" if limit else "")
        + "    option forwardfor\n"
        f"    http-request set-header X-Forwarded-Proto {scheme}\n"
        "    http-request set-header X-Forwarded-Host %[req.hdr(host)]\n"
        "    http-request del-header X-Togather-Verify\n"
        "    http-after-response set-header X-Togather-Slot %[var(txn.slot)]\n"
        "    use_backend togather_green if { var(txn.slot) -m str green }\n"
        "    default_backend togather_blue\n")


def http_frontend(listen: str, proxy: dict[str, Any], tls: TlsSettings | None) -> str:
    """Plain HTTP: the app; with HTTPS on, the ACME challenge files first (HTTP-01 is plain
    HTTP), then the app or, when `redirect` is on, a 301 to the same URL over HTTPS. In a
    fleet with ACME, a challenge this host has no file for is asked of the peers (one hop:
    a request carrying the hop header is answered here or not at all)."""
    lines = ["frontend togather_http", f"    bind {listen}"]
    rules = app_rules(proxy, "http")
    if tls is not None:
        peers = tls.acme.peers if tls.acme else ()
        lines.append(f"    acl togather_challenge path_reg {CHALLENGE_RE}")
        if peers:
            lines += [f"    acl togather_acme_hop req.hdr({ACME_HOP_HEADER}) -m found",
                      "    http-request use-service lua.togather_acme if togather_challenge"
                      " { lua.togather_challenge_here -m bool }",
                      "    http-request use-service lua.togather_acme if togather_challenge"
                      " togather_acme_hop"]
        else:
            lines.append("    http-request use-service lua.togather_acme if togather_challenge")
        if tls.redirect:
            port = "" if tls.https_port == 443 else f":{tls.https_port}"
            lines.append("    http-request redirect location "
                         f"https://%[req.hdr(host),field(1,:)]{port}%[capture.req.uri] code 301"
                         + (" if !togather_challenge" if peers else ""))
        if peers:
            # A challenge on its way to the peers passes by the maintenance page, and goes
            # before the app's backends.
            rules = rules.replace(" if togather_closed !togather_verified\n",
                                  " if togather_closed !togather_verified"
                                  " !togather_challenge\n").replace(
                "    use_backend togather_green",
                "    use_backend togather_acme_peers if togather_challenge\n"
                "    use_backend togather_green")
    return "\n".join(lines) + "\n" + rules


def acme_peers_backend(tls: TlsSettings | None) -> str:
    """Where a challenge this host has no file for goes in a fleet (empty otherwise): each
    peer's proxy in turn until one has it (a 404, a refused connection or a timeout moves on;
    one try per peer), every host's own address included (the same site on every host; asked
    by itself, a host answers 404 from the webroot it just looked in). The hop header marks
    the request: a peer answers it from its webroot only."""
    if tls is None or tls.acme is None or not tls.acme.peers:
        return ""
    peers = tls.acme.peers
    servers = "".join(f"    server peer{n} {peer}\n" for n, peer in enumerate(peers, 1))
    return ("backend togather_acme_peers\n"
            "    balance roundrobin\n"
            f"    timeout connect {PEER_CONNECT_TIMEOUT}\n"
            f"    timeout server {PEER_READ_TIMEOUT}\n"
            f"    retries {len(peers) - 1}\n"
            "    option redispatch 1\n"
            "    retry-on 404 conn-failure empty-response response-timeout 502 503 504\n"
            f"    http-request set-header {ACME_HOP_HEADER} 1\n"
            "    http-request del-header Content-Length\n"
            f"{servers}")


def https_frontend(listen: str, proxy: dict[str, Any], tls: TlsSettings) -> str:
    """HTTPS with tls/site.pem (chain and key in one file; the list names the image's
    placeholder until it is there); a new certificate is loaded by a seamless reload (the tool
    asks for it when it installs one; togather-haproxy watches the file for the renewal
    service's). TLS 1.2 and 1.3, HTTP/2 and 1.1;
    HAProxy's session cache and tickets let returning clients skip the full handshake."""
    hsts = (f'    http-after-response set-header Strict-Transport-Security "max-age={tls.hsts}"\n'
            if tls.hsts else "")
    return ("frontend togather_https\n"
            f"    bind {listen} ssl crt-list {CRT_LIST} alpn h2,http/1.1\n"
            + app_rules(proxy, "https") + hsts)


def site_conf(env: str, proxy: dict[str, Any], servers: dict[str, str], listen: str,
              tls: TlsSettings | None, https_listen: str | None) -> str:
    """The environment's site.conf for HAProxy: the slots' backends (`servers`: slot ->
    host:port), the HTTP frontend and, with proxy.tls, the HTTPS one."""
    blocks = [backend(slot, server, proxy) for slot, server in servers.items()]
    if peers := acme_peers_backend(tls):
        blocks.append(peers)
    blocks.append(http_frontend(listen, proxy, tls))
    if tls is not None and https_listen is not None:
        blocks.append(https_frontend(https_listen, proxy, tls))
    return (f"# Written by togather-tasks for the {env} environment (proxy.engine: haproxy); "
            "rewritten by every deploy.\n" + "\n".join(blocks))
