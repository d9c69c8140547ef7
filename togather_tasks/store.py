"""The state file and the lock, kept on the environment's first host.

Every write is a compare-and-swap: the new content is uploaded to a temporary file next to the
state file, then one shell command, under `flock` on the host, renames it into place only if the
file still has the content (sha256) this process read. Two operators on two machines therefore
cannot both take the lock: the second CAS sees a changed file, re-reads it, and finds the lock
held. The same mechanism makes every other state update safe.

Every lock decision (take, renew, release) is made inside that compare-and-swap, on the state
as read and at the host's time printed by the same read (under the same flock): the decision
holds only if the file is still exactly what it was decided on, and no operator's clock counts.

Round trips: a write is one command (the new content on its standard input, checked against its
sha256 before the swap, so a cut upload is never swapped in). The store remembers the state it
last read or wrote; an update may decide on that remembered state instead of reading again,
since the swap itself proves the file unchanged. Only a decision that writes is trusted that
way: one that writes nothing (the lock is held, not ours, nothing to change) or fails is made
again on a fresh read. A lock is taken on a remembered state only when that state is at most
GUESS_LOCK_SECONDS old (the host's time read with it dates the new lock), and renewed only on a
fresh read.
"""

from __future__ import annotations

import hashlib
import io
import math
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import commands as cmd
from . import lock as lockrules
from .commands import private_directories
from .errors import CommandError, LockHeldError, StateError, TogatherError
from .hosts import Host
from .state import State, iso, utc_now

ABSENT = "absent"
CAS_CONFLICT = 75
UPLOAD_INCOMPLETE = 74
CAS_ATTEMPTS = 8
READ_ATTEMPTS = 3
STATE_MARKER = "--togather-state--"
HOST_CLOCK = "date -u +%s"
# How old a remembered state may be to decide on taking the lock (see the module docstring).
GUESS_LOCK_SECONDS = 10.0
ANY_AGE = math.inf


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


def write_script(directory: str, state_file: str, tmp: str, expected: str, digest: str) -> str:
    """Shell for a whole write in one command (pure, unit-tested): the directory (closed to
    others), the new content from standard input into `tmp` (created, never overwritten:
    `set -C`), its sha256 checked against `digest` (exit 74 and nothing swapped when the upload
    was cut short), then the compare-and-swap (exit 75 when the file changed)."""
    q = shlex.quote
    return (
        f"{private_directories(directory)} && (set -C && cat > {q(tmp)}) && "
        f"if [ \"$(sha256sum < {q(tmp)} | cut -d' ' -f1)\" != {q(digest)} ]; then "
        f"rm -f {q(tmp)}; exit {UPLOAD_INCOMPLETE}; fi && "
        + cas_script(directory, state_file, tmp, expected)
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
        # The state as this store last read or wrote it, and when (time.monotonic()) the
        # host's time in it was read.
        self._known: Snapshot | None = None
        self._known_at = 0.0
        # The last state parsed from the file, by its token: the same bytes read again (the
        # lease's checks) need no second parse and schema validation.
        self._parsed: tuple[str, State] | None = None

    @property
    def where(self) -> str:
        return f"{self.path} on {self.host.name}"

    @property
    def read_command(self) -> str:
        """The read, for a caller that batches it with other probes (see `adopt`)."""
        return read_script(self.directory, self.path)

    def read(self) -> Snapshot:
        for _ in range(READ_ATTEMPTS):
            result = self.host.run(self.read_command, timeout=60, what="reading the state file")
            snap = self._parse(result.stdout)
            if snap is not None:
                return self._remember(snap)
        # Still different after retries: not UTF-8 text (or a writer that ignores the flock).
        raise StateError(f"{self.where} is not UTF-8 text or keeps changing while read",
                         hint="Inspect the file by hand; nothing was changed.")

    def adopt(self, output: str) -> Snapshot:
        """The snapshot from `read_command`'s output run by the caller; read again here when
        that output does not hold a whole file (changed or not UTF-8)."""
        snap = self._parse(output)
        return self._remember(snap) if snap is not None else self.read()

    def known(self) -> Snapshot:
        """The state as this store last read or wrote it (read now if it has not yet). Under
        our lock nobody else writes it, and a lock broken meanwhile is caught by the lease's
        check before anything destructive, as after a read."""
        return self._known if self._known is not None else self.read()

    def _parse(self, output: str) -> Snapshot | None:
        """read_script's output -> a snapshot; None when the content does not match its hash
        (not UTF-8 text, or changed by a writer that ignores the flock)."""
        clock, _, out = output.partition("\n")
        host_now = self._host_time(clock)
        if out.strip() == ABSENT:
            return Snapshot(State.empty(self.environment), ABSENT, host_now)
        token, _, body = out.partition(f"\n{STATE_MARKER}\n")
        if not body and not token:
            raise StateError(f"cannot read {self.where}")
        digest = hashlib.sha256(body.encode("utf-8", "surrogateescape")).hexdigest()
        if digest != token.strip():
            return None
        if self._parsed is not None and self._parsed[0] == digest:
            return Snapshot(self._parsed[1].copy(), digest, host_now)
        state = State.from_json(body, self.where, self.environment)
        self._parsed = (digest, state.copy())
        return Snapshot(state, digest, host_now)

    def _remember(self, snap: Snapshot, read_at: float | None = None) -> Snapshot:
        self._known = snap
        self._known_at = time.monotonic() if read_at is None else read_at
        return snap

    def _host_time(self, line: str) -> datetime:
        try:
            return datetime.fromtimestamp(int(line.strip()), UTC)
        except (ValueError, OverflowError, OSError):
            raise StateError(f"{self.host.name} did not tell its time ({line.strip()[:40]!r} "
                             f"from `{HOST_CLOCK}`)") from None

    def write(self, new: State, expected_token: str) -> str:
        """CAS-write `new` (one command); returns the new token. Raises StateConflict if the
        file changed."""
        data = new.to_json().encode()
        digest = hashlib.sha256(data).hexdigest()
        tmp = f"{self.directory}/.upload.{secrets.token_hex(8)}.tmp"
        result = self.host.stream_into(
            write_script(self.directory, self.path, tmp, expected_token, digest),
            io.BytesIO(data), timeout=60)
        if result.exit_status == CAS_CONFLICT:
            raise StateConflict(self.where)
        if not result.ok:
            self.host.run(cmd.remove_files(tmp), timeout=30, check=False)
            raise CommandError(f"writing {self.where} failed (exit {result.exit_status}): "
                               f"{self.host.redact(result.stderr.strip())[:200]}")
        return digest

    def update(self, change: Callable[[State], State]) -> State:
        """Read-modify-CAS with bounded retries (concurrent lock contenders may race us)."""
        new = self._swap(lambda snap: change(snap.state), guess_within=ANY_AGE)
        if new is None:
            raise StateError(f"{self.where} kept changing under us; giving up after "
                             f"{CAS_ATTEMPTS} attempts")
        return new

    def _swap(self, change: Callable[[Snapshot], State], *,
              guess_within: float = 0.0) -> State | None:
        """The compare-and-swap loop: `change` decides on a snapshot (state and host time) and
        is asked again on a fresh one whenever the file changed before the write. It first
        decides on the remembered snapshot when that is at most `guess_within` seconds old:
        a write proves it right; anything else is decided again on a fresh read. None when
        the file kept changing."""
        read_at = self._known_at
        fresh_enough = guess_within > 0 and time.monotonic() - read_at <= guess_within
        guess = self._known if fresh_enough else None
        if guess is not None:
            try:
                new = change(guess)
            except TogatherError:
                new = guess.state  # decided again on a fresh read
            if new != guess.state and self._try_write(new, guess, read_at):
                return new
        for _ in range(CAS_ATTEMPTS):
            snap = self.read()
            read_at = self._known_at
            new = change(snap)
            if new == snap.state or self._try_write(new, snap, read_at):
                return new
        return None

    def _try_write(self, new: State, snap: Snapshot, read_at: float) -> bool:
        """Write `new` in place of `snap`; False when the file changed since. The written state
        is remembered with the host's time of the read it was decided on."""
        try:
            token = self.write(new, snap.token)
        except StateConflict:
            return False
        self._remember(Snapshot(new, token, snap.host_now), read_at)
        return True

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

        if self._swap(change, guess_within=GUESS_LOCK_SECONDS) is None:
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
        outcome = self.release_where(lambda lock: lock.get("lock_id") == lock_id,
                                     guess_within=ANY_AGE)
        return outcome.found if outcome.released else None

    def release_where(self, may_release: Callable[[dict[str, Any]], bool], *,
                      guess_within: float = 0.0) -> LockRelease:
        """Release the lock if `may_release(lock)` says so, judged inside the compare-and-swap:
        a lock taken by someone else between a read and the write is judged afresh, never
        freed on the strength of the lock that was there before. (A released lock's `at` is
        the host's time of the read it was decided on: with `guess_within`, possibly a
        remembered one.)"""
        outcomes: list[LockRelease] = []

        def change(snap: Snapshot) -> State:
            current = snap.state.lock
            release = bool(current.get("locked")) and may_release(current)
            outcomes.append(LockRelease(current, release, snap.host_now))
            return snap.state.without_lock() if release else snap.state

        if self._swap(change, guess_within=guess_within) is None:
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
