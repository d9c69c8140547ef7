"""The HAProxy engine's pure parts (proxy.engine: haproxy): its site configuration, the
directives named when it changes, the image it runs and how it is reloaded, and the config
check that keeps it out of what it does not do yet. Its behaviour on a real host (the switch
under load, maintenance, HTTPS, a certificate renewal) is tests/e2e/test_haproxy_engine.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from togather_tasks import commands as cmd
from togather_tasks import haproxy, proxy, tls
from togather_tasks.config import Settings

from .conftest import Project
from .fakehost import FakeHost
from .projects import BASE_CONFIG
from .test_tls_config import ACME
from .test_tls_config import with_tls as tls_config
from .test_tls_fleet import fleet_config


@pytest.fixture
def hap(settings: Settings) -> Settings:
    return dataclasses.replace(settings, proxy={**settings.proxy, "engine": "haproxy"})


def with_tls(settings: Settings, *, redirect: bool = False, hsts: int | None = None,
             https_port: int = 9443) -> Settings:
    return dataclasses.replace(settings, tls=tls.TlsSettings(
        domains=("example.test",), https_port=https_port, redirect=redirect, hsts=hsts,
        certificate=None, key=None, acme=None))


@pytest.mark.parametrize(("size", "expected"), [
    ("100m", 100 * 1024 ** 2), ("512k", 512 * 1024), ("2G", 2 * 1024 ** 3), ("4096", 4096),
    (0, 0), ("0", 0)])
def test_body_bytes_reads_nginx_sizes(size: str | int, expected: int) -> None:
    assert haproxy.body_bytes(size) == expected


def test_site_conf_is_exact(hap: Settings) -> None:
    assert proxy.site_conf(hap) == """\
# Written by togather-tasks for the staging environment (proxy.engine: haproxy); rewritten by \
every deploy.
backend togather_blue
    timeout server 60s
    server blue 10.201.27.202:8080 pool-max-conn 1024 pool-purge-delay 30s

backend togather_green
    timeout server 60s
    server green 10.201.27.203:8080 pool-max-conn 1024 pool-purge-delay 30s

frontend togather_http
    bind 0.0.0.0:9080
    http-request set-var(txn.slot) str(slot),map(/run/togather/runtime.map,blue)
    acl togather_closed str(maintenance),map(/run/togather/runtime.map,0) -m str 1
    acl togather_verified req.hdr(x-togather-verify) -m str -f /run/togather/verify.lst
    http-request use-service lua.togather_maintenance if togather_closed !togather_verified
    http-request deny deny_status 413 if { req.hdr_val(content-length) gt 104857600 }
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request del-header X-Togather-Verify
    http-after-response set-header X-Togather-Slot %[var(txn.slot)]
    use_backend togather_green if { var(txn.slot) -m str green }
    default_backend togather_blue
"""


def test_a_slot_not_on_the_edge_network_keeps_its_published_port(hap: Settings) -> None:
    text = proxy.site_conf(hap, frozenset({"green"}))
    assert "    server green 127.0.0.1:9082 pool-max-conn" in text
    assert "    server blue 10.201.27.202:8080 pool-max-conn" in text


def test_no_body_limit_means_no_deny_rule(hap: Settings) -> None:
    unlimited = dataclasses.replace(hap, proxy={**hap.proxy, "max_body_size": 0})
    assert "deny_status 413" not in proxy.site_conf(unlimited)


def test_https_serves_the_app_with_the_site_pem_and_hsts_only_when_asked(hap: Settings) -> None:
    text = proxy.site_conf(with_tls(hap, hsts=31536000))
    http, https = text.split("frontend togather_https\n")
    assert ("    bind 0.0.0.0:9443 ssl crt-list /run/togather/crt.list alpn h2,http/1.1\n"
            in https)
    assert "X-Forwarded-Proto https" in https and "X-Forwarded-Proto http\n" in http
    assert 'Strict-Transport-Security "max-age=31536000"' in https
    assert "Strict-Transport-Security" not in http
    assert "Strict-Transport-Security" not in proxy.site_conf(with_tls(hap))


def test_plain_http_answers_challenges_first_then_redirects_when_asked(hap: Settings) -> None:
    text = proxy.site_conf(with_tls(hap, redirect=True))
    http = text.split("frontend togather_https\n")[0].split("frontend togather_http\n")[1]
    lines = http.splitlines()
    challenge = next(i for i, line in enumerate(lines) if "lua.togather_acme" in line)
    redirect = next(i for i, line in enumerate(lines) if "http-request redirect" in line)
    assert challenge < redirect
    assert lines[redirect].endswith("https://%[req.hdr(host),field(1,:)]:9443"
                                    "%[capture.req.uri] code 301")
    on_443 = proxy.site_conf(with_tls(hap, redirect=True, https_port=443))
    assert "https://%[req.hdr(host),field(1,:)]%[capture.req.uri] code 301" in on_443
    # Without a redirect, plain HTTP serves the app (challenges still first).
    assert "http-request redirect" not in proxy.site_conf(with_tls(hap))


def test_site_changes_names_what_moved_in_an_haproxy_site(hap: Settings) -> None:
    moved = dataclasses.replace(hap, ports={**hap.ports, "proxy": 9180},
                                proxy={**hap.proxy, "keepalive": 64, "read_timeout": 300,
                                       "max_body_size": "1m"})
    assert proxy.site_changes(proxy.site_conf(hap), proxy.site_conf(moved)) == (
        "timeout server 60s -> 300s, pool-max-conn 1024 -> 64, "
        "timeout server 60s -> 300s, pool-max-conn 1024 -> 64, "
        "bind 0.0.0.0:9080 -> 0.0.0.0:9180, max body bytes 104857600 -> 1048576")


def test_another_engine_is_another_image_and_reload(settings: Settings, hap: Settings) -> None:
    assert cmd.proxy_engine(settings) == "nginx" and cmd.proxy_engine(hap) == "haproxy"
    assert cmd.proxy_image_ref("haproxy") != cmd.proxy_image_ref("nginx")
    assert "PROXY_IMAGE=" + cmd.proxy_image_ref("haproxy") in cmd.slots_env(hap, {})
    assert "togather-haproxy reload" in cmd.reload_proxy(hap)
    assert "nginx -s reload" in cmd.reload_proxy(settings)
    assert proxy.changes(hap, f"{cmd.proxy_image_ref('nginx')} host workers=") == [
        f"image {cmd.proxy_image_ref('nginx')} -> {cmd.proxy_image_ref('haproxy')}"]


def test_the_image_files_exist_and_the_lua_reads_the_nginx_engines_files() -> None:
    for engine, names in cmd.PROXY_IMAGE_FILES.items():
        for name in names:
            assert (cmd.DOCKER_DIR / engine / name).is_file(), (engine, name)
    lua = (cmd.DOCKER_DIR / "haproxy" / "togather.lua").read_text()
    for path in ('STATE .. "/green"', 'STATE .. "/maintenance"', '"/verify.map"',
                 haproxy.RUNTIME_MAP, haproxy.VERIFY_LIST, haproxy.CRT_LIST,
                 '"/tls/site.pem"', "/acme/.well-known/acme-challenge/"):
        assert path in lua
    assert f'local CONF = "{tls.PROXY_CONF_DIR}"' in lua
    assert f"local POLL_MS = {round(haproxy.POLL * 1000)}\n" in lua


def write_config(project: Project, env: str, proxy_block: dict) -> None:
    path = Path(project.root) / "config" / "deployment.yml"
    document = yaml.safe_load(path.read_text())
    document["environments"][env].setdefault("proxy", {}).update(proxy_block)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def test_haproxy_is_the_default_engine_and_nginx_is_chosen_by_name(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace("proxy:\n  engine: nginx\n", ""))
    default = project.load("staging")
    assert cmd.proxy_engine(default) == "haproxy"
    assert "PROXY_IMAGE=" + cmd.proxy_image_ref("haproxy") in cmd.slots_env(default, {})
    assert "togather-haproxy reload" in cmd.reload_proxy(default)
    assert "frontend togather_http\n" in proxy.site_conf(default)
    write_config(project, "staging", {"engine": "nginx"})
    chosen = project.load("staging")
    assert cmd.proxy_engine(chosen) == "nginx"
    assert "nginx -s reload" in cmd.reload_proxy(chosen)
    assert "frontend" not in proxy.site_conf(chosen)


def test_an_unknown_engine_is_a_config_error(project: Project) -> None:
    write_config(project, "staging", {"engine": "traefik"})
    with pytest.raises(Exception, match=r"proxy.*engine.*'traefik' is not one of"):
        project.load("staging")


def test_a_fleet_with_acme_asks_its_peers_for_a_challenge_it_has_no_file_for(
        project: Project) -> None:
    project.write_config(fleet_config().replace("  engine: nginx\n", "  engine: haproxy\n"))
    site = proxy.site_conf(project.load("staging"))
    peers = site[site.index("backend togather_acme_peers\n"):site.index("frontend")]
    # Every host's proxy, this one's included, one try each: a 404 or a failure moves on.
    assert peers.endswith("    server peer1 10.0.0.11:9080\n    server peer2 10.0.0.12:9080\n"
                          "    server peer3 10.0.0.13:9080\n\n")
    assert "    retries 2\n    option redispatch 1\n" in peers
    assert "    retry-on 404 conn-failure empty-response response-timeout" in peers
    assert "    http-request set-header X-Togather-Acme-Hop 1\n" in peers
    http = site[site.index("frontend togather_http\n"):site.index("frontend togather_https\n")]
    lines = http.splitlines()

    def at(text: str) -> int:
        return next(n for n, line in enumerate(lines) if text in line)

    # Its own file first; a request with the hop header is answered here or not at all (one
    # hop); then the peers, before the redirect, the maintenance page and the app.
    assert at("lua.togather_acme if togather_challenge { lua.togather_challenge_here") < at(
        "lua.togather_acme if togather_challenge togather_acme_hop")
    assert lines[at("http-request redirect")].endswith(" if !togather_challenge")
    assert lines[at("lua.togather_maintenance")].endswith(" !togather_challenge")
    assert at("use_backend togather_acme_peers if togather_challenge") < at(
        "use_backend togather_green")
    # One host: its own webroot only.
    project.write_config(tls_config(ACME).replace("  engine: nginx\n", "  engine: haproxy\n"))
    one = proxy.site_conf(project.load("staging"))
    assert "togather_acme_peers" not in one and "lua.togather_acme if togather_challenge\n" in one


def test_a_marker_put_back_is_given_time_to_reach_haproxy_before_anything_stops(
        settings: Settings, hap: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed switch puts the marker back, then its caller stops the new slot: with HAProxy
    the restore returns only after a few of togather.lua's polls, so that slot gets no new
    request meanwhile; nginx reads the marker at each request and needs no pause."""
    slept: list[float] = []
    monkeypatch.setattr(proxy.time, "sleep", slept.append)
    host = FakeHost()
    proxy.restore(hap, host, "blue")
    assert host.ran("state/blue") and slept == [proxy.RESTORE_SEEN_POLLS * haproxy.POLL]
    assert slept[0] >= 4 * haproxy.POLL
    proxy.restore(settings, FakeHost(), "blue")
    assert slept == [proxy.RESTORE_SEEN_POLLS * haproxy.POLL]
