"""The proxy module against an in-memory host: the generated site configuration, the slot
marker (read, renamed, restored on any failure), the proxy started, recreated or reloaded only
when its image, network mode or site changed, the takeover of a host deployed with the old
upstream file, and the verification token that passes maintenance mode."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from togather_tasks import commands as cmd
from togather_tasks import proxy, tls
from togather_tasks.config import Settings
from togather_tasks.errors import CommandError, HealthCheckError
from togather_tasks.hosts import HttpResponse

from .fakehost import FakeHost, ProxyDisk, answer, failed, ok
from .test_slots import proxy_running

RECREATE = "--force-recreate proxy"
RELOAD = "nginx -s reload"
LEGACY_GREEN = ('map "" $togather_backend {\n    default app-green:8080;\n}\n'
                'map "" $togather_slot {\n    default green;\n}\n')


def serving(host: FakeHost, disk: ProxyDisk, settings: Settings,
            versions: dict[str, str] | None = None) -> None:
    """nginx as it behaves: each request goes to the slot the marker names (blue when none),
    and the slot answers its version."""
    versions = versions or {"blue": "0ld0ld0", "green": "abc1234"}

    def http(address: str, port: int, path: str, timeout: float) -> HttpResponse:
        slot = disk.slot or "blue"
        return answer(200, slot=slot, body=json.dumps({"version": versions[slot]}).encode())

    host.http = http


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def disk(host: FakeHost, settings: Settings) -> ProxyDisk:
    return ProxyDisk(host, settings)


def with_loaded_site(host: FakeHost, settings: Settings) -> None:
    host.disk.load_site(settings)


# --- the site configuration (pure) ---------------------------------------------------------


def test_site_conf_is_exact(settings: Settings) -> None:
    assert proxy.site_conf(settings) == """\
# Written by togather-tasks for the staging environment; rewritten by every deploy.
upstream togather_blue {
    server 10.201.27.202:8080;
    keepalive 1024;
    keepalive_requests 10000;
    keepalive_timeout 30s;
}

upstream togather_green {
    server 10.201.27.203:8080;
    keepalive 1024;
    keepalive_requests 10000;
    keepalive_timeout 30s;
}

server {
    listen 0.0.0.0:9080 default_server;
    client_max_body_size 100m;
    proxy_read_timeout 60s;
    include /etc/nginx/togather-app.conf;
}
"""


def test_a_slot_container_not_on_the_edge_network_keeps_its_published_port(
        settings: Settings) -> None:
    """A host deployed by an older version: its running blue slot predates the edge network,
    so nginx reaches it on 127.0.0.1:<blue port> until it is recreated; green (new) on the
    edge network."""
    text = proxy.site_conf(settings, frozenset({"blue"}))
    assert "upstream togather_blue {\n    server 127.0.0.1:9081;\n" in text
    assert "upstream togather_green {\n    server 10.201.27.203:8080;\n" in text


def test_proxy_subnet_chooses_the_edge_addresses(settings: Settings) -> None:
    chosen = dataclasses.replace(settings, proxy={**settings.proxy, "subnet": "172.30.9.0/24"})
    text = proxy.site_conf(chosen)
    assert "    server 172.30.9.2:8080;\n" in text and "    server 172.30.9.3:8080;\n" in text


def test_site_conf_follows_bind_keepalive_and_ipv6(settings: Settings) -> None:
    settings = dataclasses.replace(settings, proxy={**settings.proxy, "bind": "::1",
                                                    "keepalive": 8})
    text = proxy.site_conf(settings)
    assert "    listen [::1]:9080 default_server;\n" in text
    assert text.count("    keepalive 8;\n") == 2
    assert proxy.address(settings) == "::1"


def test_body_size_and_read_timeout_reach_every_server_block_and_are_named_when_changed(
        settings: Settings) -> None:
    with_tls = dataclasses.replace(settings, tls=tls.TlsSettings(
        domains=("example.test",), https_port=9443, redirect=False, hsts=None,
        certificate=None, key=None, acme=None))
    chosen = dataclasses.replace(with_tls, proxy={**settings.proxy, "max_body_size": "1g",
                                                  "read_timeout": 300})
    text = proxy.site_conf(chosen)
    # HTTP and HTTPS, each before the include whose location inherits them.
    assert text.count("    client_max_body_size 1g;\n    proxy_read_timeout 300s;\n") == 2
    assert all(block.index("client_max_body_size") < block.index("togather-app.conf")
               for block in text.split("server {")[1:])
    assert proxy.site_changes(proxy.site_conf(with_tls), text) == (
        "client_max_body_size 100m -> 1g, proxy_read_timeout 60s -> 300s, "
        "client_max_body_size 100m -> 1g, proxy_read_timeout 60s -> 300s")


def test_the_image_leaves_the_read_timeout_to_the_site() -> None:
    """A location-level proxy_read_timeout in togather-app.conf would override the server's."""
    include = (Path(proxy.__file__).parent.parent / "docker/nginx/togather-app.conf").read_text()
    directives = [line.split()[0] for line in include.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    assert "proxy_read_timeout" not in directives
    assert "client_max_body_size" not in directives


def test_the_server_blocks_are_a_list_another_scheme_can_extend(settings: Settings) -> None:
    blocks = proxy.server_blocks(settings)
    assert blocks == [proxy.http_server(settings)]
    assert all(block.rstrip().endswith("}") for block in blocks)


def test_site_changes_names_the_directives_that_changed(settings: Settings) -> None:
    moved = dataclasses.replace(settings, ports={**settings.ports, "proxy": 9180, "blue": 9181})
    said = proxy.site_changes(proxy.site_conf(settings), proxy.site_conf(moved))
    # The blue port moves the edge subnet (edge.derived_subnet): both slots' addresses change.
    assert said == ("server 10.201.27.202:8080 -> 10.201.30.234:8080, "
                    "server 10.201.27.203:8080 -> 10.201.30.235:8080, "
                    "listen 0.0.0.0:9080 -> 0.0.0.0:9180")
    assert proxy.site_changes("", proxy.site_conf(settings)) == "site.conf written"


def test_the_verification_map_holds_one_token_and_reads_back() -> None:
    assert proxy.verify_map("0f" * 16) == f'"{"0f" * 16}" 1;\n'
    assert proxy.token_in(proxy.verify_map("0f" * 16)) == "0f" * 16
    assert proxy.token_in("") is None
    assert proxy.token_in('"short" 1;\n') is None  # never a guessable value


@pytest.mark.parametrize(("output", "marker", "legacy", "maintenance"), [
    ("--\n", None, None, False),
    ("blue\n--\n", "blue", None, False),
    ("green\nmaintenance\n--\n", "green", None, True),
    ("--\n" + LEGACY_GREEN, None, "green", False),
    ("blue\n--\n" + LEGACY_GREEN, "blue", "green", False),
])
def test_parse_routes(output: str, marker: str | None, legacy: str | None,
                      maintenance: bool) -> None:
    routes = proxy.parse_routes(output)
    assert (routes.marker, routes.legacy, routes.maintenance) == (marker, legacy, maintenance)
    assert routes.slot == (marker or legacy)


def test_the_marker_commands_are_exact() -> None:
    layout = cmd.Layout("/srv/togather/staging")
    state = "/srv/togather/staging/nginx/state"
    assert cmd.mark_slot(layout, "green") == (
        f"{{ mv -fT {state}/blue {state}/green 2>/dev/null || [ ! -e {state}/blue ]; }} && "
        f"{{ [ -e {state}/green ] || : > {state}/green; }}")
    assert cmd.unmark_slots(layout) == f"rm -f {state}/blue {state}/green"
    assert cmd.read_routes(layout) == (
        f"for n in green blue; do [ -f {state}/$n ] && echo $n; done; "
        f"[ -e {state}/maintenance ] && echo maintenance; echo --; "
        "cat /srv/togather/staging/nginx/upstream/active.conf 2>/dev/null; true")


# --- the running proxy: started, recreated, reloaded or left alone ------------------------


def test_an_unchanged_proxy_is_left_alone(host: FakeHost, disk: ProxyDisk,
                                          settings: Settings) -> None:
    with_loaded_site(host, settings)
    proxy_running(host, settings)
    site, _ = proxy.write_site(settings, host)

    assert proxy.apply_config(settings, host, site) == "unchanged"
    assert host.ran(RECREATE) == [] and host.ran(RELOAD) == []


@pytest.mark.parametrize(("running", "said"), [
    ({"network": "togather-staging_default"}, "network togather-staging_default -> host"),
    ({"image": "togather-proxy:0ld0ld0ld0ld"}, "image togather-proxy:0ld0ld0ld0ld -> "),
])
def test_a_proxy_whose_image_or_network_differs_is_recreated_and_says_why(
        host: FakeHost, disk: ProxyDisk, settings: Settings, running: dict, said: str) -> None:
    with_loaded_site(host, settings)
    proxy_running(host, settings, **running)
    site, _ = proxy.write_site(settings, host)

    how = proxy.apply_config(settings, host, site)

    assert how.startswith("recreated (") and said in how
    assert len(host.ran(RECREATE)) == 1 and host.ran(RELOAD) == []


def test_a_changed_site_is_reloaded_and_recorded_as_loaded(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    with_loaded_site(host, settings)
    proxy_running(host, settings)
    moved = dataclasses.replace(settings, ports={**settings.ports, "proxy": 9180})
    site, _ = proxy.write_site(moved, host)

    how = proxy.apply_config(moved, host, site)

    assert how == "reloaded (listen 0.0.0.0:9080 -> 0.0.0.0:9180)"
    layout = cmd.Layout(settings.remote_dir)
    assert host.files[layout.site_file].decode() == proxy.site_conf(moved)
    assert host.files[layout.site_loaded].decode().strip() == proxy.site_digest(
        proxy.site_conf(moved) + proxy.verify_map("ab" * 16))
    assert host.ran(RECREATE) == []


def test_a_site_written_but_never_loaded_is_reloaded_by_the_next_run(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    """A run cut between writing site.conf and the reload: the file is right, nginx is not."""
    with_loaded_site(host, settings)
    host.files[cmd.Layout(settings.remote_dir).site_loaded] = b"0" * 64
    proxy_running(host, settings)
    site, _ = proxy.write_site(settings, host)
    assert proxy.apply_config(settings, host, site).startswith("reloaded")


def test_a_token_nginx_never_loaded_is_reloaded(host: FakeHost, disk: ProxyDisk,
                                               settings: Settings) -> None:
    """verify.map lost while nginx ran: a new token is made, and nginx must load it."""
    with_loaded_site(host, settings)
    del host.files[cmd.Layout(settings.remote_dir).verify_map]
    proxy_running(host, settings)
    site, token = proxy.write_site(settings, host)
    assert token != "ab" * 16
    assert proxy.apply_config(settings, host, site).startswith("reloaded")


def test_a_failing_nginx_test_is_an_error_and_puts_the_old_site_back(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    with_loaded_site(host, settings)
    proxy_running(host, settings)
    host.on(RELOAD, failed("nginx: [emerg] unexpected end of file"))
    moved = dataclasses.replace(settings, ports={**settings.ports, "proxy": 9180})
    site, _ = proxy.write_site(moved, host)

    with pytest.raises(CommandError, match="unexpected end of file") as info:
        proxy.apply_config(moved, host, site)
    assert str(info.value).startswith("nginx -t (configuration test) or reload failed")
    assert host.files[cmd.Layout(settings.remote_dir).site_file].decode() == \
        proxy.site_conf(settings)


def test_a_refused_haproxy_reload_names_haproxys_configuration_test(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    hap = dataclasses.replace(settings, proxy={**settings.proxy, "engine": "haproxy"})
    with_loaded_site(host, hap)
    proxy_running(host, hap, image=cmd.proxy_image_ref("haproxy"))
    host.on("togather-haproxy reload", failed("[ALERT] config : parsing error"))
    moved = dataclasses.replace(hap, ports={**hap.ports, "proxy": 9180})
    site, _ = proxy.write_site(moved, host)

    with pytest.raises(CommandError, match="parsing error") as info:
        proxy.apply_config(moved, host, site)
    assert str(info.value).startswith("haproxy -c (configuration test) or reload failed")


def test_a_proxy_that_is_not_running_is_started_with_a_new_token(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    site, token = proxy.write_site(settings, host)
    assert proxy.apply_config(settings, host, site) == "started"
    assert len(host.ran("up --detach --no-deps proxy")) == 1
    layout = cmd.Layout(settings.remote_dir)
    assert proxy.token_in(host.files[layout.verify_map].decode()) == token
    assert len(token) == 32
    # The next run keeps the host's token.
    assert proxy.write_site(settings, host)[1] == token


# --- the switch: one rename, no reload ----------------------------------------------------


def test_a_switch_renames_the_marker_verifies_with_the_token_and_never_reloads(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    with_loaded_site(host, settings)
    proxy_running(host, settings)
    disk.mark("blue")
    serving(host, disk, settings)

    switched = proxy.switch(settings, host, "green", "abc1234")

    assert (switched.how, switched.previous, disk.slot) == ("unchanged", "blue", "green")
    assert host.ran(RELOAD) == [] and host.ran(RECREATE) == []
    # Two round trips: the marker, files and running proxy read at once, then the rename.
    assert len(host.commands) == 2 and "mv -fT" in host.commands[1]
    assert host.request_headers[-1] == {proxy.VERIFY_HEADER: "ab" * 16}
    assert switched.notes() == []


def test_a_switch_that_does_not_verify_puts_the_marker_back(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    settings = dataclasses.replace(settings, proxy={**settings.proxy, "verify_attempts": 2})
    with_loaded_site(host, settings)
    proxy_running(host, settings)
    disk.mark("blue")
    serving(host, disk, settings, {"blue": "0ld0ld0", "green": "0ther00"})

    with pytest.raises(HealthCheckError, match="does not serve green/abc1234"):
        proxy.switch(settings, host, "green", "abc1234")
    assert disk.slot == "blue"


def test_verify_pauses_start_short_and_are_capped() -> None:
    assert proxy.verify_pauses(1) == []
    assert proxy.verify_pauses(7) == [0.02, 0.04, 0.08, 0.16, 0.25, 0.25]
    assert sum(proxy.verify_pauses(20)) == pytest.approx(4.05)


def test_verify_asks_at_once_then_backs_off_and_stops_after_its_attempts(
        host: FakeHost, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dataclasses.replace(settings, proxy={**settings.proxy, "verify_attempts": 4})
    slept: list[float] = []
    monkeypatch.setattr(proxy.time, "sleep", slept.append)
    answers = iter([answer(502), answer(200, slot="blue"), answer(200, slot="green")])
    host.http = lambda *_: next(answers)
    no_version = dataclasses.replace(settings, version_endpoint=None)

    assert proxy.verify(no_version, host, "green", None) is None
    assert slept == [0.02, 0.04]  # two answers missed, no pause before the first request

    slept.clear()
    calls: list[str] = []
    host.http = lambda address, port, path, timeout: calls.append(path) or answer(503)
    assert proxy.verify(no_version, host, "green", None) == "HTTP 503, slot None, version None"
    assert len(calls) == 4 and slept == [0.02, 0.04, 0.08]  # none after the last request


def test_a_marker_that_cannot_be_renamed_is_a_switch_error_and_nothing_moves(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    with_loaded_site(host, settings)
    proxy_running(host, settings)
    disk.mark("blue")
    disk.refuse_marks = True

    with pytest.raises(HealthCheckError, match="switching traffic to green failed"):
        proxy.switch(settings, host, "green", "abc1234")
    assert disk.slot == "blue"


def test_a_first_switch_undone_leaves_no_marker(host: FakeHost, disk: ProxyDisk,
                                                settings: Settings) -> None:
    settings = dataclasses.replace(settings, proxy={**settings.proxy, "verify_attempts": 1})
    with pytest.raises(HealthCheckError):
        proxy.switch(settings, host, "blue", "abc1234")  # no proxy answers
    assert disk.slot is None
    assert proxy.routed_slot(settings, host) is None


def test_switch_back_marks_the_previous_slot_and_verifies_it(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    with_loaded_site(host, settings)
    disk.mark("green")
    serving(host, disk, settings)

    proxy.switch_back(settings, host, "blue", "0ld0ld0")

    assert disk.slot == "blue"
    assert host.request_headers[-1] == {proxy.VERIFY_HEADER: "ab" * 16}
    proxy.switch_back(settings, host, None, None)  # first deploy: nothing to go back to
    assert disk.slot == "blue"


def test_a_switch_during_maintenance_says_it_stays_on(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    with_loaded_site(host, settings)
    proxy_running(host, settings)
    disk.mark("blue")
    host.files[cmd.Layout(settings.remote_dir).maintenance_link] = b""
    serving(host, disk, settings)

    switched = proxy.switch(settings, host, "green", "abc1234")

    assert switched.maintenance
    assert any("maintenance mode is on and stays on" in note for note in switched.notes())


# --- a host deployed by the previous version (upstream file, bridge-network proxy) ----------


def test_a_host_with_the_old_upstream_file_is_taken_over(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    layout = cmd.Layout(settings.remote_dir)
    host.files[layout.upstream_file] = LEGACY_GREEN.encode()
    proxy_running(host, settings, network="togather-staging_default",
                  image="togather-proxy:0ld0ld0ld0ld")
    serving(host, disk, settings, {"blue": "abc1234", "green": "0ld0ld0"})
    assert proxy.routed_slot(settings, host) == "green"

    switched = proxy.switch(settings, host, "blue", "abc1234")

    assert switched.previous == "green"
    assert switched.how.startswith("recreated (image togather-proxy:0ld0ld0ld0ld -> ")
    assert "network togather-staging_default -> host" in switched.how
    # The old slot was marked before the proxy was recreated, the new one after.
    journal = [c for _, c in host.journal]
    marked_old = next(i for i, c in enumerate(journal) if "mv -fT" in c)
    recreated = next(i for i, c in enumerate(journal) if RECREATE in c)
    marked_new = max(i for i, c in enumerate(journal) if "mv -fT" in c)
    assert marked_old < recreated < marked_new
    assert disk.slot == "blue"
    assert any(c == cmd.remove_trees(layout.upstream_dir) for c in journal)
    assert proxy.site_conf(settings) == host.files[layout.site_file].decode()


def test_a_proxy_started_on_a_taken_port_says_what_nginx_said(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    settings = dataclasses.replace(settings, proxy={**settings.proxy, "verify_attempts": 1})
    host.on("logs --no-color", ok(
        "2026/12/06 07:00:00 [emerg] 1#1: bind() to 0.0.0.0:9080 failed (98: Address already "
        "in use)\n"))

    with pytest.raises(HealthCheckError, match=r"nginx says: .*Address already in use"):
        proxy.switch(settings, host, "blue", "abc1234")
    assert disk.slot is None


def test_write_site_keeps_the_published_port_for_a_slot_not_on_the_edge_network(
        host: FakeHost, disk: ProxyDisk, settings: Settings) -> None:
    """The switch reads the slots' networks with the proxy's files: a blue container from
    before the edge network is reached on its published port, and nginx must reload."""
    disk.load_site(settings)
    project = settings.compose_project
    disk.slot_networks = (f"app-blue {project}_default\n"
                          f"app-green {project}_default,{project}_edge\n")
    site, _ = proxy.write_site(settings, host)
    written = host.files[cmd.Layout(settings.remote_dir).site_file].decode()
    assert written == site.text == proxy.site_conf(settings, frozenset({"blue"}))
    assert "    server 127.0.0.1:9081;\n" in written
    assert site.stale
    # Both on the network: the site nginx loaded, nothing to reload.
    disk.slot_networks = (f"app-blue {project}_default,{project}_edge\n"
                          f"app-green {project}_edge\n")
    disk.load_site(settings)
    site, _ = proxy.write_site(settings, host)
    assert not site.stale


def test_changes_names_the_image_network_and_worker_setting_that_differ(
        settings: Settings) -> None:
    image = cmd.proxy_image_ref("nginx")
    assert proxy.changes(settings, f"{image} host workers=\n") == []
    # A proxy started by an older version prints no worker setting: the default either way.
    assert proxy.changes(settings, f"{image} host\n") == []
    assert proxy.changes(settings, "togather-proxy:old bridge workers=\n") == [
        f"image togather-proxy:old -> {image}", "network bridge -> host"]
    four = dataclasses.replace(settings, proxy={**settings.proxy, "workers": 4})
    assert proxy.changes(four, f"{image} host workers=\n") == ["workers default -> 4"]
    assert proxy.changes(four, f"{image} host workers=4\n") == []
    auto = dataclasses.replace(settings, proxy={**settings.proxy, "workers": "auto"})
    assert proxy.changes(auto, f"{image} host workers=4\n") == ["workers 4 -> auto"]


def test_a_proxy_in_dockers_shared_cgroup_moves_to_one_of_its_own(settings: Settings) -> None:
    """commands.PROXY_CGROUP_PROBE says what the host wants (`own=`); a proxy started before,
    in Docker's group, is recreated once; a rootless daemon wants Docker's default."""
    image = cmd.proxy_image_ref("nginx")
    assert proxy.changes(settings, f"{image} host workers= cgroup= own=/togather\n") == [
        "cgroup Docker's -> /togather"]
    assert proxy.changes(settings, f"{image} host workers= cgroup=/togather own=/togather") == []
    assert proxy.changes(settings, f"{image} host workers= cgroup=togather.slice "
                                   "own=togather.slice") == []
    assert proxy.changes(settings, f"{image} host workers= cgroup= own=\n") == []
