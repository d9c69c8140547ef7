"""A deploy on a fleet of in-memory hosts: all or none (a switch failing on one host is undone
on every host before anything stops; one unhealthy host keeps every host on the old slot),
a Ctrl-C during the parallel start stops every slot that started and frees the lock, hosts
whose proxies disagree are repaired towards one slot, and the bound on parallel work."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from togather_tasks import commands as cmd
from togather_tasks import fleet
from togather_tasks.config import Settings
from togather_tasks.deploy import Deploy, DeployOptions
from togather_tasks.errors import (
    HealthCheckError,
    HostUnreachableError,
    Interrupted,
    TogatherError,
)
from togather_tasks.hosts import HttpResponse
from togather_tasks.operation import Release
from togather_tasks.signals import interruptible
from togather_tasks.slots import Slots, choose_slots
from togather_tasks.state import new_deployment, utc_now
from togather_tasks.ulid import new_id

from .fakehost import (
    STOP,
    FakeHost,
    FakeSession,
    ProxyDisk,
    answer,
    batch_answer,
    failed,
    ok,
    stop_fragment,
)
from .test_health import body as health_body
from .test_slots import proxy_running

SHA = "abc1234" + "0" * 33
OLD = "0bd1234" + "0" * 33
VERSIONS = {"blue": OLD[:7], "green": SHA[:7]}
FAST = {"retries": 3, "interval": 0.05, "timeout": 0.5, "startup_grace": 0, "deadline": 2}


def fast(settings: Settings, **deployment: object) -> Settings:
    return dataclasses.replace(settings, deployment={
        **settings.deployment, "health_check": FAST, "drain_seconds": 0, **deployment})


def simulate(host: FakeHost, settings: Settings, *, routes: str = "blue",
             unhealthy: bool = False) -> None:
    """A host whose proxy serves what its slot marker says (nginx reads it per request), and
    whose slots answer their version: blue the old one, green the new one."""
    disk = ProxyDisk(host, settings)
    disk.load_site(settings)
    disk.mark(routes)
    proxy_running(host, settings)
    host.on("com.docker.compose.service=app-", ok("c0ffee\n"))
    host.on("docker inspect --format '{{.State.Status}}", ok("running 0 0\n"))

    def http(address: str, port: int, path: str, timeout: float) -> HttpResponse:
        if port == settings.ports["proxy"]:
            slot = disk.slot
            if path == settings.version_endpoint:
                return answer(200, slot=slot,
                              body=json.dumps({"version": VERSIONS.get(slot or "")}).encode())
        else:
            slot = "green" if port == settings.ports["green"] else "blue"
        status = "unhealthy" if unhealthy and slot == "green" else "healthy"
        return HttpResponse(503 if status == "unhealthy" else 200, {},
                            json.dumps(health_body(status, VERSIONS[slot])).encode())

    host.http = http


@pytest.fixture
def fleet_session(settings: Settings, tmp_path: Path) -> FakeSession:
    session = FakeSession(fast(settings), tmp_path / "state", names=("web1", "web2"))
    for host in session.all_hosts:
        simulate(host, session.settings)
    return session


def deploy_from_start(session: FakeSession) -> Deploy:
    """Lock, start, health, switch, record, finish of a blue -> green deploy."""
    deploy = Deploy(session, DeployOptions())  # type: ignore[arg-type]
    deploy.release = Release(SHA, f"togather-server:{SHA[:7]}")
    deploy.slots = Slots("green", "blue")
    rows = {row.name: row for row in Deploy.steps}
    deploy.run_steps([rows[name] for name in ("lock", "start", "health", "switch", "record",
                                              "finish")])
    return deploy


def routes(session: FakeSession) -> dict[str, str | None]:
    return {h.name: h.disk.slot for h in session.all_hosts}


def marks(journal: list[tuple[str, str]], host: str) -> list[int]:
    """Where in the journal `host` renamed its slot marker."""
    return [i for i, (h, c) in enumerate(journal) if h == host and "mv -fT" in c]


def stopped(session: FakeSession, slot: str) -> list[str]:
    return [name for name, command in session.journal
            if stop_fragment(slot) in command]


def history(session: FakeSession) -> list[dict]:
    return session.store.read().state.history


def test_a_fleet_deploy_switches_every_host_and_stops_the_old_slot_everywhere(
        fleet_session: FakeSession) -> None:
    deploy_from_start(fleet_session)

    assert routes(fleet_session) == {"web1": "green", "web2": "green"}
    assert sorted(stopped(fleet_session, "blue")) == ["web1", "web2"]
    assert stopped(fleet_session, "green") == []
    assert fleet_session.store.read().state.active_slot == "green"


def test_host2s_switch_fails_host1_is_switched_back_and_verified_before_anything_stops(
        fleet_session: FakeSession) -> None:
    fleet_session.host("web2").disk.refuse_marks = True

    with pytest.raises(HealthCheckError, match="switching traffic to green failed: .* on web2"):
        deploy_from_start(fleet_session)

    assert routes(fleet_session) == {"web1": "blue", "web2": "blue"}
    journal = fleet_session.journal
    first_stop = next(i for i, (_, c) in enumerate(journal) if STOP in c)
    web1_back = max(marks(journal, "web1"))
    assert web1_back < first_stop
    assert not [c for _, c in journal if "nginx -s reload" in c]
    assert sorted(stopped(fleet_session, "green")) == ["web1", "web2"]
    assert stopped(fleet_session, "blue") == []
    assert "web1: switched back to the blue slot" in fleet_session.output
    [entry] = history(fleet_session)
    assert entry["status"] == "failed"
    assert fleet_session.store.read().state.lock == {"locked": False}


def test_a_host_that_cannot_switch_back_keeps_its_new_slot_running(
        fleet_session: FakeSession) -> None:
    fleet_session.host("web2").disk.refuse_marks = True
    fleet_session.host("web1").disk.marks_allowed = 1  # the switch, not the switch back

    with pytest.raises(HealthCheckError):
        deploy_from_start(fleet_session)

    assert routes(fleet_session) == {"web1": "green", "web2": "blue"}
    assert stopped(fleet_session, "blue") == []
    assert stopped(fleet_session, "green") == ["web2"]  # web1's proxy routes to it
    assert "web1: switching back to blue could not be verified" in fleet_session.output
    assert "left the new green slot running on web1" in fleet_session.output


def test_host2_unhealthy_keeps_every_host_on_the_old_slot(settings: Settings,
                                                          tmp_path: Path) -> None:
    session = FakeSession(fast(settings), tmp_path / "state", names=("web1", "web2"))
    simulate(session.host("web1"), session.settings)
    simulate(session.host("web2"), session.settings, unhealthy=True)

    with pytest.raises(HealthCheckError, match="^web2: the green slot did not become healthy"):
        deploy_from_start(session)

    assert routes(session) == {"web1": "blue", "web2": "blue"}
    assert not [c for _, c in session.journal if "mv -fT" in c]
    assert sorted(stopped(session, "green")) == ["web1", "web2"]
    [entry] = history(session)
    assert entry["health_status"] == "unhealthy"
    assert "web2 FAILED" in session.output


def sigterm_during_start(session: FakeSession, seconds: float, *, after: int) -> None:
    """Every host's `compose up` takes `seconds`; once `after` of them have begun, SIGTERM,
    which reaches the main thread while it waits for the hosts."""
    begun = []

    def slow_start(command: str):
        begun.append(command)
        if len(begun) == after:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(seconds)
        return ok()

    for host in session.all_hosts:
        host.on("up --detach --no-deps --pull", slow_start)


def test_interrupted_during_the_parallel_start_stops_every_started_slot_and_frees_the_lock(
        fleet_session: FakeSession) -> None:
    sigterm_during_start(fleet_session, 0.6, after=2)

    with pytest.raises(Interrupted), interruptible():
        deploy_from_start(fleet_session)

    assert sorted(stopped(fleet_session, "green")) == ["web1", "web2"]
    assert routes(fleet_session) == {"web1": "blue", "web2": "blue"}
    assert fleet_session.store.read().state.lock == {"locked": False}
    [entry] = history(fleet_session)
    assert "SIGTERM" in entry["message"]


def test_interrupted_with_one_host_at_a_time_stops_only_where_a_slot_started(
        settings: Settings, tmp_path: Path) -> None:
    session = FakeSession(fast(settings, parallel=1), tmp_path / "state",
                          names=("web1", "web2"))
    for host in session.all_hosts:
        simulate(host, session.settings)
    sigterm_during_start(session, 0.6, after=1)

    with pytest.raises(Interrupted), interruptible():
        deploy_from_start(session)

    assert stopped(session, "green") == ["web1"]
    assert not session.host("web2").ran("up --detach")
    assert session.store.read().state.lock == {"locked": False}


def test_hosts_that_disagree_are_repaired_towards_the_state_files_slot_first(
        fleet_session: FakeSession) -> None:
    """A deploy killed between web1's switch and web2's: web1 routes to green, web2 and the
    state file to blue. The next deploy switches web1 back to blue before recreating green."""
    fleet_session.store.update(lambda state: state.record_success(new_deployment(
        deployment_id=new_id("dep"), git_commit=OLD,
        deployed_by="alice@example.com", slot="blue", image="togather-server:0bd1234",
        at=utc_now()), 20))
    simulate(fleet_session.host("web1"), fleet_session.settings, routes="green")

    deploy_from_start(fleet_session)

    assert "the hosts' proxies disagree (web1 -> green, web2 -> blue)" in fleet_session.output
    journal = fleet_session.journal
    repaired = marks(journal, "web1")[0]
    first_start = next(i for i, (_, c) in enumerate(journal) if "up --detach --no-deps --pull"
                       in c)
    assert repaired < first_start
    assert routes(fleet_session) == {"web1": "green", "web2": "green"}


@pytest.mark.parametrize(("active", "seen", "expected"), [
    (None, {"a": None, "b": None}, (Slots("blue", None), ())),
    ("blue", {"a": "blue", "b": "blue"}, (Slots("green", "blue"), ())),
    ("blue", {"a": "green", "b": "green"}, (Slots("blue", "green"), ())),
    ("blue", {"a": "green", "b": "blue"}, (Slots("green", "blue"), ("a",))),
    ("green", {"a": "green", "b": "blue"}, (Slots("blue", "green"), ("b",))),
    (None, {"a": "green", "b": "blue"}, (Slots("blue", "green"), ("b",))),
])
def test_slot_choice_looks_at_every_host(active: str | None, seen: dict[str, str | None],
                                         expected: tuple[Slots, tuple[str, ...]]) -> None:
    choice = choose_slots(active, seen)
    assert (choice.slots, choice.repair) == expected


def test_one_worker_per_host_and_no_more_than_the_bound_at_once() -> None:
    hosts = [FakeHost(f"web{i}") for i in range(4)]
    running, peak, guard = [0], [0], threading.Lock()

    def action(host: FakeHost) -> str:
        with guard:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        host.run("true")
        time.sleep(0.05)
        with guard:
            running[0] -= 1
        return host.name

    outcomes = fleet.on_each(hosts, action, parallel=2, into={})

    assert peak[0] == 2
    assert [o.value for o in outcomes.values()] == ["web0", "web1", "web2", "web3"]
    assert fleet.summary(outcomes).startswith("web0 ok ")


def test_the_first_failure_is_raised_naming_its_host_and_cancels_those_waiting() -> None:
    hosts = [FakeHost(f"web{i}") for i in range(3)]

    def action(host: FakeHost) -> None:
        if host.name == "web0":
            raise TogatherError("docker compose could not start the green slot")

    outcomes = fleet.on_each(hosts, action, parallel=1, into={})

    assert [o.line() for o in outcomes.values()][1:] == ["web1 skipped", "web2 skipped"]
    with pytest.raises(TogatherError, match="^web0: docker compose could not start"):
        fleet.raise_first_failure(outcomes)


def test_one_host_unreachable_at_validate_is_named_and_nothing_changes(
        fleet_session: FakeSession) -> None:
    def unreachable(command: str):
        raise HostUnreachableError("cannot connect to web2: timed out after 15 s")

    for host in fleet_session.all_hosts:
        host.on("docker version", batch_answer(host="docker=24.0.7\ncompose=v2.40.3\n"))
    fleet_session.host("web2").on("docker version", unreachable)
    deploy = Deploy(fleet_session, DeployOptions())  # type: ignore[arg-type]

    with pytest.raises(HostUnreachableError, match="^cannot connect to web2"):
        deploy.on_hosts("validate", lambda host: deploy.check_host(host, primary=False))

    assert "web2 FAILED" in fleet_session.output and "web1 ok" in fleet_session.output
    assert not [c for _, c in fleet_session.journal if not c.startswith("printf")]


def test_finish_prunes_every_host_at_once_while_the_old_slot_drains_then_stops_it(
        settings: Settings, tmp_path: Path) -> None:
    """The prunes run on all hosts at once (each waits, bounded, for the other two to have
    begun: one after another they never would), before the old slot stops anywhere; a host
    whose prune fails still has its old slot stopped."""
    session = FakeSession(fast(settings, drain_seconds=0.2), tmp_path / "state",
                          names=("web1", "web2", "web3"))
    for host in session.all_hosts:
        simulate(host, session.settings)
    together = threading.Barrier(3, timeout=2)

    def listing(command: str):
        together.wait()
        return ok("")

    for host in session.all_hosts:
        host.on("docker image ls", listing)
    session.host("web2").on("ls -1", failed("ls: cannot access releases"))

    deploy_from_start(session)

    assert not together.broken
    journal = session.journal
    first_stop = next(i for i, (_, c) in enumerate(journal) if STOP in c)
    assert max(i for i, (_, c) in enumerate(journal) if "docker image ls" in c) < first_stop
    assert "web2: could not prune old images" in session.output
    assert "web1: could not prune" not in session.output
    assert sorted(stopped(session, "blue")) == ["web1", "web2", "web3"]


def test_each_host_stops_its_old_slot_no_sooner_than_the_drain_after_its_own_switch(
        settings: Settings, tmp_path: Path) -> None:
    session = FakeSession(fast(settings, drain_seconds=0.3), tmp_path / "state",
                          names=("web1", "web2"))
    at: dict[tuple[str, str], float] = {}
    for host in session.all_hosts:
        simulate(host, session.settings)

        def seen(what: str, host=host, answer=ok):
            def rule(command: str):
                at[(host.name, what)] = time.monotonic()
                return answer()
            return rule

        # The switch is the slot marker's rename: observed, then answered by the ProxyDisk.
        host.on(f"mv -fT {cmd.Layout(session.settings.remote_dir).proxy_state_dir}",
                seen("switched", answer=lambda: None))
        host.on(stop_fragment("blue"), seen("stopped"))

    deploy_from_start(session)

    for name in ("web1", "web2"):
        assert at[(name, "stopped")] - at[(name, "switched")] >= 0.3, name
