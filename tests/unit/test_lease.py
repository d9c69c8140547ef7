"""Lease: the lock for one operation, over StateStores on this machine whose host clock is
faked. The heartbeat renews from the host's clock; a lock broken elsewhere is seen before the
next destructive step and is never released by the operation that lost it."""

from __future__ import annotations

import io
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from togather_tasks.errors import LockHeldError, LockLostError
from togather_tasks.lease import Lease
from togather_tasks.output import Console
from togather_tasks.redact import Redactor
from togather_tasks.state import parse_iso
from togather_tasks.store import StateStore

from .test_store import T0, ClockedHost, acquire, operator


class FastLease(Lease):
    """A heartbeat every 50 ms instead of every 10 minutes."""

    interval = 0.05


def session_on(state_dir: Path, host: ClockedHost) -> SimpleNamespace:
    def heartbeat_store() -> StateStore:
        return StateStore(host, str(state_dir), "staging")

    return SimpleNamespace(
        settings=SimpleNamespace(env="staging", deployment={"lock_timeout_minutes": 30}),
        store=StateStore(host, str(state_dir), "staging"), operator=operator(),
        console=Console(Redactor(), stream=io.StringIO(), err=io.StringIO()),
        heartbeat_store=heartbeat_store)


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_heartbeat_renews_from_the_hosts_clock(tmp_path: Path) -> None:
    host = ClockedHost(T0)
    session = session_on(tmp_path, host)
    with FastLease(session, deployment_id="dep_01JBQR7KXYZABCDEFGHJKMNPQR",
                   operation="deploy") as lease:
        assert lease.lock["locked_at"] == "2026-01-28T15:00:00Z"
        host.now = T0 + timedelta(minutes=20)

        def renewed() -> bool:
            expires = session.store.read().state.lock["lock_expires_at"]
            return parse_iso(expires) == T0 + timedelta(minutes=50)

        wait_for(renewed)
        lease.check("migrate")
    assert session.store.read().state.lock == {"locked": False}


def test_a_lock_broken_elsewhere_stops_the_operation_and_stays_broken(tmp_path: Path) -> None:
    host = ClockedHost(T0)
    session = session_on(tmp_path, host)
    lease = Lease(session, deployment_id="dep_01JBQR7KXYZABCDEFGHJKMNPQR", operation="deploy",
                  heartbeat=False).acquire()
    other = StateStore(ClockedHost(T0), str(tmp_path), "staging")
    bobs, _ = acquire(other, operator("bob@example.com"), force=True)
    with pytest.raises(LockLostError) as info:
        lease.check("migrate")
    assert info.value.exit_code == 3 and "stopping before migrate" in info.value.message
    assert lease.release() is None
    assert other.read().state.lock == bobs


def test_a_lease_is_refused_while_another_operation_holds_the_lock(tmp_path: Path) -> None:
    acquire(StateStore(ClockedHost(T0), str(tmp_path), "staging"), operator("bob@example.com"))
    session = session_on(tmp_path, ClockedHost(T0 + timedelta(minutes=29)))
    with pytest.raises(LockHeldError, match="bob@example.com"):
        Lease(session, deployment_id="dep_01JBQR7KXYZABCDEFGHJKMNPQR",
              operation="cleanup").acquire()
