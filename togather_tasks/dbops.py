"""Operator commands on the database: snapshot on demand, list, restore (under the lock, with
a safety snapshot of the current data first)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from . import commands as cmd
from . import slots, snapshots
from .errors import TogatherError, UsageError
from .lease import Lease
from .session import Session
from .state import utc_now
from .ulid import new_id

RESTORE_TIMEOUT = 3600


def snapshot_now(session: Session, *, protect: Iterable[str] = ()) -> tuple[str, int]:
    slots.write_pgpass(session.settings, session.primary)
    state = session.store.read().state
    sha7 = state.current["version"] if state.current else "0000000"
    return snapshots.take_snapshot(session, sha7, state, protect=protect)


def check_snapshot_name(env: str, name: str | None) -> str:
    """A bare snapshot name (never a path) taken in `env`: a staging dump restored into
    production would replace production's data with staging's."""
    match = snapshots.SNAPSHOT_RE.match(name or "")
    if not match:
        raise UsageError(f"--snapshot {name!r} is not a snapshot name",
                         hint="Names look like staging_20261126T181500Z_abc1234.dump; "
                              f"see `inv db.snapshots --env={env}`.")
    if match["env"] != env:
        raise UsageError(f"{name} is a snapshot of the {match['env']} environment, not of {env}",
                         hint="A snapshot is restored only into the environment it was taken "
                              f"from; see `inv db.snapshots --env={env}`.")
    return match.string


def confirm_restore(env: str, name: str, yes: bool) -> None:
    """Restoring overwrites data: always an explicit yes (a flag, or typed at a terminal),
    asked before anything is locked or changed."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("restoring a snapshot needs --yes when stdin is not a terminal; "
                         "nothing was changed")
    answer = input(f"Restore {name} into the {env} database, replacing its data? Type the "
                   "environment name to confirm: ")
    if answer.strip() != env:
        raise UsageError("not confirmed; nothing was changed")


def restore(session: Session, name: str, *, lease: Lease | None = None) -> str:
    """Restore snapshot `name` into the environment's database, under `lease` (a rollback's,
    already held) or a lock of its own. Returns the safety snapshot taken of the data as it
    was just before."""
    check_snapshot_name(session.settings.env, name)
    if lease is not None:
        return _restore_locked(session, name, lease)
    with Lease(session, deployment_id=new_id("dep"), operation="db.restore") as own:
        return _restore_locked(session, name, own)


def _restore_locked(session: Session, name: str, lease: Lease) -> str:
    st = session.settings
    if name not in {s.name for s in snapshots.list_snapshots(session)}:
        raise UsageError(f"no snapshot {name} in {st.snapshot_dir} on {session.primary.name}",
                         hint=f"See `inv db.snapshots --env={st.env}`.")
    safety, _ = snapshot_now(session, protect=(name,))
    lease.check("restore_database")
    result = session.primary.run(cmd.restore_command(st, f"{st.snapshot_dir}/{name}"),
                                 timeout=RESTORE_TIMEOUT, check=False)
    if not result.ok:
        raise TogatherError(
            f"restore failed: {restore_error(result.stderr) or f'exit {result.exit_status}'}",
            hint=f"It ran in one transaction, so the database is unchanged. The data as it "
                 f"was is also in {safety}.")
    session.audit(operation="db.restore", snapshot=name, safety_snapshot=safety,
                  result="succeeded", at=str(utc_now()))
    return safety


def restore_error(stderr: str) -> str:
    """The line that says why: psql's ERROR or pg_restore's error, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "ERROR:" in line or "error:" in line:
            return line
    return lines[-1] if lines else ""
