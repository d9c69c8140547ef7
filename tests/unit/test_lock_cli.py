"""`inv lock.*` on the development environment (host `local`: the state file in a temporary
remote_dir, no SSH) against state files that are racy, odd or hostile; and slots.env, where a
hostile state's `image` would land."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from togather_tasks import commands as cmd
from togather_tasks.config import Settings
from togather_tasks.errors import StateError
from togather_tasks.hosts import LocalHost
from togather_tasks.lock import Operator
from togather_tasks.store import StateStore
from togather_tasks.ulid import new_id

from .projects import BASE_CONFIG, Project
from .test_cli import assert_clean, run_in_process

LOCK_ID = "lock_01JBQR6KXYZABCDEFGHJKMNPQR"
DEPLOYMENT_ID = "dep_01JBQR7KXYZABCDEFGHJKMNPQR"


@pytest.fixture
def remote_dir(project: Project, tmp_path: Path) -> Path:
    directory = tmp_path / "srv" / "development"
    project.write_config(BASE_CONFIG + f"  development:\n    remote_dir: {directory}\n")
    return directory


def inv(project: Project, capsys: pytest.CaptureFixture[str],
        *args: str) -> subprocess.CompletedProcess[str]:
    result = run_in_process(project, capsys, *args, "--env=development")
    assert_clean(result)
    return result


def put_lock(remote_dir: Path, **fields: object) -> dict:
    lock = {"locked": True, "lock_id": LOCK_ID, "locked_by": "ops@example.com",
            "locked_at": "2026-01-28T15:00:00Z", "lock_expires_at": "2999-01-01T00:00:00Z",
            "deployment_id": DEPLOYMENT_ID, **fields}
    remote_dir.mkdir(parents=True, exist_ok=True)
    document = {"environment": "development", "current_deployment": None, "lock": lock}
    (remote_dir / "deployment-state.json").write_text(json.dumps(document))
    return lock


def state_lock(remote_dir: Path) -> dict:
    return json.loads((remote_dir / "deployment-state.json").read_text())["lock"]


def test_release_never_frees_a_lock_taken_between_its_read_and_its_write(
        project: Project, capsys, remote_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Alice's manual lock is hers to release; Bob's deploy takes the lock just after
    `lock.release` read it. Bob's lock must survive, and Alice is told who holds it."""
    assert inv(project, capsys, "lock.acquire", "--message=maintenance").returncode == 0
    alices = state_lock(remote_dir)
    real_read = StateStore.read
    bobs: list[dict] = []

    def read_then_bob_deploys(self: StateStore):
        snap = real_read(self)
        if not bobs:
            bobs.append({})
            other = StateStore(LocalHost(), str(remote_dir), "development")
            other.release(alices["lock_id"])
            bob = Operator(email="bob@example.com", hostname="ci", pid=os.getpid())
            bobs[0], _ = other.acquire(bob, deployment_id=new_id("dep"), operation="deploy",
                                       timeout_minutes=30)
        return snap

    monkeypatch.setattr(StateStore, "read", read_then_bob_deploys)
    result = inv(project, capsys, "lock.release")
    monkeypatch.undo()
    assert result.returncode == 3, result.stderr
    assert "bob@example.com" in result.stderr
    assert state_lock(remote_dir) == bobs[0]


def test_release_without_force_refuses_a_running_operations_lock(
        project: Project, capsys, remote_dir: Path) -> None:
    lock = put_lock(remote_dir, pid=12345, hostname="ci")
    result = inv(project, capsys, "lock.release")
    assert result.returncode == 3 and "--force" in result.stderr
    assert state_lock(remote_dir) == lock
    forced = inv(project, capsys, "lock.release", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "broke the lock of ops@example.com" in forced.stderr
    assert state_lock(remote_dir) == {"locked": False}


@pytest.mark.parametrize("timestamp", ["2026-01-28t15:00:00z", "9999-12-31T23:59:59-23:59"])
def test_odd_timestamps_crash_no_lock_command(project: Project, capsys, remote_dir: Path,
                                              timestamp: str) -> None:
    lock = put_lock(remote_dir, locked_at=timestamp, lock_expires_at=timestamp)
    status = inv(project, capsys, "lock.status")
    assert status.returncode == 0, status.stderr
    assert "ops@example.com" in status.stdout
    acquire = inv(project, capsys, "lock.acquire", "--message=mine")
    if timestamp.startswith("2026"):
        assert acquire.returncode == 0, acquire.stderr
        assert "expired" in acquire.stderr
    else:
        assert acquire.returncode == 3, acquire.stderr
        assert "unreadable" in acquire.stderr
        assert state_lock(remote_dir) == lock


@pytest.mark.parametrize("pid", [0, -1, 2**40])
def test_an_impossible_pid_is_a_clear_state_error(project: Project, capsys, remote_dir: Path,
                                                  pid: int) -> None:
    put_lock(remote_dir, pid=pid, hostname=os.uname().nodename)
    result = inv(project, capsys, "lock.acquire", "--message=mine")
    assert result.returncode == 1
    assert "does not match the state schema" in result.stderr and "lock.pid" in result.stderr


def test_an_image_that_would_add_lines_to_slots_env_is_refused_at_read(
        project: Project, capsys, remote_dir: Path) -> None:
    put_lock(remote_dir)
    path = remote_dir / "deployment-state.json"
    document = json.loads(path.read_text())
    document["current_deployment"] = {
        "id": DEPLOYMENT_ID, "version": "abc1234", "git_commit": "abc1234" + "0" * 33,
        "deployed_at": "2026-01-28T15:00:00Z", "deployed_by": "ops@example.com",
        "active_slot": "blue", "health_status": "healthy",
        "image": "togather:abc1234\nPROXY_BIND=0.0.0.0"}
    path.write_text(json.dumps(document))
    result = inv(project, capsys, "lock.status")
    assert result.returncode == 1
    assert "does not match the state schema: current_deployment" in result.stderr


@pytest.mark.parametrize("image", ["togather:abc1234\n", "togather:abc1234\nPROXY_BIND=0.0.0.0",
                                   "togather:abc 1234", "togather:'abc1234'", "${HOME}"])
def test_slots_env_refuses_an_image_that_would_add_or_bend_a_line(
        settings: Settings, image: str) -> None:
    """The schema's pattern lets a trailing line break through (`$` matches before it in
    Python's re): slots.env itself refuses every value that is not an image reference."""
    with pytest.raises(StateError, match="refusing to write the green image"):
        cmd.slots_env(settings, {"blue": "togather:abc1234", "green": image})
