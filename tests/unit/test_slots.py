"""Slot operations against an in-memory host: the health gate's deadline, the switch's restore
on any exception, the proxy recreated when its published settings change, and slots started
without pulling images the tool put there itself."""

from __future__ import annotations

import json
import time

import pytest

from togather_tasks import slots
from togather_tasks.config import Settings
from togather_tasks.errors import HealthCheckError
from togather_tasks.output import Console
from togather_tasks.redact import Redactor

from .fakehost import FakeHost, answer, ok
from .projects import BASE_CONFIG, Project
from .test_health import body as health_body

TARGET = slots.SlotTarget("green", "togather-server:abc1234", "abc1234")


def load(project: Project, extra: str = "") -> Settings:
    project.write_config(BASE_CONFIG + extra)
    return project.load("staging")


def console() -> Console:
    return Console(Redactor())


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
