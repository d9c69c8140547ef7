"""Slot operations against an in-memory host: the health gate's deadline, the switch's restore
on any exception, the proxy recreated when its published settings change, and slots started
without pulling images the tool put there itself."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from togather_tasks import commands as cmd
from togather_tasks import proxy, slots
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


def proxy_running(host: FakeHost, settings: Settings, *, port: int | None = None,
                  bind: str | None = None, image: str | None = None) -> None:
    """The host runs a proxy; with the configured image, port and bind unless told."""
    published = {"80/tcp": [{"HostIp": bind or settings.proxy["bind"],
                             "HostPort": str(port or settings.ports["proxy"])}]}
    host.on("{{.Config.Image}} {{json", ok(f"{image or cmd.proxy_image_ref()} "
                                          f"{json.dumps(published)}\n"))


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


# --- item 26: a deploy applies the proxy's configuration -----------------------------------


RECREATE = "--force-recreate proxy"


def test_an_unchanged_proxy_is_only_reloaded(settings: Settings) -> None:
    host = FakeHost()
    proxy_running(host, settings)

    assert proxy.apply_config(settings, host) == "reloaded"
    assert host.ran(RECREATE) == []
    assert len(host.ran("nginx -s reload")) == 1


@pytest.mark.parametrize(("running", "said"), [
    ({"port": 8080}, "port 8080 -> 9080"),
    ({"bind": "127.0.0.1"}, "bind address 127.0.0.1 -> 0.0.0.0"),
    ({"image": "togather-proxy:0ld0ld0ld0ld"}, "image togather-proxy:0ld0ld0ld0ld -> "),
])
def test_a_proxy_whose_settings_changed_is_recreated_and_says_why(
        settings: Settings, running: dict, said: str) -> None:
    host = FakeHost()
    proxy_running(host, settings, **running)

    how = proxy.apply_config(settings, host)

    assert how.startswith("recreated (") and said in how
    assert len(host.ran(RECREATE)) == 1
    assert host.ran("nginx -s reload") == []


def test_a_proxy_that_is_not_running_is_started(settings: Settings) -> None:
    host = FakeHost()
    assert proxy.apply_config(settings, host) == "started"
    assert len(host.ran("up --detach --no-deps proxy")) == 1


def test_a_failing_nginx_test_is_an_error_with_nginx_s_message(settings: Settings) -> None:
    host = FakeHost()
    proxy_running(host, settings)
    host.on("nginx -s reload", failed("nginx: [emerg] unexpected end of file"))
    with pytest.raises(CommandError, match="unexpected end of file"):
        proxy.apply_config(settings, host)


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
        "write compose.yml 644", "write app.env 600", cmd.private_directories(layout.root),
        "write .pgpass 600", "write Dockerfile 644", "write nginx.conf 644"]
