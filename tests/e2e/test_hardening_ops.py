"""Issue 8 on the real test bed: the lock's heartbeat through a step longer than the lock's
lifetime, a lock broken during a deploy, SIGHUP, and a proxy port changed in deployment.yml."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime
from pathlib import Path

from conftest import DemoApp, free_ports
from test_faults import assert_serving, assert_unlocked, deploy_ok, paused_deploy


def expires_in(app: DemoApp) -> float:
    """Seconds until the state file's lock expires (negative once expired)."""
    expires = app.state()["lock"]["lock_expires_at"]
    when = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


def test_the_heartbeat_keeps_the_lock_through_a_step_longer_than_its_lifetime(
        demo_app: DemoApp, tmp_path: Path) -> None:
    demo_app.write_config(deployment={"lock_timeout_minutes": 1})
    deploy_ok(demo_app)
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    hold = tmp_path / "hold"
    proc = paused_deploy(demo_app, "migrate", hold=hold)

    time.sleep(70)  # longer than the lock's 60 s lifetime
    assert expires_in(demo_app) > 20, "the heartbeat (every 20 s) did not renew the lock"
    rival = demo_app.deploy()
    hold.unlink()
    result = proc.wait(240)

    assert rival.returncode == 3, rival.stdout + rival.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    assert_serving(demo_app, demo_app.head)
    assert_unlocked(demo_app)


def test_a_lock_broken_during_a_deploy_stops_it_before_migrate(demo_app: DemoApp,
                                                               tmp_path: Path) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    hold = tmp_path / "hold"
    proc = paused_deploy(demo_app, "migrate", hold=hold)

    demo_app.inv("lock.release", demo_app.env_flag, "--force", check=True)
    demo_app.inv("lock.acquire", demo_app.env_flag, "--message=maintenance", check=True)
    hold.unlink()
    result = proc.wait(120)

    assert result.returncode == 3, result.stdout + result.stderr
    assert "stopping before migrate" in result.stderr
    assert "Traceback" not in result.stderr
    assert_serving(demo_app, first)
    lock = demo_app.state()["lock"]
    assert lock["locked"] and lock.get("message") == "maintenance"  # the new holder's lock
    assert demo_app.state()["deployment_history"][0]["status"] != "failed"


def test_sighup_ends_a_deploy_like_sigterm(demo_app: DemoApp) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})
    proc = paused_deploy(demo_app, "health")

    proc.send(signal.SIGHUP)
    result = proc.wait(60)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "interrupted (SIGHUP)" in result.stderr
    assert_unlocked(demo_app)
    assert_serving(demo_app, first)
    assert demo_app.state()["deployment_history"][0]["status"] == "failed"
    assert demo_app.container_state("green") != "running"


def test_a_proxy_port_changed_in_the_config_is_applied_by_the_next_deploy(
        demo_app: DemoApp) -> None:
    deploy_ok(demo_app)
    [new_port] = free_ports(1, exclude=set(demo_app.ports.values()))
    ports = {**demo_app.ports, "proxy": new_port}
    demo_app.write_config(environments={"staging": {
        "ports": ports, "public_url": f"http://127.0.0.1:{new_port}"}})
    demo_app.commit("v2", {"app/VERSION_NOTE": "2\n"})

    result = demo_app.deploy()

    assert result.returncode == 0, result.stdout + result.stderr
    # A new listen address is a site change: the configuration tested and a reload, no recreate
    # (HAProxy, the default engine, names its `bind`; nginx its `listen`).
    assert (f"reloaded (bind 127.0.0.1:{demo_app.ports['proxy']} -> 127.0.0.1:{new_port})"
            in result.stderr)
    assert "recreated" not in result.stderr
    demo_app.ports["proxy"] = new_port
    assert_serving(demo_app, demo_app.head)
    demo_app.commit("v3", {"app/VERSION_NOTE": "3\n"})
    again = demo_app.deploy()
    assert again.returncode == 0
    assert "recreated" not in again.stderr and "reloaded" not in again.stderr


def test_a_health_endpoint_that_never_answers_fails_within_the_gate_s_deadline(
        demo_app: DemoApp) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    demo_app.write_config(deployment={"health_check": {
        "retries": 30, "interval": 1, "timeout": 3, "deadline": 6}})
    demo_app.set_health_mode("hang")

    started = time.monotonic()
    result = demo_app.deploy()
    took = time.monotonic() - started

    assert result.returncode == 4, result.stdout + result.stderr
    assert "did not become healthy" in result.stderr
    assert took < 45, f"the deploy took {took:.0f} s; 30 x (3 s + 1 s) = 120 s without a deadline"
    assert_serving(demo_app, first)
    assert_unlocked(demo_app)
