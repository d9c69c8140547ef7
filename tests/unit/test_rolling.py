"""Rolling deploys (deployment.rolling: {batch: N}) on a fleet of in-memory hosts: the wave
plan, wave k switching only after wave k-1 answered healthy through its proxies, and a failure
in a later wave switching back every wave already switched, verified, before any slot stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from togather_tasks import fleet
from togather_tasks.config import Settings
from togather_tasks.deploy import Deploy, DeployOptions
from togather_tasks.errors import ConfigError, HealthCheckError, Interrupted
from togather_tasks.hosts import HttpResponse
from togather_tasks.operation import Release
from togather_tasks.signals import interruptible
from togather_tasks.slots import Slots

from .fakehost import STOP, FakeSession
from .projects import BASE_CONFIG, Project
from .test_fleet import SHA, fast, history, routes, sigterm_during_start, simulate, stopped

NAMES = ("web1", "web2", "web3")
MARK = "mv -fT "  # a switch (or a switch back): the slot marker's rename


@pytest.mark.parametrize(("batch", "expected"), [
    (1, [["a"], ["b"], ["c"]]),
    (2, [["a", "b"], ["c"]]),
    (3, [["a", "b", "c"]]),
    (5, [["a", "b", "c"]]),
    (None, [["a", "b", "c"]]),
])
def test_waves_follow_the_host_order_in_batches(batch: int | None,
                                                expected: list[list[str]]) -> None:
    assert fleet.waves(["a", "b", "c"], batch) == expected


def rolling_session(settings: Settings, tmp_path: Path, batch: int, *,
                    unhealthy: str | None = None) -> FakeSession:
    session = FakeSession(fast(settings, rolling={"batch": batch}), tmp_path / "state",
                          names=NAMES)
    for host in session.all_hosts:
        simulate(host, session.settings, unhealthy=host.name == unhealthy)
    return session


def rolling_deploy(session: FakeSession) -> Deploy:
    """Lock, waves, record, finish of a blue -> green deploy (the runbook's own rows)."""
    deploy = Deploy(session, DeployOptions())  # type: ignore[arg-type]
    deploy.release = Release(SHA, f"togather-server:{SHA[:7]}")
    deploy.slots = Slots("green", "blue")
    deploy.run_steps([step for step in deploy.runbook
                      if step.name in ("lock", "waves", "record", "finish")])
    return deploy


def first(session: FakeSession, host: str, fragment: str) -> int:
    return next(i for i, (h, c) in enumerate(session.journal) if h == host and fragment in c)


def last(session: FakeSession, host: str, fragment: str) -> int:
    return max(i for i, (h, c) in enumerate(session.journal) if h == host and fragment in c)


START = "up --detach --no-deps --pull"


def test_the_runbook_has_waves_instead_of_start_health_switch(settings: Settings,
                                                              tmp_path: Path) -> None:
    rolling = Deploy(rolling_session(settings, tmp_path, 1),  # type: ignore[arg-type]
                     DeployOptions())
    names = [step.name for step in rolling.runbook]
    assert "waves" in names and not {"start", "health", "switch"} & set(names)
    assert names.index("migrate") < names.index("waves") < names.index("record")
    default = Deploy(FakeSession(settings, tmp_path / "d"),  # type: ignore[arg-type]
                     DeployOptions())
    assert "waves" not in [step.name for step in default.runbook]


def test_each_wave_is_switched_and_healthy_through_its_proxy_before_the_next_starts(
        settings: Settings, tmp_path: Path) -> None:
    session = rolling_session(settings, tmp_path, 1)
    proxy_port = session.settings.ports["proxy"]
    through_proxy: list[str] = []
    for host in session.all_hosts:
        answer = host.http

        def http(address: str, port: int, path: str, timeout: float, host=host,
                 answer=answer) -> HttpResponse:
            if port == proxy_port and path == session.settings.health_endpoint:
                through_proxy.append(host.name)
                session.journal.append((host.name, "GET proxy health"))
            return answer(address, port, path, timeout)

        host.http = http

    rolling_deploy(session)

    assert routes(session) == {"web1": "green", "web2": "green", "web3": "green"}
    for earlier, later in (("web1", "web2"), ("web2", "web3")):
        gated = last(session, earlier, "GET proxy health")
        assert first(session, earlier, MARK) < gated < first(session, later, START)
    assert through_proxy == list(NAMES)
    assert sorted(stopped(session, "blue")) == list(NAMES)
    assert "wave 3/3 on green" in session.output
    assert session.store.read().state.active_slot == "green"


def test_a_failure_in_the_last_wave_switches_back_the_waves_before_anything_stops(
        settings: Settings, tmp_path: Path) -> None:
    session = rolling_session(settings, tmp_path, 1, unhealthy="web3")

    with pytest.raises(HealthCheckError, match="web3: the green slot did not become healthy"):
        rolling_deploy(session)

    assert routes(session) == {"web1": "blue", "web2": "blue", "web3": "blue"}
    first_stop = next(i for i, (_, c) in enumerate(session.journal) if STOP in c)
    for host in ("web1", "web2"):
        assert last(session, host, MARK) < first_stop, host
        assert f"{host}: switched back to the blue slot" in session.output
    assert not session.host("web3").ran(MARK)  # never switched
    assert sorted(stopped(session, "green")) == list(NAMES)
    assert stopped(session, "blue") == []
    [entry] = history(session)
    assert (entry["status"], entry["health_status"]) == ("failed", "unhealthy")
    assert session.store.read().state.lock == {"locked": False}
    assert session.store.read().state.active_slot is None  # nothing recorded as current


def test_a_switch_failing_in_the_second_wave_of_two_undoes_the_first(
        settings: Settings, tmp_path: Path) -> None:
    session = rolling_session(settings, tmp_path, 2)  # waves: web1+web2, then web3
    session.host("web3").disk.refuse_marks = True  # its slot marker cannot be renamed

    with pytest.raises(HealthCheckError, match="switching traffic to green failed"):
        rolling_deploy(session)

    assert routes(session) == {"web1": "blue", "web2": "blue", "web3": "blue"}
    assert sorted(stopped(session, "green")) == list(NAMES)
    assert first(session, "web2", MARK) < first(session, "web3", START)


def test_a_wave_that_is_unhealthy_through_its_proxy_is_switched_back(
        settings: Settings, tmp_path: Path) -> None:
    """The slot answers healthy on its own port, but not through web2's proxy after the
    switch (e.g. the proxy cannot reach it): web1 and web2 go back, web3 never starts."""
    session = rolling_session(settings, tmp_path, 1)
    web2 = session.host("web2")
    answer = web2.http
    proxy_port = session.settings.ports["proxy"]

    def http(address: str, port: int, path: str, timeout: float) -> HttpResponse:
        if port == proxy_port and path == session.settings.health_endpoint:
            return HttpResponse(502, {}, b"bad gateway")
        return answer(address, port, path, timeout)

    web2.http = http

    with pytest.raises(HealthCheckError, match="through the proxy on web2"):
        rolling_deploy(session)

    assert routes(session) == {"web1": "blue", "web2": "blue", "web3": "blue"}
    assert not session.host("web3").ran(START)
    assert sorted(stopped(session, "green")) == ["web1", "web2"]


def test_rolling_is_off_by_default_and_its_batch_is_validated(project: Project) -> None:
    assert project.load().deployment["rolling"] is None  # all or none
    project.write_config(BASE_CONFIG + "deployment:\n  rolling: {batch: 2}\n")
    assert project.load().deployment["rolling"] == {"batch": 2}
    for bad in ("{batch: 0}", "{}", "{batch: 1, pause: 3}"):
        project.write_config(BASE_CONFIG + f"deployment:\n  rolling: {bad}\n")
        with pytest.raises(ConfigError) as info:
            project.load()
        assert any("deployment.rolling" in problem for problem in info.value.problems), bad


def test_sigterm_during_the_second_wave_switches_the_first_back_and_frees_the_lock(
        settings: Settings, tmp_path: Path) -> None:
    session = rolling_session(settings, tmp_path, 1)
    sigterm_during_start(session, 0.3, after=2)  # web2's start: web1 has switched

    with pytest.raises(Interrupted), interruptible():
        rolling_deploy(session)

    assert routes(session) == {"web1": "blue", "web2": "blue", "web3": "blue"}
    assert "web1: switched back to the blue slot" in session.output
    assert sorted(stopped(session, "green")) == ["web1", "web2"]
    assert not session.host("web3").ran(START)
    assert session.store.read().state.lock == {"locked": False}
