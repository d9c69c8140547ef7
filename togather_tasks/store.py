"""The state file and the lock, kept on the environment's first host.

Every write is a compare-and-swap: the new content is uploaded to a temporary file next to the
state file, then one shell command, under `flock` on the host, renames it into place only if the
file still has the content (sha256) this process read. Two operators on two machines therefore
cannot both take the lock: the second CAS sees a changed file, re-reads it, and finds the lock
held. The same mechanism makes every other state update safe.

Every lock decision (take, renew, release) is made inside that compare-and-swap, on the state
as read and at the host's time printed by the same read (under the same flock): the decision
holds only if the file is still exactly what it was decided on, and no operator's clock counts.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import commands as cmd
from . import lock as lockrules
from .commands import private_directories
from .errors import CommandError, LockHeldError, StateError
from .hosts import Host
from .state import State, iso, utc_now

ABSENT = "absent"
CAS_CONFLICT = 75
CAS_ATTEMPTS = 8
READ_ATTEMPTS = 3
STATE_MARKER = "--togather-state--"
HOST_CLOCK = "date -u +%s"


@dataclass
class Snapshot:
    """A state as read, with the token a later compare-and-swap must match and the host's
    time when it was read."""

    state: State
    token: str
    host_now: datetime


@dataclass
class LockRelease:
    """What `release_where` found inside the compare-and-swap: the lock as it was (at the
    host's time `at`), and whether it was released."""

    found: dict[str, Any]
    released: bool
    at: datetime


def cas_script(directory: str, state_file: str, tmp: str, expected: str) -> str:
    """Shell for the compare-and-swap (pure, unit-tested): exit 0 on success, 75 when the file
    changed since it was read (the caller re-reads and decides again)."""
    q = shlex.quote
    return (
        f"cd {q(directory)} && exec 9>>.state.flock && flock -w 20 9 && "
        f"if [ -e {q(state_file)} ]; then cur=$(sha256sum < {q(state_file)} | cut -d' ' -f1); "
        f"else cur={ABSENT}; fi && "
        f"if [ \"$cur\" != {q(expected)} ]; then rm -f {q(tmp)}; exit {CAS_CONFLICT}; fi && "
        f"sync {q(tmp)} && mv -f {q(tmp)} {q(state_file)}"
    )


def read_script(directory: str, path: str) -> str:
    """Print the host's time (seconds since the epoch), the state file's sha256 and content,
    read under a shared flock so a concurrent compare-and-swap cannot replace it between them
    (read-only: opening the lock file for reading never creates it)."""
    q = shlex.quote
    lockfile = q(f"{directory}/.state.flock")
    return (f"if [ -e {lockfile} ]; then exec 9< {lockfile} && flock -s -w 20 9; fi; "
            f"{HOST_CLOCK}; "
            f"if [ -e {q(path)} ]; then sha256sum < {q(path)} | cut -d' ' -f1; "
            f"echo {STATE_MARKER}; cat {q(path)}; else echo {ABSENT}; fi")


class StateStore:
    def __init__(self, host: Host, directory: str, environment: str) -> None:
        self.host = host
        self.directory = directory
        self.environment = environment
        self.path = f"{directory}/deployment-state.json"

    @property
    def where(self) -> str:
        return f"{self.path} on {self.host.name}"

    def read(self) -> Snapshot:
        for _ in range(READ_ATTEMPTS):
            result = self.host.run(read_script(self.directory, self.path), timeout=60,
                                   what="reading the state file")
            clock, _, out = result.stdout.partition("\n")
            host_now = self._host_time(clock)
            if out.strip() == ABSENT:
                return Snapshot(State.empty(self.environment), ABSENT, host_now)
            token, _, body = out.partition(f"\n{STATE_MARKER}\n")
            if not body and not token:
                raise StateError(f"cannot read {self.where}")
            digest = hashlib.sha256(body.encode("utf-8", "surrogateescape")).hexdigest()
            if digest == token.strip():
                return Snapshot(State.from_json(body, self.where, self.environment),
                                token.strip(), host_now)
        # Still different after retries: not UTF-8 text (or a writer that ignores the flock).
        raise StateError(f"{self.where} is not UTF-8 text or keeps changing while read",
                         hint="Inspect the file by hand; nothing was changed.")

    def _host_time(self, line: str) -> datetime:
        try:
            return datetime.fromtimestamp(int(line.strip()), UTC)
        except (ValueError, OverflowError, OSError):
            raise StateError(f"{self.host.name} did not tell its time ({line.strip()[:40]!r} "
                             f"from `{HOST_CLOCK}`)") from None

    def write(self, new: State, expected_token: str) -> str:
        """CAS-write `new`; returns the new token. Raises StateConflict if the file changed."""
        data = new.to_json().encode()
        self.host.run(private_directories(self.directory), timeout=30,
                      what="creating the remote directory")
        tmp = self.host.write_temp(self.directory, data, mode=0o640)
        result = self.host.run(cas_script(self.directory, self.path, tmp, expected_token),
                               timeout=60, check=False)
        if result.exit_status == CAS_CONFLICT:
            raise StateConflict(self.where)
        if not result.ok:
            self.host.run(cmd.remove_files(tmp), timeout=30, check=False)
            raise CommandError(f"writing {self.where} failed (exit {result.exit_status}): "
                               f"{self.host.redact(result.stderr.strip())[:200]}")
        return hashlib.sha256(data).hexdigest()

    def update(self, change: Callable[[State], State]) -> State:
        """Read-modify-CAS with bounded retries (concurrent lock contenders may race us)."""
        new = self._swap(lambda snap: change(snap.state))
        if new is None:
            raise StateError(f"{self.where} kept changing under us; giving up after "
                             f"{CAS_ATTEMPTS} attempts")
        return new

    def _swap(self, change: Callable[[Snapshot], State]) -> State | None:
        """The compare-and-swap loop: `change` decides on a snapshot (state and host time) and
        is asked again on a fresh one whenever the file changed before the write. None when it
        kept changing."""
        for _ in range(CAS_ATTEMPTS):
            snap = self.read()
            new = change(snap)
            if new == snap.state:
                return new
            try:
                self.write(new, snap.token)
            except StateConflict:
                continue
            return new
        return None

    # --- the lock -------------------------------------------------------------------------

    def acquire(self, operator: lockrules.Operator, *, deployment_id: str, operation: str,
                timeout_minutes: int, force: bool = False, message: str | None = None,
                with_pid: bool = True,
                process_alive: Callable[[int], bool] = lockrules.process_alive,
                start_time: Callable[[int], str | None] = lockrules.process_start_time,
                ) -> tuple[dict, lockrules.Decision]:
        """Take the lock or raise LockHeldError naming the holder. Returns the lock written and
        the decision (whose `replaced` names a stale or forced lock that was taken over)."""
        taken: list[tuple[dict, lockrules.Decision]] = []

        def change(snap: Snapshot) -> State:
            decision = lockrules.decide(snap.state.lock, now=snap.host_now, force=force,
                                        here=operator, process_alive=process_alive,
                                        start_time=start_time)
            if not decision.acquire:
                raise self._held(snap.state.lock, snap.host_now, decision)
            lock = lockrules.new_lock(operator, deployment_id=deployment_id, now=snap.host_now,
                                      timeout_minutes=timeout_minutes, operation=operation,
                                      message=message, with_pid=with_pid)
            taken.append((lock, decision))
            return snap.state.with_lock(lock)

        if self._swap(change) is None:
            raise LockHeldError(f"{self.environment}: the lock is contended; try again")
        return taken[-1]

    def _held(self, lock: dict, host_now: datetime, decision: lockrules.Decision
              ) -> LockHeldError:
        reason = "" if decision.reason == "held" else f" ({decision.reason})"
        return LockHeldError(
            f"{self.environment} is locked by {lockrules.describe(lock, host_now)}{reason}",
            hint="Wait for it to finish (`inv lock.status --env="
                 f"{self.environment}`), or if you are sure it is dead, break it with "
                 f"`inv lock.release --env={self.environment} --force`.")

    def release(self, lock_id: str) -> dict | None:
        """Release our lock. Returns the lock that was released, or None when it was not ours
        any more (someone broke it) or already free."""
        outcome = self.release_where(lambda lock: lock.get("lock_id") == lock_id)
        return outcome.found if outcome.released else None

    def release_where(self, may_release: Callable[[dict[str, Any]], bool]) -> LockRelease:
        """Release the lock if `may_release(lock)` says so, judged inside the compare-and-swap:
        a lock taken by someone else between a read and the write is judged afresh, never
        freed on the strength of the lock that was there before."""
        outcomes: list[LockRelease] = []

        def change(snap: Snapshot) -> State:
            current = snap.state.lock
            release = bool(current.get("locked")) and may_release(current)
            outcomes.append(LockRelease(current, release, snap.host_now))
            return snap.state.without_lock() if release else snap.state

        if self._swap(change) is None:
            raise StateError(f"{self.where} kept changing under us; the lock was not released")
        return outcomes[-1]

    def renew(self, lock_id: str, timeout_minutes: int) -> bool:
        """Push our lock's expiry forward, from the host's time (the lease's heartbeat)."""
        ok = False

        def change(snap: Snapshot) -> State:
            nonlocal ok
            ok = snap.state.lock.get("lock_id") == lock_id
            if not ok:
                return snap.state
            return snap.state.with_lock(
                lockrules.renewed(snap.state.lock, snap.host_now, timeout_minutes))

        if self._swap(change) is None:
            raise StateError(f"{self.where} kept changing under us; the lock was not renewed")
        return ok

    def holds(self, lock_id: str) -> bool:
        return self.read().state.lock.get("lock_id") == lock_id


class StateConflict(Exception):
    """The state file changed between our read and our write."""

    def __init__(self, where: str) -> None:
        super().__init__(f"{where} changed concurrently")


def audit_line_command(directory: str, line: str) -> str:
    """Append one (already redacted) JSON line to the host's audit log."""
    q = shlex.quote
    return (f"{private_directories(directory)} && "
            f"printf '%s\\n' {q(line)} >> {q(directory + '/audit.log')}")


def now_iso() -> str:
    return iso(utc_now())
