"""Operator commands on the database: snapshot on demand, list, restore (under the lock, with
a safety snapshot of the current data first)."""

from __future__ import annotations

import shlex

from . import commands as cmd
from . import slots, snapshots
from .errors import TogatherError, UsageError
from .session import Session
from .state import utc_now
from .ulid import new_id

q = shlex.quote


def snapshot_now(session: Session) -> tuple[str, int]:
    slots.write_pgpass(session.settings, session.primary)
    state = session.store.read().state
    sha7 = state.current["version"] if state.current else "0000000"
    return snapshots.take_snapshot(session, sha7, state)


def restore(session: Session, name: str) -> str:
    """Restore snapshot `name` into the environment's database. Returns the safety snapshot
    taken of the data as it was just before."""
    if not cmd.SNAPSHOT_RE.match(name or ""):
        raise UsageError(f"--snapshot {name!r} is not a snapshot name",
                         hint="Names look like staging_20261126T181500Z_abc1234.dump; "
                              f"see `inv db.snapshots --env={session.settings.env}`.")
    st = session.settings
    available = {s.name for s in snapshots.list_snapshots(session)}
    if name not in available:
        raise UsageError(f"no snapshot {name} in {st.snapshot_dir} on {session.primary.name}",
                         hint=f"See `inv db.snapshots --env={st.env}`.")
    lock, _ = session.store.acquire(session.operator, deployment_id=new_id("dep"),
                                    operation="db.restore",
                                    timeout_minutes=st.deployment["lock_timeout_minutes"])
    try:
        safety, _ = snapshot_now(session)
        result = session.primary.run(cmd.restore_command(st, f"{st.snapshot_dir}/{name}"),
                                     timeout=3600, check=False)
        if not result.ok:
            lines = result.stderr.strip().splitlines()
            raise TogatherError(
                "restore failed: " + (lines[-1] if lines else f"exit {result.exit_status}"),
                hint=f"It ran in one transaction, so the database is unchanged. The data as it "
                     f"was is also in {safety}.")
        session.audit(operation="db.restore", snapshot=name, safety_snapshot=safety,
                      result="succeeded", at=str(utc_now()))
        return safety
    finally:
        session.store.release(lock["lock_id"])
