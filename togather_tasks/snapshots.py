"""Database snapshots: naming, retention (pure) and taking one on the primary host."""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import commands as cmd
from .errors import TogatherError
from .state import State, utc_now

if TYPE_CHECKING:
    from .session import Session

q = shlex.quote
# The environment's name (config.ENV_NAME_RE: no `_`), so the first `_` ends it.
SNAPSHOT_RE = re.compile(
    r"^(?P<env>[a-z][a-z0-9-]*)_(?P<ts>\d{8}T\d{6}Z)_(?P<sha>[0-9a-f]{7})\.dump$")


def snapshot_name(env: str, timestamp: str, sha7: str) -> str:
    """`staging_20261126T181500Z_abc1234.dump` (timestamp as YYYYmmddTHHMMSSZ)."""
    return f"{env}_{timestamp}_{sha7}.dump"


@dataclass(frozen=True)
class SnapshotFile:
    name: str
    taken_at: datetime
    sha7: str
    size: int = 0


def parse_listing(text: str) -> list[SnapshotFile]:
    """`NAME SIZE` lines (from `find -printf`) -> snapshots, newest first; other files skipped."""
    found = []
    for line in text.splitlines():
        name, _, size = line.strip().partition(" ")
        match = SNAPSHOT_RE.match(name)
        if not match:
            continue
        taken = datetime.strptime(match["ts"], "%Y%m%dT%H%M%SZ").replace(tzinfo=utc_now().tzinfo)
        found.append(SnapshotFile(name, taken, match["sha"], int(size) if size.isdigit() else 0))
    return sorted(found, key=lambda s: s.name.split("_", 1)[1], reverse=True)


def to_delete(snapshots: list[SnapshotFile], *, now: datetime, keep: int, max_age_days: int,
              protected: set[str]) -> list[SnapshotFile]:
    """Keep the newest `keep` that are younger than `max_age_days`; delete the rest, except
    the protected ones (the current and previous deployments' snapshots)."""
    cutoff = now - timedelta(days=max_age_days)
    kept = 0
    doomed = []
    for snap in snapshots:  # newest first
        if snap.name in protected:
            continue
        if snap.taken_at >= cutoff and kept < keep:
            kept += 1
            continue
        doomed.append(snap)
    return doomed


def snapshot_before_newer(state: State, target: dict[str, Any]) -> str | None:
    """The snapshot that returns the database to `target`'s schema: that of the earliest
    deployment after `target` that took one (ids are ULIDs: they sort by time). None when no
    later deployment took one (a deploy without a pending migration takes none)."""
    later = [d for d in state.known_deployments()
             if d["id"] > target["id"] and d.get("snapshot")]
    return min(later, key=lambda d: d["id"])["snapshot"] if later else None


def protected_names(state: State | None, *extra: str | None) -> set[str]:
    """Never pruned: the snapshots of the current and previous deployments, the one a
    rollback to the previous deployment would restore (it can belong to an older deployment
    now that deploys without migrations take none), and `extra`."""
    paths = list(extra)
    if state:
        paths += [d.get("snapshot") for d in (state.current, state.previous) if d]
        if state.previous:
            paths.append(snapshot_before_newer(state, state.previous))
    return {p.rsplit("/", 1)[-1] for p in paths if p}


def list_command(directory: str) -> str:
    return (f"if [ -d {q(directory)} ]; then find {q(directory)} -maxdepth 1 -type f "
            f"-name '*.dump' -printf '%f %s\\n'; fi")


def list_snapshots(session: Session) -> list[SnapshotFile]:
    out = session.primary.run(list_command(session.settings.snapshot_dir), timeout=60,
                              what="listing snapshots").stdout
    return parse_listing(out)


NAME_ATTEMPTS = 3  # a snapshot's name has the second it was taken in; see take_snapshot


def take_snapshot(session: Session, sha7: str, state: State | None, *,
                  protect: Iterable[str] = ()) -> tuple[str, int]:
    """pg_dump on the primary host, verified; then apply retention, which never removes the
    new snapshot nor those in `protect` (a restore's target). Returns (path, bytes)."""
    st = session.settings
    for _ in range(NAME_ATTEMPTS):
        now = utc_now()
        path = f"{st.snapshot_dir}/{snapshot_name(st.env, now.strftime('%Y%m%dT%H%M%SZ'), sha7)}"
        result = session.primary.run(cmd.snapshot_command(st, path), timeout=3600, check=False)
        if result.exit_status != cmd.SNAPSHOT_NAME_TAKEN:
            break
        # A snapshot of this name (this second) exists: never overwrite it (it may be the one
        # a restore is about to replay); take this one under the next second's name.
        time.sleep(1.0 - now.microsecond / 1e6 + 0.01)
    if result.exit_status == cmd.SNAPSHOT_NAME_TAKEN:
        raise TogatherError(f"database snapshot failed: {path} exists already",
                            hint="Nothing was migrated or switched. Run the command again.")
    if not result.ok:
        session.primary.run(cmd.remove_files(path + ".partial"), timeout=30, check=False)
        lines = result.stderr.strip().splitlines()
        raise TogatherError(
            "database snapshot failed: " + (lines[-1] if lines else f"exit {result.exit_status}"),
            hint="Nothing was migrated or switched. Check that the database is up and that "
                 f"{st.snapshot_dir} on {session.primary.name} is writable with free space.")
    size = int(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else 0
    prune(session, state, keep_also=(path, *protect))
    return path, size


def prune(session: Session, state: State | None, *, keep_also: Iterable[str] = (),
          keep: int | None = None, dry_run: bool = False) -> list[SnapshotFile]:
    st = session.settings
    doomed = to_delete(list_snapshots(session), now=utc_now(),
                       keep=keep if keep is not None else st.database["snapshot_keep"],
                       max_age_days=st.database["snapshot_retention_days"],
                       protected=protected_names(state, *keep_also))
    if doomed and not dry_run:
        session.primary.run(cmd.remove_files(*(f"{st.snapshot_dir}/{s.name}" for s in doomed)),
                            timeout=60, what="removing old snapshots")
    return doomed
