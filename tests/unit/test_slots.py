"""Slot operations against an in-memory host: the health gate's deadline, and slots started
without pulling images the tool put there itself (the proxy's own tests: test_proxy.py)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from togather_tasks import commands as cmd
from togather_tasks import slots
from togather_tasks.config import Settings
from togather_tasks.errors import CommandError, HealthCheckError
from togather_tasks.hosts import Result
from togather_tasks.output import Console
from togather_tasks.redact import Redactor

from .fakehost import FakeHost, answer, failed, ok
from .projects import BASE_CONFIG, Project
from .test_health import body as health_body

TARGET = slots.SlotTarget("green", "togather-server:abc1234", "abc1234")


def load(project: Project, extra: str = "") -> Settings:
    project.write_config(BASE_CONFIG + extra)
    return project.load("staging")


def console() -> Console:
    return Console(Redactor())


def proxy_running(host: FakeHost, settings: Settings, *, network: str = "host",
                  image: str | None = None) -> None:
    """The host runs a proxy; with the configured image in the host's network unless told."""
    host.on("{{.Config.Image}} {{.HostConfig.NetworkMode}}",
            ok(f"{image or cmd.proxy_image_ref('nginx')} {network}\n"))


def running_containers(host: FakeHost) -> None:
    host.on("--quiet", ok("c0ffee\n"))
    host.on("docker inspect --format '{{.State.Status}}", ok("running 0 0\n"))


# --- item 25: the health gate's overall deadline ------------------------------------------


HANGING_GATE = """\
deployment:
  health_check: {retries: 30, interval: 0.1, timeout: 0.5, startup_grace: 0, deadline: 1}
"""


def test_health_gate_gives_up_at_its_deadline_when_the_endpoint_never_answers(
        project: Project) -> None:
    settings = load(project, HANGING_GATE)
    host = FakeHost()
    running_containers(host)

    def hang(address: str, port: int, path: str, timeout: float):
        time.sleep(timeout)
        raise TimeoutError("timed out")

    host.http = hang
    started = time.monotonic()
    with pytest.raises(HealthCheckError, match="did not become healthy"):
        slots.health_gate(settings, host, TARGET, console())
    assert time.monotonic() - started < 2.5  # 30 x (0.5 + 0.1) = 18 s without the deadline


def test_health_gate_deadline_defaults_to_a_minute(settings: Settings) -> None:
    assert settings.health.deadline == 60


def test_health_gate_still_passes_a_healthy_slot(project: Project) -> None:
    settings = load(project, HANGING_GATE)
    host = FakeHost()
    document = health_body(version="abc1234")
    host.http = lambda *a: answer(200, body=json.dumps(document).encode())
    verdict = slots.health_gate(settings, host, TARGET, console())
    assert verdict.version == "abc1234"


# --- item 6: slots start from the image on the host, never pulled ----------------------------


@pytest.mark.parametrize("strategy", ["remote", "local", "registry"])
def test_a_slot_is_started_without_pulling_whatever_the_strategy(
        settings: Settings, strategy: str) -> None:
    settings = dataclasses.replace(settings, build={**settings.build, "strategy": strategy})
    host = FakeHost()

    slots.start_slot(settings, host, TARGET)

    [up] = host.ran(" up --detach")
    # The registry strategy pulled by digest and tagged before: the local name is all compose
    # may use.
    assert "--pull never app-green" in up


def test_an_image_removed_meanwhile_is_a_clear_error(settings: Settings) -> None:
    host = FakeHost()
    host.on(" up --detach", failed("Error response from daemon: No such image: x:abc1234"))
    with pytest.raises(CommandError, match="is not on fake, so the green slot cannot start"):
        slots.start_slot(settings, host, TARGET)


ROUTES = """\
default via 10.77.0.1 dev eth0
10.77.0.0/24 dev eth0 proto kernel scope link src 10.77.0.11
10.0.0.0/8 via 192.168.1.1 dev tun0
172.31.101.0/24 dev docker0 proto kernel scope link src 172.31.101.1 linkdown
"""


def test_an_edge_subnet_inside_a_host_route_stops_before_anything_changes(
        settings: Settings) -> None:
    host = FakeHost()
    host.on("docker network inspect", ok(ROUTES))
    with pytest.raises(CommandError) as raised:
        slots.start_slot(settings, host, TARGET)
    assert (f"the edge network {settings.edge_subnet} of staging would take over addresses "
            "fake reaches through its route '10.0.0.0/8 via 192.168.1.1 dev tun0'"
            ) == raised.value.message
    assert "proxy.subnet" in raised.value.hint and "Nothing was stopped" in raised.value.hint
    assert not host.ran(" up --detach") and host.files == {}


def test_an_existing_edge_network_or_no_overlap_starts_the_slot(settings: Settings) -> None:
    exists = FakeHost()
    exists.on("docker network inspect", ok("togather-edge-exists\n"))
    slots.start_slot(settings, exists, TARGET)
    assert exists.ran(" up --detach")
    elsewhere = dataclasses.replace(settings, proxy={**settings.proxy,
                                                     "subnet": "172.30.9.0/29"})
    free = FakeHost()
    free.on("docker network inspect", ok(ROUTES))
    slots.start_slot(elsewhere, free, TARGET)
    assert free.ran(" up --detach")


# --- issue 8 item 11: the remote directory is closed to other local users --------------------


class OrderedHost(FakeHost):
    """A FakeHost that records commands and file writes in one sequence, with their modes."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.modes: dict[str, int] = {}

    def _run(self, command: str, timeout: float | None) -> Result:
        self.events.append(command)
        return super()._run(command, timeout)

    def _write(self, path: str, data: bytes, mode: int) -> None:
        self.modes[path] = mode
        super()._write(path, data, mode)

    def _rename(self, src: str, dst: str) -> None:
        self.events.append(f"write {dst.rsplit('/', 1)[1]} {self.modes.pop(src):o}")
        super()._rename(src, dst)


def test_prepare_host_closes_the_directories_before_writing_any_file(
        settings: Settings) -> None:
    host = OrderedHost()

    slots.prepare_host(settings, host, primary=True)

    layout = cmd.Layout(settings.remote_dir)
    assert host.events[0] == cmd.host_directories(layout)
    assert host.events[1:] == [
        "write compose.yml 644", "write compose.oneoff.yml 644", "write app.env 600",
        cmd.private_directories(layout.root),
        "write .pgpass 600", "write Dockerfile 644", "write nginx.conf 644",
        "write togather-app.conf 644", "write togather-nginx 755"]
