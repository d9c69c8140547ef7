"""Issue 8, the lock's part, against the real test bed: maintenance commands wait for an
in-flight deploy (item 6), and "holder gone" is proven only on the holder's own machine, by a
free or reused pid (item 8). The host-clock and release-race items (7, 9) cannot be produced
with one clock and one operator: tests/unit/test_store.py, test_lease.py and test_lock_cli.py
cover them with fake hosts."""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import UTC, datetime, timedelta

from togather_tasks.lock import process_start_time, read_boot_id, read_machine_id

PAUSED = r"togather: paused before (\w+) \(pid (\d+)\)"
EXIT_LOCK_HELD = 3


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                          check=False).returncode == 0


def remove_images(name: str) -> None:
    """The app's own image name: leave nothing behind (the fixtures keep images)."""
    tags = subprocess.run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}",
                           name], capture_output=True, text=True, check=False).stdout.split()
    if tags:
        subprocess.run(["docker", "image", "rm", "--force", *tags], capture_output=True,
                       check=False)


def test_cleanup_and_db_snapshot_wait_for_an_in_flight_deploy(demo_app, new_ulid, tmp_path):
    """A deploy has built its image and holds the lock; cleanup with a budget that the current
    and previous deployments fill would remove that fresh image (it is in no state yet), and
    db.snapshot's retention would judge snapshots against a stale state. Both refuse (exit 3)
    naming the deploy, remove nothing, and the deploy then finishes."""
    app = demo_app
    image = f"e2e-{app.hex}-server"  # its own name: cleanup must not touch other tests' images
    app.write_config(app={"image": image}, commit=True)
    try:
        assert app.deploy().returncode == 0
        state = app.state()
        state["previous_deployment"] = {
            **state["current_deployment"], "id": f"dep_{new_ulid()}", "version": "1234567",
            "git_commit": "1234567" + "0" * 33, "status": "superseded"}
        app.put_state(state)
        fresh = app.commit("v2")
        hold = tmp_path / "hold"
        hold.touch()
        running = app.spawn("deploy", app.env_flag, env={
            "TOGATHER_TEST_PAUSE_BEFORE": "start", "TOGATHER_TEST_PAUSE_FILE": str(hold)})
        running.wait_for_stdout(PAUSED, timeout=300)
        assert image_exists(f"{image}:{fresh[:7]}")
        snapshots_before = sorted(p.name for p in app.snapshots())

        cleanup = app.inv("cleanup", app.env_flag, "--keep-images=2", "--keep-snapshots=1")
        snapshot = app.inv("db.snapshot", app.env_flag)
        hold.unlink()
        deployed = running.wait(timeout=300)

        for result in (cleanup, snapshot):
            output = result.stdout + result.stderr
            assert result.returncode == EXIT_LOCK_HELD, output
            assert "Traceback" not in output
            assert "e2e@example.com" in result.stderr and "deploy" in result.stderr
        assert image_exists(f"{image}:{fresh[:7]}")
        assert sorted(p.name for p in app.snapshots()) == snapshots_before
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert app.state()["current_deployment"]["git_commit"] == fresh
        assert app.state()["lock"] == {"locked": False}
    finally:
        remove_images(image)


def put_lock(app, new_ulid, **fields) -> dict:
    now = datetime.now(UTC)
    lock = {"locked": True, "lock_id": f"lock_{new_ulid()}", "locked_by": "e2e@example.com",
            "locked_at": iso(now - timedelta(minutes=1)),
            "lock_expires_at": iso(now + timedelta(minutes=29)),
            "deployment_id": f"dep_{new_ulid()}", "operation": "deploy",
            "hostname": socket.gethostname(), **fields}
    app.put_state({"environment": app.env, "current_deployment": None, "lock": lock})
    return lock


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def this_machine() -> dict:
    return {"machine_id": read_machine_id(), "boot_id": read_boot_id()}


def test_a_namesake_machines_lock_is_not_broken_by_its_dead_pid(demo_app, new_ulid):
    """Same hostname, pid free here, but recorded by another machine (another machine id):
    nothing here proves that holder gone. Refused, named, the lock kept."""
    app = demo_app
    lock = put_lock(app, new_ulid, pid=dead_pid(), machine_id="0" * 32, boot_id=read_boot_id())
    result = app.inv("lock.acquire", app.env_flag, "--message=maintenance")
    assert result.returncode == EXIT_LOCK_HELD, result.stdout + result.stderr
    assert "e2e@example.com" in result.stderr and "Traceback" not in result.stderr
    assert app.state()["lock"] == lock


def test_a_lock_of_an_older_version_waits_for_its_expiry(demo_app, new_ulid):
    """Hostname and a dead pid only (no machine id): not proof enough any more."""
    app = demo_app
    lock = put_lock(app, new_ulid, pid=dead_pid())
    result = app.inv("lock.acquire", app.env_flag, "--message=maintenance")
    assert result.returncode == EXIT_LOCK_HELD, result.stdout + result.stderr
    assert app.state()["lock"] == lock


def test_a_gone_holder_on_this_machine_is_taken_over(demo_app, new_ulid):
    """This machine and boot: a free pid, or a live pid started at another time (reused), is
    a gone holder; the lock is taken over with a warning naming it."""
    app = demo_app
    for pid, started in ((dead_pid(), "ticks:1"), (os.getpid(), "ticks:1")):
        old = put_lock(app, new_ulid, pid=pid, process_started=started, **this_machine())
        result = app.inv("lock.acquire", app.env_flag, "--message=maintenance")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "took over" in result.stderr and f"pid {pid}" in result.stderr
        assert app.state()["lock"]["lock_id"] != old["lock_id"]


def test_a_live_holder_on_this_machine_keeps_its_lock(demo_app, new_ulid):
    app = demo_app
    lock = put_lock(app, new_ulid, pid=os.getpid(),
                    process_started=process_start_time(os.getpid()), **this_machine())
    result = app.inv("lock.acquire", app.env_flag, "--message=maintenance")
    assert result.returncode == EXIT_LOCK_HELD, result.stdout + result.stderr
    assert app.state()["lock"] == lock
