"""The swarm engine (issue 12) end to end, on the fleet test bed's swarm (host1 manager, host2
and host3 workers; scripts/testbed-fleet.sh) through its load balancer on 127.0.0.1:11080,
which checks every node's host-mode port 8090.

Each test deploys its own copy of the demo (fleet_app_factory: own database, remote dir and
registry repository) as the environment `cluster` with `engine: swarm`; the service and its
secrets are removed after the test. Port 8090 is the load balancer's: one swarm test at a
time (a machine-wide lock), and never the whole file in parallel with itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

MANAGER_SOCK = "unix:///run/togather-fleet/host1/docker.sock"
SWARM_PORT = 8090
SWARM_LB_URL = "http://127.0.0.1:11080"
SWARM_LOCK = Path("/run/togather-testbed/swarm-8090.lock")
ENV = "cluster"


def manager(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    """`docker ARGS` against the swarm manager's daemon (host1), as root."""
    result = subprocess.run(["docker", "-H", MANAGER_SOCK, *args], capture_output=True,
                            text=True, timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result


def lb_version(timeout: float = 5) -> tuple[int, dict[str, Any] | None]:
    try:
        resp = requests.get(f"{SWARM_LB_URL}/version", timeout=timeout,
                            headers={"Connection": "close"})  # a fresh connection: round robin
    except requests.RequestException:
        return 0, None
    return resp.status_code, resp.json() if resp.status_code == 200 else None


def lb_versions(count: int = 8) -> set[str]:
    """The versions `count` requests through the load balancer got (fresh connections)."""
    seen = set()
    for _ in range(count):
        status, body = lb_version()
        assert status == 200, status
        assert body is not None
        seen.add(body["version"])
    return seen


PACKAGE_STATE_SCHEMA = (Path(__file__).parents[2] / "togather_tasks" / "schemas"
                        / "deployment-state.schema.json")


def state_of(app: Any) -> dict[str, Any]:
    """The state file, valid against the package's schema (the original tools' compat schema
    knows only development, staging and production: `cluster` is a free environment name)."""
    import jsonschema

    doc = app.state(validate=False)
    assert doc is not None
    jsonschema.Draft202012Validator(json.loads(PACKAGE_STATE_SCHEMA.read_text())).validate(doc)
    return doc


def service(app: Any) -> dict[str, Any] | None:
    out = manager("service", "inspect", app.project)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def running_tasks(app: Any) -> list[dict[str, str]]:
    out = manager("service", "ps", "--no-trunc", "--filter", "desired-state=running",
                  "--format", "{{json .}}", app.project).stdout
    return [t for t in map(json.loads, out.splitlines()) if t["CurrentState"].startswith("Running")]


@pytest.fixture
def swarm_app(fleet_app_factory: Any) -> Iterator[Any]:
    """A demo app as the `cluster` environment on the three hosts, engine swarm."""
    SWARM_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(SWARM_LOCK, "a+") as handle:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{SWARM_LOCK} held for 900 s"
                time.sleep(1)
        app = fleet_app_factory(("host1", "host2", "host3"), strategy="registry", env=ENV)
        app.write_config(commit=True, environments={ENV: {
            "engine": "swarm", "ports": {"proxy": SWARM_PORT}, "public_url": SWARM_LB_URL}})
        try:
            yield app
        finally:
            manager("service", "rm", app.project)
            for _ in range(60):  # its tasks' containers go before the port and secret are free
                if not manager("service", "ps", "-q", app.project).stdout.strip() and \
                        manager("service", "inspect", app.project).returncode != 0:
                    break
                time.sleep(0.5)
            secrets = manager("secret", "ls", "-q", "--filter",
                              f"label=com.togather.service={app.project}").stdout.split()
            for _ in range(20):
                if not secrets or manager("secret", "rm", *secrets).returncode == 0:
                    break
                time.sleep(1)


def test_first_and_second_deploy(swarm_app: Any, record_property: Any) -> None:
    app = swarm_app
    first = app.head
    # A dry run validates (hosts, the manager) and prints the plan; nothing is created.
    dry = app.deploy("--dry-run", timeout=300)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "docker service create/update" in dry.stdout and "start-first" in dry.stdout
    assert service(app) is None
    started = time.monotonic()
    result = app.deploy(timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    record_property("swarm_first_deploy_seconds", round(time.monotonic() - started, 1))
    # A swarm has no slots: the output names the service it updates.
    assert f"(service {app.project}) as dep_" in result.stdout, result.stdout
    assert " slot" not in result.stdout, result.stdout

    # Two tasks (one node fewer than the hosts), on two different nodes, both the new image.
    spec = service(app)
    assert spec is not None
    assert spec["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
    assert spec["Spec"]["UpdateConfig"]["Order"] == "start-first"
    assert spec["Spec"]["UpdateConfig"]["FailureAction"] == "rollback"
    image = spec["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    assert "@sha256:" in image and image.startswith("registry.togather.test:5000/"), image
    tasks = running_tasks(app)
    assert len(tasks) == 2 and len({t["Node"] for t in tasks}) == 2, tasks
    assert lb_versions() == {first[:7]}

    # No secret in the service spec: the env is a Swarm secret, the spec names it only.
    inspect = manager("service", "inspect", app.project).stdout
    app.assert_no_secrets(inspect)
    env = spec["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env") or []
    assert not any(k.split("=")[0] in app.secrets for k in env), env
    assert [s["File"]["Name"] for s in spec["Spec"]["TaskTemplate"]["ContainerSpec"]["Secrets"]
            ] == ["togather-app-env"]

    state = state_of(app)
    current = state["current_deployment"]
    assert current["version"] == first[:7] and current["status"] == "active"
    assert current["image_digest"] == image
    assert state["lock"] == {"locked": False}

    # Second deploy: a new commit rolls through; the state keeps the first as previous.
    second = app.commit("second version", {"app/NOTE": "second\n"})
    started = time.monotonic()
    result = app.deploy(timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    record_property("swarm_second_deploy_seconds", round(time.monotonic() - started, 1))
    assert lb_versions() == {second[:7]}
    state = state_of(app)
    assert state["current_deployment"]["version"] == second[:7]
    assert state["previous_deployment"]["version"] == first[:7]
    assert len(running_tasks(app)) == 2
    # The old secret is not left behind (same content -> same secret here: exactly one).
    secrets = manager("secret", "ls", "-q", "--filter",
                      f"label=com.togather.service={app.project}").stdout.split()
    assert len(secrets) == 1, secrets

    # status / health / logs through the engine.
    status = app.inv("status", app.env_flag, "--json", check=True)
    doc = json.loads(status.stdout)
    assert doc["engine"] == "swarm" and doc["replicas"] == {"running": 2, "desired": 2}, doc
    assert doc["update"]["state"] == "completed", doc
    assert sum(n["running"] for n in doc["nodes"].values()) == 2
    health = app.inv("health", app.env_flag, f"--expected-version={second[:7]}")
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.count(" task ") == 2, health.stdout
    logs = app.inv("logs", app.env_flag, "--lines=20", check=True)
    # `docker service logs` names each line's task and node (the app logs to stderr).
    assert f"{app.project}." in logs.stdout + logs.stderr, logs.stdout + logs.stderr
    app.assert_no_secrets()


def wait_until(what: str, predicate: Any, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.5)


def test_unhealthy_deploy_is_rolled_back_by_the_engine_then_rollback_and_to(
        swarm_app: Any, cli_failure: Any) -> None:
    app = swarm_app
    v1 = app.head[:7]
    app.deploy(check=True, timeout=900)
    v1_image = service(app)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]

    # A version whose /health answers 503: its first task never becomes healthy, the engine
    # rolls the service back, the tool exits 4 with the engine's reason; v1 keeps serving.
    bad = app.set_health_mode("unhealthy")[:7]
    result = app.deploy(timeout=900)
    cli_failure(result, contains="rollback", code=4)
    assert lb_versions() == {v1}
    spec = service(app)
    assert spec["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == v1_image
    assert spec["UpdateStatus"]["State"] == "rollback_completed", spec["UpdateStatus"]
    state = state_of(app)
    assert state["current_deployment"]["version"] == v1
    failed = [d for d in state["deployment_history"] if d["version"] == bad]
    assert failed and failed[0]["status"] == "failed", state["deployment_history"]
    assert failed[0]["health_status"] == "unhealthy", failed[0]
    assert state["lock"] == {"locked": False}

    # Two good versions, then rollback (to the previous) and --to (back to the newest).
    v2 = app.set_health_mode("healthy")[:7]
    app.deploy(check=True, timeout=900)
    assert lb_versions() == {v2}
    rolled = app.rollback(timeout=900)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert lb_versions() == {v1}
    assert service(app)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == v1_image
    state = state_of(app)
    assert state["current_deployment"]["version"] == v1
    assert state["current_deployment"]["rollback_count"] == 1
    rolled = app.rollback(f"--to={v2}", timeout=900)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert lb_versions() == {v2}
    assert state_of(app)["current_deployment"]["version"] == v2
    assert len(running_tasks(app)) == 2
    app.assert_no_secrets()


def test_the_lock_holds_against_a_compose_engine_deploy_of_the_same_environment(
        swarm_app: Any, cli_failure: Any, tmp_path: Path) -> None:
    """A swarm deploy paused before its update holds the environment's lock (the state file on
    host1): the same environment configured with the compose engine is refused (exit 3) and
    changes nothing; the paused deploy then finishes."""
    app = swarm_app
    hold = tmp_path / "hold"
    hold.write_text("")
    proc = app.spawn("deploy", app.env_flag, env={"TOGATHER_TEST_PAUSE_BEFORE": "update",
                                                  "TOGATHER_TEST_PAUSE_FILE": str(hold)})
    proc.wait_for_stdout(r"paused before update", timeout=600)
    app.write_config(environments={ENV: {"ports": {"proxy": SWARM_PORT},
                                         "public_url": SWARM_LB_URL}})  # engine compose
    other = app.deploy(timeout=300)
    cli_failure(other, contains="lock", code=3)
    for host in app.hosts:
        assert app.containers(host) == [], host  # compose started nothing anywhere
    app.write_config(environments={ENV: {"engine": "swarm", "ports": {"proxy": SWARM_PORT},
                                         "public_url": SWARM_LB_URL}})
    hold.unlink()
    done = proc.wait(600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert lb_versions() == {app.head[:7]}
    assert state_of(app)["lock"] == {"locked": False}


def test_sigkill_mid_update_then_a_new_deploy(swarm_app: Any) -> None:
    app = swarm_app
    v1 = app.head[:7]
    app.deploy(check=True, timeout=900)
    v2 = app.commit("v2", {"app/NOTE": "two\n"})[:7]
    proc = app.spawn("deploy", app.env_flag)

    def updating() -> bool:
        spec = service(app) or {}
        return (spec.get("UpdateStatus") or {}).get("State") == "updating"

    wait_until("the swarm update has started", updating, timeout=600)
    proc.send(signal.SIGKILL)
    proc.wait(30)
    # The engine carries on by itself; every answer meanwhile is a healthy version.
    for _ in range(6):
        status, body = lb_version()
        assert status == 200 and body["version"] in (v1, v2), (status, body)
    state = state_of(app)
    assert state["lock"]["locked"] is True  # a SIGKILL cannot release it
    assert state["current_deployment"]["version"] == v1

    result = app.deploy(timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "took over the lock" in result.stderr, result.stderr
    assert lb_versions() == {v2}
    state = state_of(app)
    assert state["current_deployment"]["version"] == v2 and state["lock"] == {"locked": False}
    with contextlib.suppress(Exception):
        assert len(running_tasks(app)) == 2


def node_id(host: str) -> str:
    out = subprocess.run(["docker", "-H", f"unix:///run/togather-fleet/{host}/docker.sock",
                          "info", "--format", "{{.Swarm.NodeID}}"], capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_a_node_drained_then_a_deploy_goes_stop_first_on_the_others(swarm_app: Any) -> None:
    """A node out of the scheduling (drained: `docker node update --availability drain`, the
    swarm's way of taking a node down without touching the shared host's daemon): its task
    moves to the other nodes, and a deploy, which then has no free node for start-first,
    replaces the tasks stop-first, one at a time, the load balancer serving throughout."""
    app = swarm_app
    v1 = app.head[:7]
    app.deploy(check=True, timeout=900)
    drained = node_id("host3")
    manager("node", "update", "--availability", "drain", drained, check=True)
    try:
        wait_until("no task of the app on host3", lambda: all(
            t["Node"] != "host3" for t in running_tasks(app)) and len(running_tasks(app)) == 2,
            timeout=120)
        assert lb_versions() == {v1}
        v2 = app.commit("v2", {"app/NOTE": "two\n"})[:7]
        answers: list[int] = []
        proc = app.spawn("deploy", app.env_flag)
        deadline = time.monotonic() + 600
        while proc.popen.poll() is None and time.monotonic() < deadline:
            answers.append(lb_version(timeout=5)[0])
            time.sleep(0.2)
        result = proc.wait(60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "stop-first" in result.stdout, result.stdout
        assert answers and set(answers) == {200}, answers
        assert lb_versions() == {v2}
        tasks = running_tasks(app)
        assert len(tasks) == 2 and {t["Node"] for t in tasks} == {"host1", "host2"}, tasks
        spec = service(app)
        assert spec["Spec"]["UpdateConfig"]["Order"] == "stop-first"
    finally:
        manager("node", "update", "--availability", "active", drained, check=True)


def test_a_node_drained_during_a_start_first_update_ends_in_bounded_time(
        swarm_app: Any) -> None:
    """A node leaves while a start-first update runs (drained: the swarm's way of taking a
    node down without touching the shared host's daemon), and the worst one: the node running
    the update's first new task. Swarm alone waits for ever for a free node (one task per
    node, host-mode port), in the update or in its own rollback (a new task ended early is an
    update failure to it). The tool sees the task no node can take, switches the update or
    the rollback to stop-first, and ends in bounded time either way: the update completed on
    the two remaining nodes (exit 0), or the engine's rollback done (exit 4 saying why), the
    old version serving; the load balancer answers throughout."""
    app = swarm_app
    v1 = app.head[:7]
    app.deploy(check=True, timeout=900)
    v1_image = service(app)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    v2 = app.commit("v2", {"app/NOTE": "two\n"})[:7]
    proc = app.spawn("deploy", app.env_flag)
    new_task_nodes: list[str] = []

    def a_new_task_runs() -> bool:
        spec = service(app) or {}
        image = spec.get("Spec", {}).get("TaskTemplate", {}).get("ContainerSpec", {}).get(
            "Image", v1_image)
        if image == v1_image or (spec.get("UpdateStatus") or {}).get("State") != "updating":
            return False
        new_task_nodes[:] = [t["Node"] for t in running_tasks(app)
                             if t["Image"] == image or image.endswith(t["Image"])]
        return bool(new_task_nodes)

    wait_until("a task of v2 runs during the update", a_new_task_runs, timeout=600)
    drained_host = new_task_nodes[0]
    drained = node_id(drained_host)
    manager("node", "update", "--availability", "drain", drained, check=True)
    drained_at = time.monotonic()
    try:
        answers: list[int] = []
        versions: set[str] = set()
        deadline = time.monotonic() + 240
        while proc.popen.poll() is None and time.monotonic() < deadline:
            status, body = lb_version(timeout=5)
            answers.append(status)
            versions.add((body or {}).get("version", "-"))
            time.sleep(0.2)
        result = proc.wait(30)  # bounded: a deploy stuck waiting for a free node fails here
        took = time.monotonic() - drained_at
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        assert "no free node for a new task" in result.stderr, output
        assert answers and set(answers) == {200}, answers
        assert versions <= {v1, v2}, versions
        state = state_of(app)
        assert state["lock"] == {"locked": False}
        tasks = running_tasks(app)
        assert len(tasks) == 2 and drained_host not in {t["Node"] for t in tasks}, tasks
        if result.returncode == 0:
            outcome = "completed stop-first"
            assert "then stop-first" in result.stdout, output
            assert lb_versions() == {v2}
            assert state["current_deployment"]["version"] == v2, state["current_deployment"]
        else:
            outcome = "rolled back by the engine"
            assert result.returncode == 4, output
            assert "error: the swarm rolled the update back" in result.stderr, output
            assert "went on stop-first" in result.stderr, output
            assert lb_versions() == {v1}
            assert service(app)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == v1_image
            assert state["current_deployment"]["version"] == v1, state["current_deployment"]
            failed = [d for d in state["deployment_history"] if d["version"] == v2]
            assert failed and failed[0]["status"] == "failed", state["deployment_history"]
        print(f"drained {drained_host} mid-update: {outcome} (exit {result.returncode}) "
              f"{took:.1f} s later; {len(answers)} answers through the load balancer, all 200")
    finally:
        manager("node", "update", "--availability", "active", drained, check=True)


def test_ctrl_c_mid_update_rolls_the_service_back_and_releases_the_lock(swarm_app: Any) -> None:
    app = swarm_app
    v1 = app.head[:7]
    app.deploy(check=True, timeout=900)
    v1_image = service(app)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    app.commit("v2", {"app/NOTE": "two\n"})
    proc = app.spawn("deploy", app.env_flag)
    wait_until("the swarm update has started", lambda: ((service(app) or {}).get(
        "UpdateStatus") or {}).get("State") == "updating", timeout=600)
    proc.send(signal.SIGINT)
    result = proc.wait(120)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "roll" in result.stderr and "back" in result.stderr, result.stderr
    state = state_of(app)
    assert state["lock"] == {"locked": False}
    assert state["current_deployment"]["version"] == v1
    wait_until("the engine rolled back to v1", lambda: (
        service(app)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == v1_image
        and (service(app).get("UpdateStatus") or {}).get("State") == "rollback_completed"),
        timeout=300)
    assert lb_versions() == {v1}
