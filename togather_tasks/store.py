"""The state file and the lock, kept on the environment's first host.

Every write is a compare-and-swap: the new content is uploaded to a temporary file next to the
state file, then one shell command, under `flock` on the host, renames it into place only if the
file still has the content (sha256) this process read. Two operators on two machines therefore
cannot both take the lock: the second CAS sees a changed file, re-reads it, and finds the lock
held. The same mechanism makes every other state update safe.
"""

from __future__ import annotations

import hashlib
import shlex
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from . import lock as lockrules
from .errors import CommandError, LockHeldError, StateError
from .hosts import Host
from .state import State, iso, utc_now

ABSENT = "absent"
CAS_CONFLICT = 75
CAS_ATTEMPTS = 8
READ_ATTEMPTS = 3
STATE_MARKER = "--togather-state--"


@dataclass
class Snapshot:
    """A state as read, with the token a later compare-and-swap must match."""

    state: State
    token: str


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
    """Print the state file's sha256 and content, read under a shared flock so a concurrent
    compare-and-swap cannot replace it between the two (read-only: opening the lock file for
    reading never creates it)."""
    q = shlex.quote
    lockfile = q(f"{directory}/.state.flock")
    return (f"if [ -e {lockfile} ]; then exec 9< {lockfile} && flock -s -w 20 9; fi; "
            f"if [ -e {q(path)} ]; then sha256sum < {q(path)} | cut -d' ' -f1; "
            f"echo {STATE_MARKER}; cat {q(path)}; else echo {ABSENT}; fi")


class StateStore:
    def __init__(self, host: Host, directory: str, environment: str, *,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.host = host
        self.directory = directory
        self.environment = environment
        self.path = f"{directory}/deployment-state.json"
        self.clock = clock

    @property
    def where(self) -> str:
        return f"{self.path} on {self.host.name}"

    def read(self) -> Snapshot:
        for _ in range(READ_ATTEMPTS):
            result = self.host.run(read_script(self.directory, self.path), timeout=60,
                                   what="reading the state file")
            out = result.stdout
            if out.strip() == ABSENT:
                return Snapshot(State.empty(self.environment), ABSENT)
            token, _, body = out.partition(f"\n{STATE_MARKER}\n")
            if not body and not token:
                raise StateError(f"cannot read {self.where}")
            digest = hashlib.sha256(body.encode("utf-8", "surrogateescape")).hexdigest()
            if digest == token.strip():
                return Snapshot(State.from_json(body, self.where, self.environment),
                                token.strip())
        # Still different after retries: not UTF-8 text (or a writer that ignores the flock).
        raise StateError(f"{self.where} is not UTF-8 text or keeps changing while read",
                         hint="Inspect the file by hand; nothing was changed.")

    def write(self, new: State, expected_token: str) -> str:
        """CAS-write `new`; returns the new token. Raises StateConflict if the file changed."""
        data = new.to_json().encode()
        self.host.run(f"mkdir -p {shlex.quote(self.directory)}", timeout=30,
                      what="creating the remote directory")
        tmp = self.host.write_temp(self.directory, data, mode=0o640)
        result = self.host.run(cas_script(self.directory, self.path, tmp, expected_token),
                               timeout=60, check=False)
        if result.exit_status == CAS_CONFLICT:
            raise StateConflict(self.where)
        if not result.ok:
            self.host.run(f"rm -f {shlex.quote(tmp)}", timeout=30, check=False)
            raise CommandError(f"writing {self.where} failed (exit {result.exit_status}): "
                               f"{self.host.redact(result.stderr.strip())[:200]}")
        return hashlib.sha256(data).hexdigest()

    def update(self, change: Callable[[State], State]) -> State:
        """Read-modify-CAS with bounded retries (concurrent lock contenders may race us)."""
        for _ in range(CAS_ATTEMPTS):
            snap = self.read()
            new = change(snap.state)
            try:
                self.write(new, snap.token)
                return new
            except StateConflict:
                continue
        raise StateError(f"{self.where} kept changing under us; giving up after "
                         f"{CAS_ATTEMPTS} attempts")

    # --- the lock -------------------------------------------------------------------------

    def acquire(self, operator: lockrules.Operator, *, deployment_id: str, operation: str,
                timeout_minutes: int, force: bool = False, message: str | None = None,
                with_pid: bool = True,
                process_alive: Callable[[int], bool] = lockrules.process_alive,
                ) -> tuple[dict, lockrules.Decision]:
        """Take the lock or raise LockHeldError naming the holder. Returns the lock written and
        the decision (whose `replaced` names a stale or forced lock that was taken over)."""
        for _ in range(CAS_ATTEMPTS):
            snap = self.read()
            now = self.clock()
            decision = lockrules.decide(snap.state.lock, now=now, force=force,
                                        local_hostname=socket.gethostname(),
                                        process_alive=process_alive)
            if not decision.acquire:
                holder = lockrules.describe(snap.state.lock, now)
                raise LockHeldError(
                    f"{self.environment} is locked by {holder}",
                    hint="Wait for it to finish (`inv lock.status --env="
                         f"{self.environment}`), or if you are sure it is dead, break it with "
                         f"`inv lock.release --env={self.environment} --force`.")
            lock = lockrules.new_lock(operator, deployment_id=deployment_id, now=now,
                                      timeout_minutes=timeout_minutes, operation=operation,
                                      message=message, with_pid=with_pid)
            try:
                self.write(snap.state.with_lock(lock), snap.token)
            except StateConflict:
                continue
            return lock, decision
        raise LockHeldError(f"{self.environment}: the lock is contended; try again")

    def release(self, lock_id: str | None, *, force: bool = False) -> dict | None:
        """Release our lock (or any lock with force). Returns the lock that was released, or
        None when it was not ours any more (someone broke it) or already free."""
        released: dict | None = None

        def change(state: State) -> State:
            nonlocal released
            current = state.lock
            if not current.get("locked"):
                released = None
                return state
            if not force and current.get("lock_id") != lock_id:
                released = None
                return state
            released = current
            return state.without_lock()

        self.update(change)
        return released

    def renew(self, lock_id: str, timeout_minutes: int) -> bool:
        """Push our lock's expiry forward (called at each step of a long deploy)."""
        ok = False

        def change(state: State) -> State:
            nonlocal ok
            ok = state.lock.get("lock_id") == lock_id
            if not ok:
                return state
            return state.with_lock(lockrules.renewed(state.lock, self.clock(), timeout_minutes))

        self.update(change)
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
    return f"mkdir -p {q(directory)} && printf '%s\\n' {q(line)} >> {q(directory + '/audit.log')}"


def now_iso() -> str:
    return iso(utc_now())
