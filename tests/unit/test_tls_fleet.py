"""ACME on a fleet behind a load balancer, without hosts: the peers' addresses and their checks,
the Let's Encrypt duplicate-certificate warning, the nginx pieces that forward a challenge to
the peers (one hop), the certs step's order (every host serves the challenges before any host
orders), and the renewer removed where proxy.tls.acme is gone."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from togather_tasks import certs, proxy, tls
from togather_tasks.config import Settings
from togather_tasks.deploy import Deploy, DeployOptions, certificate_plan
from togather_tasks.rollback import Rollback, RollbackOptions
from togather_tasks.slots import Slots

from .fakehost import FakeHost, FakeSession, failed, ok
from .projects import Project
from .test_fleet import fleet_session  # noqa: F401 - a fixture
from .test_tls_config import ACME, one_problem, problems_of, with_tls

ALIASES = ("app1", "app2", "app3")
PEERS = "  peers: {app1: 10.0.0.11, app2: 10.0.0.12, app3: 10.0.0.13}\n"


def fleet_config(acme: str = ACME + PEERS, hosts: str = "[app1, app2, app3]",
                 bind: str = "0.0.0.0") -> str:
    return (with_tls(acme).replace("hosts: [deploy@staging.example.com:2222]",
                                   f"hosts: {hosts}")
            .replace("proxy:\n  tls:\n", f"proxy:\n  bind: {bind}\n  tls:\n"))


# --- the peers --------------------------------------------------------------------------------


def test_a_fleet_with_acme_resolves_its_peers_on_the_proxy_port(project: Project) -> None:
    project.write_config(fleet_config())
    s = project.load("staging")
    assert s.tls.acme.peers == ("10.0.0.11:9080", "10.0.0.12:9080", "10.0.0.13:9080")
    assert s.warnings == ()


def test_peers_default_to_the_addresses_in_the_host_entries(project: Project) -> None:
    project.write_config(fleet_config(
        acme=ACME + "  peers: {app2: 10.0.0.12}\n",
        hosts="[deploy@192.168.1.11:2222, app2, 192.168.1.13]"))
    assert project.load("staging").tls.acme.peers == (
        "192.168.1.11:9080", "10.0.0.12:9080", "192.168.1.13:9080")


def test_ipv6_peers_are_bracketed(project: Project) -> None:
    project.write_config(fleet_config(
        acme=ACME + "  peers: {app1: 'fd00::11', app2: 'fd00::12', app3: 'fd00::13'}\n"))
    assert project.load("staging").tls.acme.peers[0] == "[fd00::11]:9080"


def test_one_host_forwards_nothing(project: Project) -> None:
    project.write_config(with_tls(ACME))
    s = project.load("staging")
    assert s.tls.acme.peers == ()
    assert "togather_acme_peers" not in proxy.site_conf(s)


def test_a_fleet_of_aliases_without_peers_is_a_config_error(project: Project) -> None:
    project.write_config(fleet_config(acme=ACME))
    problem = one_problem(project)
    assert "proxy.tls.acme.peers: missing for app1, app2, app3" in problem
    assert "e.g. peers: {app1: 10.0.0.11, app2: 10.0.0.12, app3: 10.0.0.13}" in problem


def test_every_peer_problem_at_once(project: Project) -> None:
    project.write_config(fleet_config(
        acme=ACME + "  peers: {app1: 127.0.0.1, app2: db.internal, app3: 10.0.0.5, "
                    "app4: 10.0.0.6, app9: 10.0.0.5}\n",
        hosts="[app1, app2, app3, app4]", bind="127.0.0.1"))
    found = "\n".join(problems_of(project))
    assert "proxy.tls.acme.peers: 'app9' is not a host of this environment" in found
    assert "proxy.tls.acme.peers.app1: 127.0.0.1 cannot reach another host" in found
    assert "proxy.tls.acme.peers.app2: 'db.internal' is not an IP address" in found
    assert "proxy.tls.acme.peers.app9: 10.0.0.5 is also the address of app3" in found
    assert "proxy.bind: 127.0.0.1: a fleet with ACME forwards challenges" in found
    assert "missing" not in found  # every host of the four has an address


def test_a_provided_certificate_needs_no_peers(project: Project) -> None:
    from .test_tls_config import make_cert

    make_cert(project.root / "tls", ["app.example.com"])
    project.write_config(fleet_config(acme="certificate: tls/site.crt\nkey: tls/site.key\n"))
    assert project.load("staging").tls.acme is None


def test_peers_must_be_strings(project: Project) -> None:
    project.write_config(fleet_config(acme=ACME + "  peers: {app1: [10.0.0.11]}\n"))
    assert "proxy.tls.acme.peers.app1" in one_problem(project)


# --- Let's Encrypt's duplicate-certificate limit ----------------------------------------------


def six_hosts(directory: str = "") -> str:
    names = [f"app{n}" for n in range(1, 7)]
    peers = ", ".join(f"{name}: 10.0.0.{10 + n}" for n, name in enumerate(names, 1))
    return fleet_config(acme=ACME + directory + f"  peers: {{{peers}}}\n",
                        hosts=f"[{', '.join(names)}]")


def test_more_than_five_hosts_against_lets_encrypt_is_a_warning(project: Project) -> None:
    project.write_config(six_hosts())
    s = project.load("staging")
    assert len(s.warnings) == 1
    assert "6 hosts each obtain their own certificate for app.example.com, www.example.com"\
        in s.warnings[0]
    assert "at most 5 new certificates per week for one exact set of names" in s.warnings[0]


def test_no_warning_for_five_hosts_or_another_acme_server(project: Project) -> None:
    project.write_config(six_hosts("  directory: https://acme.internal/dir\n"))
    assert project.load("staging").warnings == ()
    project.write_config(fleet_config())
    assert project.load("staging").warnings == ()


# --- nginx ------------------------------------------------------------------------------------


def fleet_tls(peers: tuple[str, ...] = ("10.0.0.11:80", "10.0.0.12:80")) -> tls.TlsSettings:
    return tls.TlsSettings(("app.example.com",), 443, True, None,
                           tls.AcmeSettings("ops@example.com", tls.LETS_ENCRYPT, None, 30,
                                            peers), None, None)


def test_the_peers_upstream_every_host_included_never_taken_out() -> None:
    block = tls.acme_peers_block(fleet_tls())
    assert block.startswith("upstream togather_acme_peers {\n"
                            "    server 10.0.0.11:80 max_fails=0;\n"
                            "    server 10.0.0.12:80 max_fails=0;\n"
                            "}\n")
    # Forwarded: no hop header and a token's path, nothing else.
    assert ('map "$http_x_togather_acme_hop:$uri" $togather_acme_forwarded {\n'
            '    "~^:/\\.well-known/acme-challenge/[A-Za-z0-9_-]+$" 1;\n'
            '    default 0;\n}\n') in block
    assert "log_format togather_acme " in block
    assert tls.acme_peers_block(fleet_tls(peers=())) == ""
    assert tls.acme_peers_block(None) == ""


def test_a_missing_challenge_goes_to_each_peer_once_and_one_hop_only() -> None:
    locations = tls.http_locations(fleet_tls())
    assert "        try_files $uri @togather_acme_peers;\n" in locations
    named = locations[locations.index("location @togather_acme_peers"):]
    # A forwarded request (the hop header) is answered here or not at all.
    assert named.index("if ($togather_acme_forwarded = 0) {\n            return 404;") \
        < named.index("proxy_pass http://togather_acme_peers;")
    assert "proxy_set_header X-Togather-Acme-Hop 1;" in named
    assert "proxy_next_upstream error timeout http_404 http_502 http_503 http_504;" in named
    assert "proxy_next_upstream_tries 2;" in named
    assert "proxy_connect_timeout 1s;" in named and "proxy_next_upstream_timeout 8s;" in named
    assert "access_log /dev/stdout togather_acme if=$togather_acme_forwarded;" in named
    # The redirect (or the app) comes after, as on one host.
    assert locations.rstrip().endswith("return 301 https://$host$request_uri;\n    }")


def test_one_host_serves_its_own_webroot_only() -> None:
    locations = tls.http_locations(fleet_tls(peers=()))
    assert "try_files $uri =404;" in locations and "@togather_acme_peers" not in locations


def test_the_site_of_a_fleet_with_acme_declares_its_peers_before_the_servers(
        project: Project) -> None:
    project.write_config(fleet_config())
    site = proxy.site_conf(project.load("staging"))
    assert site.index("upstream togather_acme_peers") < site.index("server {")
    assert "server 10.0.0.12:9080 max_fails=0;" in site
    assert site.count("location @togather_acme_peers") == 1


def test_the_dry_run_names_the_peers_a_challenge_is_asked_of(project: Project) -> None:
    project.write_config(fleet_config())
    [line] = certificate_plan(project.load("staging"), "app2")
    assert line.startswith("[app2] HTTPS: write ")
    assert ("asked of its peers 10.0.0.11:9080, 10.0.0.12:9080, 10.0.0.13:9080 (one hop)"
            in line), line
    project.write_config(with_tls(ACME))  # one host: no peers
    [line] = certificate_plan(project.load("staging"), "app1")
    assert "peers" not in line and "(HTTP-01) unless the host has one; " in line, line


# --- the certs step and the renewer -------------------------------------------------------------


def test_every_host_serves_the_challenges_before_any_host_orders(
        fleet_session: FakeSession, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    calls: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(what: str, value: str):
        def call(settings: Settings, host: FakeHost) -> str:
            with lock:
                calls.append((what, host.name))
            return value
        return call

    monkeypatch.setattr(certs, "serve_challenges", record("serve", "reloaded (site.conf)"))
    monkeypatch.setattr(certs, "ensure", record("ensure", "certificate reused: x"))
    deploy = Deploy(fleet_session, DeployOptions())  # type: ignore[arg-type]
    notes: list[str] = []
    deploy.certificate(notes.append)
    assert sorted(calls[:2]) == [("serve", "web1"), ("serve", "web2")]
    assert sorted(calls[2:]) == [("ensure", "web1"), ("ensure", "web2")]
    assert notes == ["web1: proxy reloaded (site.conf); certificate reused: x; "
                     "web2: proxy reloaded (site.conf); certificate reused: x"]


def test_the_renewer_is_removed_where_acme_is_gone(settings: Settings) -> None:
    host = FakeHost()
    host.on("com.docker.compose.service=acme", ok("4f2a\n"))
    assert certs.retire(settings, host) == \
        "certificate renewal service removed (no proxy.tls.acme)"
    assert host.ran("rm --stop --force acme")


def test_no_renewer_nothing_to_remove(settings: Settings) -> None:
    host = FakeHost()
    host.on("com.docker.compose.service=acme", ok(""))
    assert certs.retire(settings, host) is None
    assert len(host.commands) == 1 and not host.ran("rm --stop")


def test_an_environment_with_acme_keeps_its_renewer(settings: Settings) -> None:
    host = FakeHost()
    with_acme = dataclasses.replace(settings, tls=fleet_tls())
    assert certs.retire(with_acme, host) is None
    assert host.commands == []


def test_a_failed_removal_is_a_warning_after_a_deploy(settings: Settings, tmp_path: Path
                                                      ) -> None:
    session = FakeSession(settings, tmp_path / "state")
    host = session.all_hosts[0]
    host.on("com.docker.compose.service=acme", ok("4f2a\n"))
    host.on("rm --stop --force acme", failed("daemon gone"))
    certs.retire_after_switch(session, host)
    assert "could not remove the certificate renewal service" in session.output


def test_a_rollback_removes_the_renewer_where_acme_is_gone(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rollback's switch writes the site from today's settings (no proxy.tls): its finish
    step removes the renewal service as a deploy's does, while the old slot drains."""
    session = FakeSession(settings, tmp_path / "state", names=("web1", "web2"))
    for host in session.all_hosts:
        host.on("com.docker.compose.service=acme", ok("4f2a\n"))
    drained: list[str] = []

    def drain(self: Rollback, meanwhile=None) -> None:
        for host in session.all_hosts:
            meanwhile(host)
            drained.append(host.name)

    monkeypatch.setattr(Rollback, "drain_and_stop_old_slot", drain)
    rollback = Rollback(session, RollbackOptions())  # type: ignore[arg-type]
    rollback.slots = Slots("blue", "green")
    rollback.finish(lambda text: None)
    assert drained == ["web1", "web2"]
    assert all(host.ran("rm --stop --force acme") for host in session.all_hosts)
    assert "web2: certificate renewal service removed (no proxy.tls.acme)" in session.output
