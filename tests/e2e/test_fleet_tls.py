"""HTTPS with ACME on a fleet behind a load balancer (tls.py: every host answers every host's
HTTP-01 challenge, from its own webroot, then from its peers', one hop at most).

Pebble validates HTTP-01 on port 9080 of whatever the test domain resolves to in its DNS: here
127.78.0.1:9080, the test bed's HAProxy door to the three hosts' port 80 (round robin, no
stickiness). Pebble asks three times per validation, at once, so each validation reaches
every host; and with deployment.parallel 1 (hosts validating one after another in their own
order, the door listing them in reverse) at least one would land on another host even with one
request each. Without the forwarding, a request that lands on another host finds no token
there and the deploy fails; with it, each host obtains its own certificate and the other
hosts' nginx logs the forwarded validations.

Then HTTPS is removed from the configuration: the next deploy removes each host's renewal
service.
"""

from __future__ import annotations

import http.client
import re
import secrets
import time
from typing import Any

import pytest
from conftest import FLEET_GATEWAY, FLEET_HOSTS, fleet_addr, fleet_listening_ports, free_ports
from test_tls import ACME_ROOT, PEBBLE_API_CA, challtestsrv, https_get

pytestmark = pytest.mark.e2e

ACME_LB = ("127.78.0.1", 9080)  # scripts/testbed-fleet.sh: ACME_LB_ADDR
DIRECTORY = f"https://{FLEET_GATEWAY}:14000/dir"  # Pebble, as the fleet hosts reach it
HOP_HEADER = "X-Togather-Acme-Hop"
FORWARDED = re.compile(r"acme-challenge (\S+) not in the webroot here: asked (.+), answered "
                       r"(.+), sent (\d+)")


def challenge_get(address: str, port: int, token: str, domain: str,
                  headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(address, port, timeout=15)
    try:
        conn.request("GET", f"/.well-known/acme-challenge/{token}",
                     headers={"Host": domain, "Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def forwarded_lines(app: Any, host: str) -> list[re.Match[str]]:
    """The challenges `host`'s proxy forwarded to its peers (its log, tls.acme_peers_block)."""
    out = app.compose("logs", "--no-log-prefix", "proxy", host=host, check=True)
    return [m for line in out.stdout.splitlines() if (m := FORWARDED.search(line))]


def renewers(app: Any, host: str) -> list[str]:
    return [c["state"] for c in app.containers(host) if c["service"] == "acme"]


@pytest.mark.parametrize("engine", ["nginx", "haproxy"])
def test_a_fleet_behind_a_load_balancer_obtains_a_certificate_on_every_host(
        fleet_app_factory: Any, engine: str) -> None:
    app = fleet_app_factory(FLEET_HOSTS, through_lb=True, strategy="registry")
    domain = f"e2e-{app.hex}.togather.test"
    used = set().union(*(fleet_listening_ports(h) for h in FLEET_HOSTS))
    https_port = free_ports(1, exclude=used | set(app.ports.values()))[0]
    challtestsrv("add-a", host=domain, addresses=[ACME_LB[0]])
    try:
        ports = {**app.ports, "https": https_port}
        app.write_config(
            commit=True,
            environments={app.env: {"ports": ports}},
            # One host after another: the validations reach the load balancer in host order.
            deployment={"parallel": 1},
            proxy={"engine": engine, "tls": {
                "acme": {"domains": [domain], "email": "e2e@togather.test",
                         "directory": DIRECTORY, "ca_bundle": str(PEBBLE_API_CA),
                         "peers": {alias: fleet_addr(h)
                                   for alias, h in zip(app.aliases, FLEET_HOSTS,
                                                       strict=True)}},
                "verify_ca": str(ACME_ROOT), "redirect": False}})
        started = time.monotonic()
        result = app.deploy(timeout=1200)
        seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        print(f"\nfleet of 3, first deploy with ACME (image builds included): {seconds:.1f} s")
        print("\n".join(line for line in result.stdout.splitlines() if "certs" in line))

        # Each host serves a certificate of its own for the domain, issued by Pebble,
        # verified, on its own address.
        serials = {}
        for host in FLEET_HOSTS:
            answer = https_get(fleet_addr(host), https_port, domain, "/version")
            assert answer.status == 200 and answer.version == app.head[:7], (host, answer)
            serials[host] = answer.serial
        assert len(set(serials.values())) == len(FLEET_HOSTS), serials
        assert result.stdout.count("certificate obtained (no certificate on the host yet)") \
            == len(FLEET_HOSTS), result.stdout

        # The load balancer sent at least one validation to a host without its token, which
        # asked its peers: a 200 from one of them (nginx logs it; HAProxy logs no requests,
        # and without the forwarding the deploy above fails).
        if engine == "nginx":
            forwards = {h: forwarded_lines(app, h) for h in FLEET_HOSTS}
            answered = [m for lines in forwards.values() for m in lines if m.group(4) == "200"]
            print("forwarded validations: " + "; ".join(
                f"{h}: {m.group(2)} -> {m.group(3)}" for h, lines in forwards.items()
                for m in lines))
            assert answered, forwards

        # A token on one host only is served by every host through the round-robin load
        # balancer; one on no host is a quick 404 everywhere (one hop, no loop); a request a
        # peer forwarded is answered from the webroot alone.
        token = secrets.token_urlsafe(24)
        webroot = app.root_path("host2") / "nginx" / "acme" / ".well-known" / "acme-challenge"
        webroot.mkdir(parents=True, exist_ok=True)
        for directory in (webroot, webroot.parent):
            directory.chmod(0o755)
        (webroot / token).write_text(f"{token}.key-authorization")
        (webroot / token).chmod(0o644)
        seen = [challenge_get(*ACME_LB, token, domain) for _ in FLEET_HOSTS]
        assert seen == [(200, f"{token}.key-authorization")] * len(FLEET_HOSTS), seen
        for host in FLEET_HOSTS:
            started = time.monotonic()
            status, _ = challenge_get(fleet_addr(host), 80, "no-such-token", domain)
            assert status == 404 and time.monotonic() - started < 5, (host, status)
        assert challenge_get(fleet_addr("host1"), 80, token, domain,
                             {HOP_HEADER: "1"})[0] == 404
        assert challenge_get(fleet_addr("host2"), 80, token, domain,
                             {HOP_HEADER: "1"})[0] == 200
        # Only a token's path is forwarded: no other path of a peer is reached that way
        # (HAProxy looks up nothing but a token's path, even in its own webroot).
        (webroot / "not.a.token").write_text("x")
        (webroot / "not.a.token").chmod(0o644)
        own = challenge_get(fleet_addr("host2"), 80, "not.a.token", domain)
        assert own[0] == 200 if engine == "nginx" else own[1] != "x", own
        assert challenge_get(fleet_addr("host1"), 80, "not.a.token", domain)[0] == 404

        # HTTPS removed from the configuration: the next deploy removes the renewal service
        # on every host, and plain HTTP serves the new version.
        assert all(renewers(app, h) == ["running"] for h in FLEET_HOSTS)
        app.write_config(commit=False, environments={app.env: {"ports": app.ports}})
        app.commit("v2", {"app/VERSION_NOTE": "two\n"})
        plain = app.deploy(timeout=600)
        assert plain.returncode == 0, plain.stdout + plain.stderr
        for alias in app.aliases:
            assert f"{alias}: certificate renewal service removed (no proxy.tls.acme)" \
                in plain.stdout + plain.stderr, plain.stdout + plain.stderr
        for host in FLEET_HOSTS:
            assert renewers(app, host) == [], host
            assert https_port not in fleet_listening_ports(host), host
            assert app.served_by(host)[1]["version"] == app.head[:7]
    finally:
        challtestsrv("clear-a", host=domain)
