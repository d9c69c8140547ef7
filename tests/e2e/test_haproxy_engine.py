"""proxy.engine: haproxy on the staging test bed: the same switch files, behaviour and
guarantees as the nginx engine, with HAProxy in the proxy container.

- A host moves from nginx to HAProxy by a deploy (the proxy recreated, with the warning); then
  one keep-alive connection lives through a deploy and a rollback with no reload, maintenance
  mode answers 503 and survives a deploy, and the switch survives a proxy restart.
- HTTPS through HAProxy against the test bed's Pebble: first issuance (the HTTP-01 challenge
  answered by HAProxy), a forced renewal under load without a failed request (a seamless
  reload loads the new certificate), then a provided certificate with the redirect and HSTS.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import test_tls
from test_edge_switch import HeldConnection, proxy_container, wait_served
from test_tls import ACME_ROOT, HTTP01_PORT, HttpsLoad, TlsApp, deployed, https_get, provided_pair

pytestmark = pytest.mark.e2e
tls_app = test_tls.tls_app  # the fixture, here too


def haproxy_pids(app) -> set[str]:
    """The HAProxy master's and worker's pids in the proxy container: a reload replaces the
    worker."""
    out = subprocess.run(["docker", "top", proxy_container(app), "-o", "pid,args"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    # The processes running HAProxy itself (after a reload the master's arguments change);
    # not Docker's init, not the entry point's shell.
    pids = {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["haproxy"]}
    assert len(pids) >= 2, out
    return pids


def get(port: int, path: str = "/version", headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.proxy_engine("nginx")  # the first deploy's; then the config names haproxy
def test_from_nginx_to_haproxy_then_a_switch_that_closes_no_connection(demo_app) -> None:
    app = demo_app
    v1 = app.head[:7]
    app.deploy(check=True)
    assert app.served()[0] == "blue"

    app.write_config(proxy={"engine": "haproxy"})
    v2 = app.commit("v2", {"app/RELEASE": "v2\n"})[:7]
    moved = app.deploy()
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "recreated (image togather-proxy:" in moved.stderr, moved.stderr
    slot, body = app.served()
    assert (slot, body["version"]) == ("green", v2)
    pids = haproxy_pids(app)

    v3 = app.commit("v3", {"app/RELEASE": "v3\n"})[:7]
    held = HeldConnection(app.ports["proxy"])
    try:
        deployed_v3 = app.deploy()
        rolled_back = app.inv("rollback", app.env_flag)
        time.sleep(0.5)
    finally:
        held.finish()
    assert deployed_v3.returncode == 0, deployed_v3.stdout + deployed_v3.stderr
    assert rolled_back.returncode == 0, rolled_back.stdout + rolled_back.stderr
    assert held.errors == [], held.errors
    assert len(held.local_ports) == 1, "the client's connection was replaced"
    assert held.seen == [("green", v2), ("blue", v3), ("green", v2)], held.seen
    assert haproxy_pids(app) == pids, "HAProxy was reloaded (its worker changed)"

    # Maintenance: 503 with the page (JSON when asked), Retry-After, as soon as the command
    # returns; a deploy keeps it up (it verifies through it with the host's token); off
    # restores traffic as soon as it returns. No reload.
    on = app.inv("maintenance.on", app.env_flag, "--message=Back <soon>", "--retry-after=120")
    assert on.returncode == 0, on.stdout + on.stderr
    # The command returned once the proxy showed the page (maintenance.wait_shown).
    status, headers, page = get(app.ports["proxy"], "/", {"Accept": "application/json"})
    assert status == 503 and headers["retry-after"] == "120", (status, headers)
    assert json.loads(page)["message"] == "Back <soon>"
    status, headers, page = get(app.ports["proxy"], "/")
    assert status == 503 and "Back &lt;soon&gt;" in page.decode()
    app.commit("v4", {"app/RELEASE": "v4\n"})
    during = app.deploy()
    assert during.returncode == 0, during.stdout + during.stderr
    assert "maintenance mode is on and stays on" in during.stderr
    assert get(app.ports["proxy"], "/version")[0] == 503
    off = app.inv("maintenance.off", app.env_flag)
    assert off.returncode == 0, off.stdout + off.stderr
    slot, body = app.served()
    assert (slot, body["version"][:7]) == ("blue", app.head[:7])
    assert haproxy_pids(app) == pids

    # The switch is on the host's disk: a restarted proxy serves the same slot.
    subprocess.run(["docker", "restart", "--time", "2", proxy_container(app)], check=True,
                   capture_output=True, timeout=60)
    assert wait_served(app)[0] == "blue"
    assert v1 != v2


def test_https_through_haproxy_issuance_renewal_under_load_and_a_provided_certificate(
        tls_app: TlsApp) -> None:
    app = tls_app.app

    def configure(**settings) -> None:
        ports = {**app.ports, "proxy": HTTP01_PORT, "https": tls_app.https_port}
        app.write_config(proxy={"bind": tls_app.address, "engine": "haproxy", "tls": settings},
                         environments={app.env: {"ports": ports, "public_url":
                                                 f"http://{tls_app.address}:{HTTP01_PORT}"}})

    # First issuance: Pebble asks HAProxy's plain-HTTP frontend for the challenge token.
    configure(acme=tls_app.acme(), redirect=False, verify_ca=str(ACME_ROOT))
    first = deployed(tls_app)
    assert "certificate obtained (no certificate on the host yet)" in first.stdout
    served = tls_app.https(cafile=ACME_ROOT)
    assert served.status == 200 and served.version == app.head[:7]
    issued, issued_key = served.serial, served.key

    # A forced renewal under load: every request answered; the tool's seamless reload
    # serves the new certificate as soon as the command returns.
    with HttpsLoad(tls_app) as load:
        renewal = app.inv("certs.renew", app.env_flag, "--force")
        after = tls_app.https()
        time.sleep(0.5)
    errors, serials = load.errors, load.serials
    renewed = after.serial
    assert renewal.returncode == 0, renewal.stdout + renewal.stderr
    assert renewed != issued
    assert after.key != issued_key  # HAProxy loads the pair at once: each renewal a new key
    assert errors == []
    assert issued in serials and renewed in serials, "the load did not span the renewal"
    health = app.inv("health", app.env_flag)
    assert health.returncode == 0, health.stdout + health.stderr
    assert f"verified against {ACME_ROOT}" in health.stdout

    # A provided certificate, the redirect (the default) and HSTS.
    crt, key = provided_pair(app.path / "tls", tls_app.domain)
    configure(certificate=str(crt), key=str(key), hsts=600, verify_ca=str(crt))
    result = deployed(tls_app)
    assert "provided certificate installed" in result.stdout
    assert key.read_text().splitlines()[1] not in result.stdout + result.stderr
    served = https_get(tls_app.address, tls_app.https_port, tls_app.domain, cafile=crt)
    assert served.status == 200 and served.headers["strict-transport-security"] == "max-age=600"
    assert served.headers["x-togather-slot"] in ("blue", "green")
    redirect = tls_app.http("/version?x=1")
    assert redirect.status == 301
    assert redirect.headers["location"] == \
        f"https://{tls_app.domain}:{tls_app.https_port}/version?x=1"
    assert tls_app.http("/.well-known/acme-challenge/no-such-token").status == 404
    assert (Path(app.remote_dir) / "nginx" / "site.conf").read_text().startswith(
        "# Written by togather-tasks for the staging environment (proxy.engine: haproxy)")


def test_a_proxy_stop_lets_a_request_finish_closes_idle_connections_and_ends_by_itself(
        demo_app) -> None:
    """`docker stop` of the proxy (what a recreate does first): a request in flight finishes,
    an idle keep-alive connection is closed by the proxy, and the container ends by itself
    (exit 0), not killed at the end of Docker's grace period (exit 137), which kept the
    listening port, and so the recreated proxy, away for 10 s while any client held an idle
    connection."""
    app = demo_app
    app.deploy(check=True)
    port = app.ports["proxy"]
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    idle.sendall(b"GET /version HTTP/1.1\r\nHost: e2e\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    # In flight: headers sent, half of the body, the other half once the stop has begun.
    busy = socket.create_connection(("127.0.0.1", port), timeout=10)
    busy.sendall(b"GET / HTTP/1.1\r\nHost: e2e\r\nContent-Length: 2000\r\n\r\n" + b"x" * 1000)
    container = proxy_container(app)
    stop = subprocess.Popen(["docker", "stop", "--time", "10", container],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        busy.sendall(b"x" * 1000)
        answer = busy.recv(65536)
        closed = idle.recv(65536)
        _, err = stop.communicate(timeout=60)
    finally:
        idle.close()
        busy.close()
    assert stop.returncode == 0, err
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert closed == b"", closed[:200]
    exit_code = subprocess.run(["docker", "inspect", "--format", "{{.State.ExitCode}}",
                                container], capture_output=True, text=True, check=True,
                               timeout=30).stdout.strip()
    assert exit_code == "0", f"the proxy ended with {exit_code} (137: killed at the grace period)"
    # The next deploy starts it again, serving the same slot.
    app.commit("v2", {"app/RELEASE": "v2\n"})
    app.deploy(check=True)
    assert wait_served(app)[0] == "green"



def test_two_reloads_at_once_both_load_and_a_refused_configuration_says_why(demo_app) -> None:
    """The tool reloads HAProxy right after it installs a certificate, and the entry point's
    watcher reloads it when it sees that certificate: two reloads at once. Each used to load
    togather.lua beside the other through one temporary file name, and one configuration test
    in four failed in silence (`haproxy -c -q`); CI saw "the proxy did not load the new
    certificate: no output". Now every pair loads, traffic stays up, and a configuration
    HAProxy refuses is named."""
    app = demo_app
    app.deploy(check=True)
    container = proxy_container(app)
    pairs = ("for i in $(seq 15); do togather-haproxy reload & p=$!; "
             "togather-haproxy reload || echo failed >&2; wait $p || echo failed >&2; done")
    done = subprocess.run(["docker", "exec", container, "sh", "-c", pairs],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "failed" not in done.stderr, done.stderr[-2000:]
    assert wait_served(app)[1]["version"] == app.head[:7]

    site = Path(app.remote_dir) / "nginx" / "site.conf"
    good = site.read_text()
    site.write_text(good + "frontend togather_bogus\n    no-such-keyword\n")
    try:
        refused = subprocess.run(["docker", "exec", container, "togather-haproxy", "reload"],
                                 capture_output=True, text=True, timeout=60)
    finally:
        site.write_text(good)
    assert refused.returncode != 0
    assert "[ALERT]" in refused.stderr and "no-such-keyword" in refused.stderr, refused.stderr
    assert wait_served(app)[1]["version"] == app.head[:7]
