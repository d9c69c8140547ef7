"""Faults on the real test bed: concurrency, crashes at every step, a cut SSH connection and
host-side failures. Whatever happens: the old version keeps serving until the new one is
verified, the state file stays valid, no lock blocks the next operator longer than the rules
allow, and the next deploy succeeds without editing any file by hand."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import PENDING_MIGRATION, DemoApp, Running, free_ports, run

STEP_BOUNDARIES = ("build", "snapshot", "migrate", "start", "health", "switch", "record",
                   "finish")
SSHD_PIDFILE = Path("/run/togather-testbed/sshd.pid")
PAUSED = r"paused before (\w+) \(pid (\d+)\)"


def deploy_ok(app: DemoApp, *args: str, **kwargs) -> None:
    result = app.deploy(*args, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr


def assert_serving(app: DemoApp, version: str) -> None:
    """Through the proxy, a working app answers with `version`."""
    status, _, _ = app.get("/")
    assert status == 200
    assert app.served()[1]["version"] == version[:7]


def assert_unlocked(app: DemoApp) -> None:
    assert app.state()["lock"] == {"locked": False}


def paused_deploy(app: DemoApp, step: str, *, hold: Path | None = None) -> Running:
    env = {"TOGATHER_TEST_PAUSE_BEFORE": step}
    if hold is not None:
        hold.touch()
        env["TOGATHER_TEST_PAUSE_FILE"] = str(hold)
    proc = app.spawn("deploy", app.env_flag, env=env)
    proc.wait_for_stdout(PAUSED, timeout=180)
    return proc


# --- 1. concurrency -------------------------------------------------------------------------


def start_all(app: DemoApp, commands: list[tuple[str, ...]], hold: Path) -> list[Running]:
    """Start every command at once. Whoever wins the lock pauses before `finish` (holding it)
    until `hold` is removed, so the race is decided by the lock, not by who finishes first."""
    hold.touch()
    env = {"TOGATHER_TEST_PAUSE_BEFORE": "finish", "TOGATHER_TEST_PAUSE_FILE": str(hold)}
    return [app.spawn(*cmd, env=env) for cmd in commands]


def settle(procs: list[Running], hold: Path) -> list[int]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        running = [p for p in procs if p.popen.poll() is None]
        if len(running) <= 1:
            break
        time.sleep(0.2)
    hold.unlink()
    return [p.wait(240).returncode for p in procs]


def test_eight_concurrent_deploys_exactly_one_proceeds(demo_app: DemoApp, tmp_path: Path) -> None:
    deploy_ok(demo_app)
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    procs = start_all(demo_app, [("deploy", demo_app.env_flag)] * 8, tmp_path / "hold")

    codes = settle(procs, tmp_path / "hold")

    assert sorted(codes) == [0] + [3] * 7, codes
    for proc in procs:
        if proc.wait().returncode == 3:
            assert "is locked by e2e@example.com" in proc.stderr
            assert "Traceback" not in proc.stderr
    assert_unlocked(demo_app)
    assert_serving(demo_app, demo_app.head)


def test_concurrent_deploys_and_rollbacks_exactly_one_proceeds(demo_app: DemoApp,
                                                                tmp_path: Path) -> None:
    deploy_ok(demo_app)
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    deploy_ok(demo_app)
    demo_app.commit("v3", {"app/VERSION_NOTE": "3\n"})
    commands = [("deploy", demo_app.env_flag), ("rollback", demo_app.env_flag)] * 4

    codes = settle(start_all(demo_app, commands, tmp_path / "hold"), tmp_path / "hold")

    assert sorted(codes) == [0] + [3] * 7, codes
    assert_unlocked(demo_app)
    state = demo_app.state()
    assert_serving(demo_app, state["current_deployment"]["version"])


# --- 2. crashes at every step boundary ------------------------------------------------------


@pytest.mark.parametrize("step", STEP_BOUNDARIES)
def test_sigkill_at_each_step_boundary(demo_app: DemoApp, step: str) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    second = demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    proc = paused_deploy(demo_app, step)

    proc.send(signal.SIGKILL)
    proc.wait(30)

    # Killed before `record`: the old version serves; from `record` on the switch happened.
    served = first if STEP_BOUNDARIES.index(step) < STEP_BOUNDARIES.index("record") else second
    assert_serving(demo_app, served)
    state = demo_app.state()  # valid against both schemas
    assert state["lock"]["locked"] is True  # a SIGKILL cannot release it...
    third = demo_app.commit("v3", {"app/VERSION_NOTE": "3\n"})
    result = demo_app.deploy()  # ...but the next deploy proves the holder is gone
    assert result.returncode == 0, result.stdout + result.stderr
    assert "took over the lock" in result.stderr and "is gone" in result.stderr
    assert_serving(demo_app, third)
    assert_unlocked(demo_app)


@pytest.mark.parametrize(("sig", "step"), [
    (signal.SIGTERM, "build"), (signal.SIGTERM, "health"), (signal.SIGTERM, "switch"),
    (signal.SIGINT, "migrate"), (signal.SIGINT, "start"), (signal.SIGINT, "finish"),
])
def test_sigterm_and_ctrl_c_release_the_lock_at_once(demo_app: DemoApp, sig: int,
                                                     step: str) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    proc = paused_deploy(demo_app, step)

    proc.send(sig)
    result = proc.wait(60)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "interrupted" in result.stderr
    assert_unlocked(demo_app)  # released at once, no takeover needed
    if step != "finish":
        assert_serving(demo_app, first)
        assert demo_app.state()["deployment_history"][0]["status"] == "failed"
    deploy_ok(demo_app)
    assert_serving(demo_app, demo_app.head)


# --- 3. the SSH connection cut in the middle of a step --------------------------------------


def kill_ssh_sessions() -> int:
    """Kill every process of the test bed sshd's client sessions (the descendants of its
    master, found by its pid file): every client connection drops as if the network went
    away. Returns how many processes were killed."""
    master = int(SSHD_PIDFILE.read_text().strip())
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])

    def descends(pid: int) -> bool:
        for _ in range(64):
            pid = parents.get(pid, 0)
            if pid == master:
                return True
            if pid <= 1:
                return False
        return False

    victims = [pid for pid in parents if pid != master and descends(pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


def test_connection_cut_between_steps_reconnects_and_finishes(demo_app: DemoApp,
                                                              tmp_path: Path) -> None:
    deploy_ok(demo_app)
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    hold = tmp_path / "hold"
    proc = paused_deploy(demo_app, "health", hold=hold)

    assert kill_ssh_sessions() >= 1
    hold.unlink()
    result = proc.wait(180)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ssh connections: 2" in result.stdout
    assert_serving(demo_app, demo_app.head)
    assert_unlocked(demo_app)


def test_connection_cut_during_a_migration(demo_app: DemoApp, tmp_path: Path) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    slow = ("-- migrate:up\nSELECT pg_sleep(4);\nCREATE TABLE slow_one (id int);\n"
            "-- migrate:down\nDROP TABLE slow_one;\n")
    demo_app.commit("slow migration", {"db/migrations/20260301000000_slow.sql": slow})
    hold = tmp_path / "hold"
    proc = paused_deploy(demo_app, "migrate", hold=hold)

    hold.unlink()
    time.sleep(1.5)  # dbmate is inside pg_sleep now
    assert kill_ssh_sessions() >= 1
    result = proc.wait(180)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "connection to" in result.stderr and "lost" in result.stderr
    assert_serving(demo_app, first)
    assert_unlocked(demo_app)  # released over a new connection
    assert demo_app.state()["deployment_history"][0]["status"] == "failed"
    # The migration that was in flight finished or rolled back on its own; running the deploy
    # again applies what is missing and succeeds.
    deadline = time.monotonic() + 30
    while "pg_sleep" in demo_app.psql("SELECT query FROM pg_stat_activity;", as_owner=False) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    deploy_ok(demo_app)
    assert "slow_one" in demo_app.tables()
    assert_serving(demo_app, demo_app.head)


# --- 4. host-side failures ------------------------------------------------------------------


def test_snapshot_directory_not_writable(demo_app: DemoApp) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    # A pending migration: a deploy without one takes no snapshot at all.
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n", **PENDING_MIGRATION})
    demo_app.snapshot_dir.chmod(0o500)
    try:
        result = demo_app.deploy()
    finally:
        demo_app.snapshot_dir.chmod(0o700)

    assert result.returncode == 1
    assert "database snapshot failed" in result.stderr
    assert "writable" in result.stderr
    assert_serving(demo_app, first)
    assert_unlocked(demo_app)
    deploy_ok(demo_app)


def test_database_refusing_connections(demo_app: DemoApp) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"],
        input=f'ALTER DATABASE "{demo_app.database}" ALLOW_CONNECTIONS false;')
    try:
        result = demo_app.deploy()
    finally:
        run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"],
            input=f'ALTER DATABASE "{demo_app.database}" ALLOW_CONNECTIONS true;')

    assert result.returncode == 1
    # The pending-migration check is the first to meet the database: it says so.
    assert "cannot tell which migrations are pending" in result.stderr
    assert "database is up" in result.stderr
    assert demo_app.get("/")[0] == 200  # the old version still answers
    assert_unlocked(demo_app)
    deploy_ok(demo_app)
    assert_serving(demo_app, demo_app.head)
    assert first != demo_app.head


@pytest.mark.proxy_engine("nginx")
def test_nginx_config_test_failing_keeps_the_old_slot(demo_app: DemoApp) -> None:
    """A switch needs no reload; a site change (here a new proxy port) does, and a failing
    `nginx -t` then keeps the old slot, the old site.conf and the old listen address."""
    first = demo_app.head
    deploy_ok(demo_app)
    site = Path(demo_app.remote_dir, "nginx", "site.conf").read_text()
    [new_port] = free_ports(1, exclude=set(demo_app.ports.values()))
    demo_app.write_config(environments={"staging": {
        "ports": {**demo_app.ports, "proxy": new_port},
        "public_url": f"http://127.0.0.1:{new_port}"}})
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    demo_app.compose("exec", "-T", "proxy", "sh", "-c",
                     "echo 'this is not nginx;' >> /etc/nginx/nginx.conf", check=True)

    result = demo_app.deploy()

    assert result.returncode == 4
    assert "nginx -t" in result.stderr
    assert_serving(demo_app, first)
    assert demo_app.container_state("green") == "exited"
    assert_unlocked(demo_app)
    assert Path(demo_app.remote_dir, "nginx", "site.conf").read_text() == site
    assert sorted(p.name for p in Path(demo_app.remote_dir, "nginx", "state").iterdir()
                  if p.name in ("blue", "green")) == ["blue"]


def test_migration_timeout(demo_app: DemoApp) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    demo_app.write_config(database={"migration_timeout": 2})
    demo_app.commit("very slow migration", {
        "db/migrations/20260301000000_slow.sql":
            "-- migrate:up\nSELECT pg_sleep(30);\n-- migrate:down\n"})

    result = demo_app.deploy()

    assert result.returncode == 5
    assert "timed out after 2 s" in result.stderr
    assert "db.restore" in result.stderr
    assert_serving(demo_app, first)
    assert_unlocked(demo_app)


@pytest.mark.parametrize(("mode", "message"), [
    ("html", "not JSON"),
    ("garbage", "not JSON"),
    ("lying", "unhealthy"),
    ("hang", "no answer"),
])
def test_health_endpoint_faults(demo_app: DemoApp, mode: str, message: str) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    demo_app.write_config(deployment={"health_check": {"retries": 3, "interval": 0.5,
                                                       "timeout": 1}})
    demo_app.set_health_mode(mode)

    result = demo_app.deploy()

    assert result.returncode == 4, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert_serving(demo_app, first)
    assert demo_app.container_state("green") == "exited"
    assert_unlocked(demo_app)
    assert demo_app.state()["deployment_history"][0]["status"] == "failed"


def test_docker_daemon_stopped(demo_app: DemoApp) -> None:
    """Runs the real daemon down and up again (scripts/testbed-up.sh restarts it)."""
    deploy_ok(demo_app)
    before = demo_app.state_bytes()
    pidfile = Path("/run/togather-testbed/dockerd.pid")
    if not pidfile.exists():
        pytest.skip("dockerd was not started by the test bed script (no pid file)")
    pid = int(pidfile.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        result = demo_app.deploy()
    finally:
        run(["bash", str(Path(__file__).parents[2] / "scripts" / "testbed-up.sh")],
            timeout=300)

    assert result.returncode == 1
    assert "Docker daemon does not answer" in result.stderr
    assert "Traceback" not in result.stderr
    assert demo_app.state_bytes() == before  # nothing changed, no lock taken
