"""The lease's heartbeat against a real state store in a temporary directory, with the renewal
interval shortened so a test sees several beats."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from togather_tasks.config import Settings
from togather_tasks.errors import LockLostError
from togather_tasks.lease import Lease
from togather_tasks.lock import Operator
from togather_tasks.ulid import new_id

from .fakehost import FakeSession

BEAT = 0.05


@pytest.fixture
def session(settings: Settings, tmp_path: Path) -> FakeSession:
    return FakeSession(settings, tmp_path / "state")


@pytest.fixture(autouse=True)
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Lease, "interval", property(lambda self: BEAT))


def new_lease(session: FakeSession) -> Lease:
    return Lease(session, deployment_id=new_id("dep"), operation="deploy")  # type: ignore


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(BEAT / 5)


def test_the_heartbeat_pushes_the_expiry_while_a_step_runs(session: FakeSession) -> None:
    lease = new_lease(session).acquire()
    first = session.store.read().state.lock["lock_expires_at"]
    time.sleep(1.2)  # expiry has a resolution of one second

    assert session.store.read().state.lock["lock_expires_at"] > first
    lease.check("migrate")
    lease.release()
    assert session.store.read().state.lock == {"locked": False}


def test_a_lock_taken_over_is_noticed_by_the_heartbeat(session: FakeSession) -> None:
    lease = new_lease(session).acquire()
    session.store.release_where(lambda lock: True)
    session.store.acquire(Operator("bob@example.com", "bob-laptop", 4242),
                          deployment_id=new_id("dep"), operation="deploy", timeout_minutes=30)

    wait_for(lambda: lease.lost is not None)
    with pytest.raises(LockLostError, match="stopping before switch"):
        lease.check("switch")
    lease.release()
    assert session.store.read().state.lock["locked_by"] == "bob@example.com"
