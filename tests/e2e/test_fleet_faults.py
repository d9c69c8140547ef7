"""Faults on the 3-host fleet, end to end through the load balancer (127.0.0.1:10080): host2
unreachable before anything starts, host2's new slot unhealthy, a SIGKILL between host1's
switch and host2's followed by a new deploy, and a rolling deploy (deployment.rolling, batch 1)
whose second wave fails, then one that succeeds. (A switch failing on host2 is in
test_fleet_deploy.py, the registry down during the pull in test_registry.py.)

After each fault: every host serves one healthy version, as the load balancer and each host's
own proxy show it; the state file validates against both schemas; the lock is free; the next
deploy works. The checks look at behaviour (HTTP answers, `inv status --json`, the state file),
never at how a proxy is switched.

The fleet_app fixtures (conftest.py) give each test its own app on host1..host3 with proxy
port 80, the port the load balancer forwards to, under the machine-wide port-80 lock.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

FLEET = ("host1", "host2", "host3")
PAUSE_ENV = "TOGATHER_TEST_PAUSE_BEFORE"
PAUSE_FILE_ENV = "TOGATHER_TEST_PAUSE_FILE"
FIRST_DEPLOY_TIMEOUT = 1800  # a fresh host's first build runs apt
HOST2_ADDRESS = "10.77.0.12"


@pytest.fixture
def fleet(fleet_app_factory: Callable[..., Any]) -> Any:
    """The app on all three hosts behind the load balancer, v1 deployed and served."""
    app = fleet_app_factory(hosts=FLEET, through_lb=True)
    app.deploy(check=True, timeout=FIRST_DEPLOY_TIMEOUT)
    # The proxies' port 80 is new: the load balancer sends to a host after two passing
    # checks a second apart (scripts/testbed-fleet.sh), until then it answers 503 itself.
    wait_until("the load balancer has the hosts up", lambda: all(
        status == 200 for status, _, _ in app.served_through_lb(6)), timeout=30)
    assert_one_version(app, app.head[:7])
    return app


def assert_one_version(app: Any, version: str) -> dict[str, Any]:
    """Every host's proxy serves `version` from one slot, healthy, and so does the load
    balancer; the state file is valid (app.state() validates) and the lock free. Returns the
    state."""
    slots = set()
    for host in app.hosts:
        slot, body = app.served_by(host)
        assert body["version"] == version, (host, slot, body)
        status, _, health = app.host_get(host, "/health")
        assert status == 200, (host, health)
        slots.add(slot)
    assert len(slots) == 1, slots
    through_lb = app.served_through_lb(12)
    assert {(status, slot, json.loads(body)["version"]) for status, slot, body in through_lb} \
        == {(200, *slots, version)}, through_lb
    state = app.state()
    assert state["lock"] == {"locked": False}, state["lock"]
    return state


def routes(app: Any) -> dict[str, str | None]:
    """What `inv status --json` says each host's proxy routes to."""
    result = app.inv("status", app.env_flag, "--json", check=True)
    return {name: info["routes_to"] for name, info in json.loads(result.stdout)["hosts"].items()}


def container_ids(app: Any, host: str) -> dict[str, str]:
    return {c["service"]: c["id"] for c in app.containers(host)}


def unused_port(host: str) -> int:
    """A port nothing listens on in `host`'s namespace (connections to it are refused)."""
    out = subprocess.run(["nsenter", f"--net=/run/netns/togather-{host}", "ss", "-Hltn"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    busy = {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}
    return next(port for port in range(2300, 2400) if port not in busy)


# --- (a) host2 unreachable before anything starts -------------------------------------------


def test_host2_unreachable_aborts_at_validate_naming_it_and_nothing_changes(
        fleet: Any, cli_failure: Callable[..., str]) -> None:
    app = fleet
    v1 = app.head[:7]
    # host2's address, on a port where nothing answers: the shared sshd stays untouched.
    unreachable = f"deploy@{HOST2_ADDRESS}:{unused_port('host2')}"
    app.write_config(environments={app.env: {
        "hosts": ["togather-host1", unreachable, "togather-host3"]}})
    v2 = app.commit("v2", {"app/VERSION_NOTE": "two\n"})[:7]
    before = {host: (app.tree(host), container_ids(app, host)) for host in ("host1", "host3")}

    result = app.deploy(timeout=300)

    cli_failure(result, contains=f"cannot reach {unreachable}", code=1)
    assert re.search(r"^\[1/\d+\] validate .*FAILED$", result.stdout, re.MULTILINE), result.stdout
    for host in ("host1", "host3"):  # not a file (state file included), not a container
        assert (app.tree(host), container_ids(app, host)) == before[host], \
            f"{host} changed although the deploy stopped at validate"
    assert_one_version(app, v1)

    app.write_config()  # host2 reachable again
    app.deploy(check=True)
    assert_one_version(app, v2)


# --- (b) host2's new slot unhealthy ---------------------------------------------------------


def break_image_on(app: Any, host: str, commit: str) -> str:
    """Put on `host` an image under the new version's tag, labelled with its commit (so the
    `remote` strategy reuses it instead of building), whose app answers /health with 503
    (HEALTH_MODE=unhealthy): the new version is broken on that host alone. Returns the tag."""
    running = {c["service"]: c["image"] for c in app.containers(host)}
    old_image = next(image for service, image in running.items() if service.startswith("app-"))
    image = f"{old_image.rpartition(':')[0]}:{commit[:7]}"
    with tempfile.TemporaryDirectory(prefix="togather-e2e-broken-") as context:
        Path(context, "HEALTH_MODE").write_text("unhealthy\n")
        Path(context, "Dockerfile").write_text(
            f"FROM {old_image}\n"
            "COPY HEALTH_MODE /app/HEALTH_MODE_BROKEN\n"
            f"ENV HEALTH_MODE_FILE=/app/HEALTH_MODE_BROKEN GIT_COMMIT={commit} "
            f"VERSION={commit[:7]}\n"
            f"LABEL org.opencontainers.image.revision={commit}\n")
        app.docker(host, "build", "--quiet", "--tag", image, context, timeout=300)
    return image


def test_host2s_new_slot_unhealthy_keeps_every_host_on_the_old_version(
        fleet: Any, cli_failure: Callable[..., str]) -> None:
    app = fleet
    v1 = app.head[:7]
    old_slot, _ = app.served_by("host1")
    new_slot = "green" if old_slot == "blue" else "blue"
    commit = app.commit("v2", {"app/VERSION_NOTE": "two\n"})
    broken = break_image_on(app, "host2", commit)
    # Fewer checks than the fixture's 40: host2 answers 503 until they run out.
    app.write_config(deployment={"health_check": {"retries": 10, "interval": 0.5}})
    try:
        result = app.deploy(timeout=300)
    finally:
        app.write_config()

    line = cli_failure(result, contains="togather-host2", code=4)
    assert "healthy" in line, line
    state = assert_one_version(app, v1)
    for host in app.hosts:
        assert app.served_by(host)[0] == old_slot, host
        assert app.container_state(new_slot, host) != "running", host
        assert app.container_state(old_slot, host) == "running", host
    failed = state["deployment_history"][0]
    assert (failed["status"], failed["health_status"]) == ("failed", "unhealthy"), failed
    assert set(routes(app).values()) == {old_slot}

    app.docker("host2", "rmi", "--force", broken)  # the fault goes away
    app.deploy(check=True)
    assert_one_version(app, commit[:7])


# --- (c) SIGKILL between host1's switch and host2's, then a new deploy -----------------------


class LoadSampler:
    """GET /version through the load balancer in a loop (bounded in time) on a thread;
    `failures` are the requests that did not get a 200."""

    def __init__(self, app: Any, limit_s: float = 600) -> None:
        self.app = app
        self.limit_s = limit_s
        self.requests = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.requests += 1
            try:
                status, _, body = self.app.lb_get("/version", timeout=5)
                if status != 200:
                    self.failures.append(f"HTTP {status}: {body[:80]}")
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(0.05)

    @contextlib.contextmanager
    def running(self) -> Iterator[LoadSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.2)


def test_sigkill_between_two_hosts_switches_then_the_next_deploy_repairs_towards_one_slot(
        fleet: Any) -> None:
    app = fleet
    v1 = app.head[:7]
    old_slot, _ = app.served_by("host1")
    new_slot = "green" if old_slot == "blue" else "blue"
    v2 = app.commit("v2", {"app/VERSION_NOTE": "two\n"})[:7]

    # host2 pauses just before its own switch; host1 and host3 switch meanwhile.
    proc = app.spawn("deploy", app.env_flag, "--yes",
                     env={PAUSE_ENV: "switch@togather-host2"})
    proc.wait_for_stdout(r"paused before switch@togather-host2", timeout=600)
    for host in ("host1", "host3"):
        wait_until(f"{host} serves {v2}",
                   lambda host=host: app.served_by(host)[1]["version"] == v2)
    proc.send(signal.SIGKILL)
    proc.wait(30)

    # The fleet disagrees, but every host serves a healthy version.
    assert routes(app) == {"togather-host1": new_slot, "togather-host2": old_slot,
                           "togather-host3": new_slot}
    assert app.served_by("host2")[1]["version"] == v1
    assert {status for status, _, _ in app.served_through_lb(12)} == {200}
    state = app.state()  # valid against both schemas
    assert state["lock"]["locked"] is True  # a SIGKILL cannot release it
    assert state["current_deployment"]["version"] == v1

    v3 = app.commit("v3", {"app/VERSION_NOTE": "three\n"})[:7]
    with LoadSampler(app).running() as load:
        result = app.deploy(timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "took over the lock" in result.stderr, output
    assert "the hosts' proxies disagree" in result.stderr, output
    # Repaired towards the slot the state file and host2 still route to: host1 and host3 are
    # switched back before the other slot is recreated, so no proxy ever routes to a slot
    # being recreated, and no request through the load balancer fails.
    assert f"switching togather-host1, togather-host3 back to {old_slot} first" in \
        result.stderr, output
    assert load.requests > 20 and load.failures == [], (load.requests, load.failures[:5])
    state = assert_one_version(app, v3)
    assert state["current_deployment"]["active_slot"] == new_slot
    assert set(routes(app).values()) == {new_slot}
    for host in app.hosts:
        assert app.container_state(old_slot, host) != "running", host


# --- rolling waves (deployment.rolling: {batch: 1}) ------------------------------------------


def versions_through_lb(app: Any, requests: int = 12) -> set[str]:
    """The versions answered through the load balancer (round robin over the three hosts);
    every request must succeed."""
    answers = app.served_through_lb(requests)
    assert {status for status, _, _ in answers} == {200}, answers
    return {json.loads(body)["version"] for _, _, body in answers}


def test_rolling_waves_a_failing_second_wave_switches_the_first_back_then_a_good_run(
        fleet: Any, cli_failure: Callable[..., str]) -> None:
    app = fleet
    v1 = app.head[:7]
    old_slot, _ = app.served_by("host1")
    new_slot = "green" if old_slot == "blue" else "blue"
    rolling = {"rolling": {"batch": 1}, "health_check": {"retries": 10, "interval": 0.5}}
    app.write_config(deployment=rolling)

    # Wave 2 (host2) is unhealthy after wave 1 (host1) switched: host1 goes back, host3 never
    # starts, every host on v1.
    commit = app.commit("v2", {"app/VERSION_NOTE": "two\n"})
    broken = break_image_on(app, "host2", commit)
    failed = app.deploy(timeout=300)
    line = cli_failure(failed, contains="togather-host2", code=4)
    assert "healthy" in line, line
    assert "wave 1/3" in failed.stdout + failed.stderr, failed.stdout
    assert f"togather-host1: switched back to the {old_slot} slot" in failed.stderr
    assert app.container_state(new_slot, "host3") is None  # wave 3 never started
    app.write_config()
    recorded = assert_one_version(app, v1)["deployment_history"][0]
    assert (recorded["status"], recorded["health_status"]) == ("failed", "unhealthy"), recorded
    app.docker("host2", "rmi", "--force", broken)

    # A good run, paused before host3's switch (the last wave): host1 and host2 serve v2,
    # host3 still v1, both through the load balancer; after it, one version.
    app.write_config(deployment=rolling)
    v3 = app.commit("v3", {"app/VERSION_NOTE": "three\n"})[:7]
    pause = app.tmp / "pause-before-host3"
    pause.write_text("")
    proc = app.spawn("deploy", app.env_flag, "--yes", env={
        PAUSE_ENV: "switch@togather-host3", PAUSE_FILE_ENV: str(pause)})
    try:
        proc.wait_for_stdout(r"paused before switch@togather-host3", timeout=600)
        assert {h: app.served_by(h)[1]["version"] for h in app.hosts} == {
            "host1": v3, "host2": v3, "host3": v1}
        assert versions_through_lb(app) == {v1, v3}
    finally:
        pause.unlink()
    done = proc.wait(300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wave 3/3" in done.stdout + done.stderr, done.stdout
    app.write_config()
    assert_one_version(app, v3)
    assert versions_through_lb(app) == {v3}


def test_rolling_sigkill_between_two_waves_then_the_next_rolling_deploy_repairs(
        fleet: Any) -> None:
    """SIGKILL after wave 2 switched and before wave 3 (host3): host1 and host2 serve the new
    version, host3 the old one, the lock is held. The next rolling deploy takes over the lock,
    switches host1 and host2 back first, then rolls the fleet wave by wave to one version; no
    request through the load balancer fails meanwhile."""
    app = fleet
    v1 = app.head[:7]
    old_slot, _ = app.served_by("host1")
    new_slot = "green" if old_slot == "blue" else "blue"
    app.write_config(deployment={"rolling": {"batch": 1}})
    v2 = app.commit("v2", {"app/VERSION_NOTE": "two\n"})[:7]
    proc = app.spawn("deploy", app.env_flag, "--yes",
                     env={PAUSE_ENV: "switch@togather-host3"})
    proc.wait_for_stdout(r"paused before switch@togather-host3", timeout=600)
    proc.send(signal.SIGKILL)
    proc.wait(30)
    assert {h: app.served_by(h)[1]["version"] for h in app.hosts} == {
        "host1": v2, "host2": v2, "host3": v1}
    state = app.state()  # valid against both schemas
    assert state["lock"]["locked"] is True
    assert state["current_deployment"]["version"] == v1

    v3 = app.commit("v3", {"app/VERSION_NOTE": "three\n"})[:7]
    with LoadSampler(app).running() as load:
        result = app.deploy(timeout=600)
    output = result.stdout + result.stderr
    app.write_config()
    assert result.returncode == 0, output
    assert "took over the lock" in result.stderr, output
    assert f"switching togather-host1, togather-host2 back to {old_slot} first" in \
        result.stderr, output
    assert "wave 3/3" in output, output
    assert load.requests > 20 and load.failures == [], (load.requests, load.failures[:5])
    state = assert_one_version(app, v3)
    assert state["current_deployment"]["active_slot"] == new_slot
    assert versions_through_lb(app) == {v3}
