"""The environment lock for the length of one operation: taken on entry, renewed by a
heartbeat while the operation runs (so a step longer than the lock's lifetime never loses it),
checked before every destructive action, released on every exit path. Every renewal, like the
acquisition, is decided inside the state file's compare-and-swap at the host's clock (store.py),
so neither this machine's clock nor a lock taken by someone else in between counts.

The heartbeat runs in a thread with its own SSH connection to the primary host, opened only when
the first renewal is due: a deploy shorter than a third of the lock's lifetime never opens it,
and the operation's own connection is never shared between threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import LockHeldError, LockLostError, TogatherError
from .lock import Decision
from .signals import shielded

if TYPE_CHECKING:
    from .output import Console
    from .session import Session
    from .store import StateStore

RENEWALS_PER_LEASE = 3
# Waiting for a held lock (--lock-wait): ask again soon at first (a deploy that is just
# finishing), then every few seconds; each ask is one SSH round trip under the state's flock.
LOCK_POLL_FIRST = 0.5
LOCK_POLL_MAX = 2.0
LOCK_WAIT_REPORT_EVERY = 10.0
T = TypeVar("T")


def wait_for_lock(attempt: Callable[[], T], *, wait_seconds: float, console: Console,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> T:
    """`attempt()` (a lock acquisition) again while it raises LockHeldError, for up to
    `wait_seconds`: CI pipelines queue their deploys instead of failing on each other. The
    holder is named once, then a line every LOCK_WAIT_REPORT_EVERY seconds shows the wait is
    alive; still held at the end -> LockHeldError (exit 3)."""
    start = clock()
    poll = LOCK_POLL_FIRST
    reported: float | None = None
    while True:
        try:
            return attempt()
        except LockHeldError as held:
            now = clock()
            left = start + wait_seconds - now
            if left <= 0:
                if reported is None:
                    raise
                raise LockHeldError(f"{held.message}; still held after waiting "
                                    f"{wait_seconds:g} s", hint=held.hint) from None
            if reported is None:
                console.warn(f"{held.message}; waiting up to {wait_seconds:g} s for it")
                reported = now
            elif now - reported >= LOCK_WAIT_REPORT_EVERY:
                console.note(f"still waiting for the lock ({now - start:.0f} s of "
                             f"{wait_seconds:g} s)")
                reported = now
            sleep(min(poll, left))
            poll = min(poll * 2, LOCK_POLL_MAX)


class Lease:
    """`with Lease(session, deployment_id=..., operation="deploy") as lease:` holds the lock;
    `lease.check("migrate")` raises LockLostError (exit 3) if it is no longer ours."""

    def __init__(self, session: Session, *, deployment_id: str, operation: str,
                 force: bool = False, message: str | None = None, with_pid: bool = True,
                 heartbeat: bool = True,
                 heartbeat_store: Callable[[], StateStore] | None = None,
                 lock_wait: float = 0) -> None:
        self.session = session
        self.deployment_id = deployment_id
        self.operation = operation
        self.force = force
        self.message = message
        self.with_pid = with_pid
        self.timeout_minutes = int(session.settings.deployment["lock_timeout_minutes"])
        self.lock_wait = lock_wait
        self.lock: dict[str, Any] | None = None
        self.decision: Decision | None = None
        self._heartbeat_enabled = heartbeat
        self._heartbeat_store = heartbeat_store or session.heartbeat_store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._confirmed = 0.0

    @property
    def interval(self) -> float:
        return self.timeout_minutes * 60 / RENEWALS_PER_LEASE

    @property
    def lock_id(self) -> str:
        assert self.lock is not None
        return self.lock["lock_id"]

    # --- life cycle -------------------------------------------------------------------------

    def acquire(self) -> Lease:
        """Take the lock, waiting up to `lock_wait` seconds while someone else holds it."""
        self.lock, self.decision = wait_for_lock(
            self._take, wait_seconds=self.lock_wait, console=self.session.console)
        self._confirmed = time.monotonic()
        if self._heartbeat_enabled:
            self._thread = threading.Thread(target=self._beat, name="togather-lock-heartbeat",
                                            daemon=True)
            self._thread.start()
        return self

    def _take(self) -> tuple[dict[str, Any], Decision]:
        return self.session.store.acquire(
            self.session.operator, deployment_id=self.deployment_id, operation=self.operation,
            timeout_minutes=self.timeout_minutes, force=self.force, message=self.message,
            with_pid=self.with_pid)

    def release(self) -> dict[str, Any] | None:
        """Stop the heartbeat and release the lock if it is still ours. Never raises: a lock
        that cannot be released expires by itself, and the operator is told how to free it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.lock is None:
            return None
        console = self.session.console
        released = None
        try:
            released = self.session.store.release(self.lock_id)
            if released is None:
                console.warn("our lock had already been taken over by someone else")
        except (TogatherError, OSError) as exc:
            console.error(
                f"could not release the lock {self.lock_id}: {exc}. It expires at "
                f"{self.lock['lock_expires_at']}, or run `inv lock.release --env="
                f"{self.session.settings.env} --force`.")
        self.lock = None
        return released

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with shielded():
            self.release()

    # --- while held --------------------------------------------------------------------------

    def check(self, before: str) -> None:
        """Before a destructive action: is the lock still ours? Asks the host (a lock broken
        with --force elsewhere is seen at once), not only the heartbeat."""
        if self.lock is None:
            raise LockLostError(f"no lock held before {before}")
        if self._lost is None:
            try:
                holds = self.session.store.holds(self.lock_id)
            except (TogatherError, OSError) as exc:
                holds = self._recently_confirmed()
                if not holds:
                    self._lost = f"cannot confirm it ({exc})"
            else:
                if holds:
                    self._confirmed = time.monotonic()
                else:
                    self._lost = "it was taken over by another operation or broken with --force"
        if self._lost is not None:
            raise LockLostError(
                f"the {self.session.settings.env} lock {self.lock_id} is no longer ours: "
                f"{self._lost}; stopping before {before}",
                hint=f"Nothing more was changed by this run. See `inv lock.status --env="
                     f"{self.session.settings.env}` and `inv status --env="
                     f"{self.session.settings.env}` before retrying.")

    @property
    def lost(self) -> str | None:
        return self._lost

    def _recently_confirmed(self) -> bool:
        return time.monotonic() - self._confirmed < self.timeout_minutes * 60 * 0.9

    def _beat(self) -> None:
        store: StateStore | None = None
        while not self._stop.wait(self.interval):
            try:
                if store is None:
                    store = self._heartbeat_store()
                if store.renew(self.lock_id, self.timeout_minutes):
                    self._confirmed = time.monotonic()
                else:
                    self._lost = "it was taken over by another operation or broken with --force"
                    return
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried next beat
                store = None
                if not self._recently_confirmed():
                    self._lost = f"it could not be renewed ({exc})"
                    return
