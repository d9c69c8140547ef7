"""db.restore and rollback --restore-db against a fake host: which snapshot is protected, which
lock the restore runs under, what is refused before any change, what a failed rollback says."""

from __future__ import annotations

import io
import time
from datetime import timedelta
from typing import Any

import pytest

from togather_tasks import dbops
from togather_tasks.config import Settings
from togather_tasks.errors import LockLostError, UsageError
from togather_tasks.hosts import Result
from togather_tasks.lock import Decision
from togather_tasks.output import Console, RunLog
from togather_tasks.redact import Redactor
from togather_tasks.rollback import Rollback, RollbackOptions
from togather_tasks.snapshots import protected_names, snapshot_before_newer
from togather_tasks.state import State, new_deployment, utc_now
from togather_tasks.ulid import new_id

OLD = (utc_now() - timedelta(days=30)).strftime("%Y%m%dT%H%M%SZ")
TARGET = f"staging_{OLD}_aaaaaaa.dump"


class FakeHost:
    """Answers the snapshot listing with `listing`; records every command."""

    name = "fake-host"

    def __init__(self, listing: str = "", *, restore_ok: bool = True) -> None:
        self.listing = listing
        self.restore_ok = restore_ok
        self.commands: list[str] = []

    def run(self, command: str, **_: Any) -> Result:
        self.commands.append(command)
        if command.startswith("if [ -d "):
            return Result(command, 0, self.listing, "", 0.0)
        if "pg_dump" in command:
            return Result(command, 0, "2048\n", "", 0.0)
        if command.startswith("bash -o pipefail") and not self.restore_ok:
            return Result(command, 1, "", "psql:<stdin>:9: ERROR:  permission denied\n", 0.0)
        return Result(command, 0, "", "", 0.0)

    def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        self.commands.append(f"write {path}")


class FakeStore:
    def __init__(self, state: State) -> None:
        self.state = state
        self.acquired: list[str] = []
        self.released: list[str] = []

    def read(self) -> Any:
        return type("Read", (), {"state": self.state})()

    def acquire(self, operator: Any, *, operation: str, **_: Any) -> tuple[dict, Decision]:
        self.acquired.append(operation)
        lock = {"locked": True, "lock_id": new_id("lock"), "lock_expires_at": "later"}
        return lock, Decision(True, "free")

    def holds(self, lock_id: str) -> bool:
        return True

    def release(self, lock_id: str, force: bool = False) -> dict:
        self.released.append(lock_id)
        return {"locked": False}


class FakeSession:
    def __init__(self, settings: Settings, host: FakeHost, state: State | None = None) -> None:
        self.settings = settings
        self.primary = host
        self.all_hosts = [host]
        self.store = FakeStore(state or State.empty(settings.env))
        self.operator = type("Operator", (), {"email": "ops@example.com"})()
        self.out, self.err = io.StringIO(), io.StringIO()
        self.console = Console(Redactor(), stream=self.out, err=self.err)
        self.log = RunLog(None, self.console.redactor)
        self.redact = self.console.redactor
        self.audited: list[dict] = []

    def audit(self, **fields: object) -> None:
        self.audited.append(fields)

    def heartbeat_store(self) -> FakeStore:
        return self.store


class FakeLease:
    """An already held lease (a rollback's): records the checks."""

    def __init__(self, *, lost: bool = False) -> None:
        self.lock = {"lock_id": "lock_held"}
        self.lost = lost
        self.checked: list[str] = []

    def check(self, before: str) -> None:
        self.checked.append(before)
        if self.lost:
            raise LockLostError(f"lost before {before}")


def listing(*names: str) -> str:
    return "".join(f"{name} 100\n" for name in names)


def deployment(version: str, *, snapshot: str | None = None) -> dict[str, Any]:
    time.sleep(0.002)  # ids sort by time: one per millisecond keeps them in order
    d = new_deployment(deployment_id=new_id("dep"), git_commit=version * 6 + version[:4],
                       deployed_by="ops@example.com", slot="blue",
                       image=f"togather-server:{version[:7]}", at=utc_now())
    d.update(version=version[:7], status="active")
    if snapshot:
        d["snapshot"] = snapshot
    return d


# --- item 3: the restore's own snapshot survives the safety snapshot's retention pass -------


def test_restore_never_prunes_the_snapshot_it_restores(settings: Settings) -> None:
    old_others = [f"staging_{OLD[:-3]}0{i}Z_bbbbbb{i}.dump" for i in range(3)]
    host = FakeHost(listing(TARGET, *old_others))
    session = FakeSession(settings, host)

    dbops.restore(session, TARGET, lease=FakeLease())  # type: ignore[arg-type]

    [removal] = [c for c in host.commands if c.startswith("rm -f /")]
    assert TARGET not in removal
    assert all(name in removal for name in old_others)
    assert any(c.startswith("bash -o pipefail") and TARGET in c for c in host.commands)


# --- item 17: a snapshot belongs to its environment ----------------------------------------


def test_restore_refuses_a_snapshot_of_another_environment(settings: Settings) -> None:
    foreign = f"production_{OLD}_aaaaaaa.dump"
    host = FakeHost(listing(foreign))
    with pytest.raises(UsageError, match="snapshot of the production environment"):
        dbops.restore(FakeSession(settings, host), foreign)  # type: ignore[arg-type]
    assert host.commands == []


def test_check_snapshot_name_accepts_its_own_environment_only() -> None:
    assert dbops.check_snapshot_name("staging", TARGET) == TARGET
    for bad in ("../../etc/passwd", "", None, f"development_{OLD}_aaaaaaa.dump"):
        with pytest.raises(UsageError):
            dbops.check_snapshot_name("staging", bad)


# --- item 5: the restore runs under the caller's lease, or holds one of its own -------------


def test_restore_with_a_held_lease_takes_no_lock_and_checks_it_first(settings: Settings) -> None:
    host = FakeHost(listing(TARGET))
    session = FakeSession(settings, host)
    lease = FakeLease()

    dbops.restore(session, TARGET, lease=lease)  # type: ignore[arg-type]

    assert session.store.acquired == []
    assert lease.checked == ["restore_database"]


def test_restore_stops_when_the_lease_is_lost(settings: Settings) -> None:
    host = FakeHost(listing(TARGET))
    with pytest.raises(LockLostError):
        dbops.restore(FakeSession(settings, host), TARGET,  # type: ignore[arg-type]
                      lease=FakeLease(lost=True))
    assert not any(c.startswith("bash -o pipefail") for c in host.commands)


def test_restore_alone_holds_and_releases_a_lock_of_its_own(settings: Settings) -> None:
    session = FakeSession(settings, FakeHost(listing(TARGET)))
    dbops.restore(session, TARGET)  # type: ignore[arg-type]
    assert session.store.acquired == ["db.restore"]
    assert len(session.store.released) == 1


def test_a_failed_restore_names_the_sql_error(settings: Settings) -> None:
    session = FakeSession(settings, FakeHost(listing(TARGET), restore_ok=False))
    with pytest.raises(Exception, match="restore failed: psql:<stdin>:9: ERROR:  permission"):
        dbops.restore(session, TARGET, lease=FakeLease())  # type: ignore[arg-type]


# --- items 22 and 23: rollback --restore-db ------------------------------------------------


def two_deployments(settings: Settings) -> tuple[State, dict, dict]:
    first = deployment("aaaaaaa")
    second = deployment("bbbbbbb", snapshot=f"/srv/snapshots/staging_{OLD}_aaaaaaa.dump")
    state = State.empty(settings.env)
    state.current, state.previous = second, {**first, "status": "superseded"}
    state.history = [dict(second), {**first, "status": "superseded"}]
    return state, first, second


def test_snapshot_before_newer_is_the_first_later_deployments() -> None:
    first, second = deployment("aaaaaaa"), deployment("bbbbbbb", snapshot="/s/one.dump")
    no_migration, third = deployment("ccccccc"), deployment("ddddddd", snapshot="/s/two.dump")
    state = State.empty("staging")
    state.current, state.history = third, [third, no_migration, second, first]
    assert snapshot_before_newer(state, first) == "/s/one.dump"
    assert snapshot_before_newer(state, second) == "/s/two.dump"
    assert snapshot_before_newer(state, third) is None


def test_retention_protects_the_snapshot_a_rollback_would_restore() -> None:
    """Deploys without a pending migration take no snapshot: the one that undoes the last
    migration can belong to a deployment older than current and previous."""
    first = deployment("aaaaaaa")
    migrated = deployment("bbbbbbb", snapshot="/s/staging_20261101T000000Z_aaaaaaa.dump")
    third, fourth = deployment("ccccccc"), deployment("ddddddd")
    state = State.empty("staging")
    state.current, state.previous = fourth, third
    state.history = [fourth, third, migrated, first]
    assert "staging_20261101T000000Z_aaaaaaa.dump" not in protected_names(state)
    state.previous = first
    assert protected_names(state) == {"staging_20261101T000000Z_aaaaaaa.dump"}


def test_rollback_restore_db_without_yes_refuses_before_any_change(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal
    state, _, _ = two_deployments(settings)
    host = FakeHost()
    session = FakeSession(settings, host, state)

    with pytest.raises(UsageError, match="needs --yes"):
        Rollback(session, RollbackOptions(restore_db=True)).run()  # type: ignore[arg-type]

    assert session.store.acquired == []
    assert host.commands == []


def test_a_rollback_failing_its_health_gate_names_the_snapshot_and_the_command(
        settings: Settings) -> None:
    state, first, second = two_deployments(settings)
    session = FakeSession(settings, FakeHost(), state)
    rb = Rollback(session, RollbackOptions())  # type: ignore[arg-type]
    rb.chosen, rb.snapshot = first, second["snapshot"]

    rb.on_failure("health", "the green slot did not become healthy")

    err = session.err.getvalue()
    assert second["snapshot"] in err
    assert "inv rollback --env=staging --restore-db" in err
