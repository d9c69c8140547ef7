"""What deploy and rollback share: the lock around them, the choice of slots, moving traffic
to a slot on every host (start, health gate, switch, stop the old one), the run of the steps
with its cleanup on every exit path, hooks and notifications."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import hooks, monitoring, notify, slots
from .errors import Interrupted, LockLostError, TogatherError
from .health import Verdict
from .hosts import Host
from .lease import Lease
from .lock import describe
from .output import Progress
from .session import Session
from .signals import shielded
from .state import other_slot, utc_now

PAUSE_ENV = "TOGATHER_TEST_PAUSE_BEFORE"
PAUSE_FILE_ENV = "TOGATHER_TEST_PAUSE_FILE"
PAUSE_SECONDS = 120
# Steps after which the world has changed: each runs only while the lock is provably ours.
DESTRUCTIVE_STEPS = frozenset({"migrate", "switch", "record", "restore_database"})


def pause_if_requested(step: str) -> None:
    """Test hook for fault tests: with TOGATHER_TEST_PAUSE_BEFORE=<step>, announce and wait
    before that step so a test can kill the process or cut its connection at a known point.
    The wait ends when the file named by TOGATHER_TEST_PAUSE_FILE disappears (if set), and
    after PAUSE_SECONDS at most."""
    if os.environ.get(PAUSE_ENV) != step:
        return
    print(f"togather: paused before {step} (pid {os.getpid()})", flush=True)
    marker = os.environ.get(PAUSE_FILE_ENV)
    deadline = time.monotonic() + PAUSE_SECONDS
    while time.monotonic() < deadline:
        if marker and not os.path.exists(marker):
            return
        time.sleep(0.1)


class SlotOperation:
    """Base of Deploy and Rollback: subclasses name their steps and say what goes into the
    new slot (`target`), what a failure records (`on_failure`) and what hooks see."""

    operation = "operation"

    def __init__(self, session: Session, total_steps: int) -> None:
        self.s = session
        self.settings = session.settings
        self.progress = Progress(session.console, session.log, total_steps)
        self.started = time.monotonic()
        self.lease: Lease | None = None
        self.new_slot = ""
        self.old_slot: str | None = None
        self.new_slot_started = False
        self.switched = False
        self.upcoming = "lock"

    # --- for subclasses -------------------------------------------------------------------

    def target(self) -> slots.SlotTarget:
        raise NotImplementedError

    def on_failure(self, step: str, message: str) -> None:
        """Record and report a failure (the new slot is already stopped)."""
        raise NotImplementedError

    def hook_values(self, status: str) -> dict[str, object]:
        raise NotImplementedError

    def notify_fields(self) -> dict[str, object]:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------

    def elapsed(self) -> int:
        return int(time.monotonic() - self.started)

    @property
    def lock(self) -> dict[str, Any] | None:
        return self.lease.lock if self.lease else None

    def take_lock(self, deployment_id: str, *, force: bool = False,
                  lock_wait: float = 0) -> None:
        lease = Lease(self.s, deployment_id=deployment_id, operation=self.operation,
                      force=force, lock_wait=lock_wait)
        lease.acquire()
        self.lease = lease
        decision = lease.decision
        assert decision is not None
        if decision.replaced:
            self.s.console.warn(f"took over the lock of {describe(decision.replaced, utc_now())}"
                                f": {decision.reason}")

    def choose_slots(self, active_in_state: str | None) -> None:
        """The new slot is the idle one: checked against what the proxy really serves, since
        the state file lags behind after a crash between the switch and the record step (and
        starting the slot that serves would be an outage)."""
        self.old_slot = active_in_state
        serving = slots.serving_slot(self.settings, self.s.primary)
        if serving and serving != self.old_slot:
            self.s.console.warn(f"the proxy serves the {serving} slot but the state file says "
                                f"{self.old_slot or 'none'} (an earlier run was interrupted); "
                                f"using the other slot")
            self.old_slot = serving
        self.new_slot = other_slot(self.old_slot) if self.old_slot else "blue"

    def run_steps(self, steps: Sequence[Callable[[], None]]) -> None:
        """Each step in order (the first takes the lock); on any failure (Ctrl-C, SIGTERM and
        unexpected exceptions included) undo what moves traffic, record it, and always release
        the lock, shielded from a second signal."""
        try:
            for step in steps:
                self.upcoming = step.__name__
                pause_if_requested(step.__name__)
                if self.lease and step.__name__ in DESTRUCTIVE_STEPS:
                    self.lease.check(step.__name__)
                step()
        except BaseException as exc:  # an unexpected error needs the undo more than any other
            with shielded():
                self.fail(exc)
            raise
        finally:
            with shielded():
                self.release_lock()

    def release_lock(self) -> None:
        if self.lease:
            self.lease.release()

    def start(self) -> None:
        """Step: the new slot runs its image on every host."""
        target = self.target()
        with self.progress.step("start", f"starting the {target.slot} slot") as note:
            for host in self.s.all_hosts:
                self.new_slot_started = True
                slots.start_slot(self.settings, host, target)
            note(f"app-{target.slot} running {target.image}")

    def health(self) -> None:
        """Step: the new slot is healthy and runs the expected version on every host."""
        target = self.target()
        with self.progress.step("health", f"health gate on {target.slot}") as note:
            verdict: Verdict | None = None
            for host in self.s.all_hosts:
                verdict = slots.health_gate(self.settings, host, target, self.s.console)
            assert verdict is not None
            note(f"{target.slot} is {verdict.status}, version {verdict.version}")

    def switch_to_new_slot(self) -> None:
        for host in self.s.all_hosts:
            how = slots.switch_traffic(self.settings, host, self.target())
            if how.startswith("recreated"):
                self.s.console.warn(f"{host.name}: the nginx proxy was {how} to apply its "
                                    "configuration: connections were refused for about a "
                                    "second")
        self.switched = True

    def drain_and_stop_old_slot(self) -> None:
        time.sleep(self.settings.deployment["drain_seconds"])
        self.stop_everywhere(self.old_slot, f"the old {self.old_slot} slot")

    def stop_everywhere(self, slot: str | None, what: str) -> None:
        if not slot:
            return
        for host in self.s.all_hosts:
            self.stop_on(host, slot, what)

    def stop_on(self, host: Host, slot: str, what: str) -> None:
        """Stopping is cleanup: a failure is reported, never raised."""
        try:
            slots.stop_slot(self.settings, host, slot)
        except (TogatherError, OSError) as exc:
            self.s.console.warn(f"could not stop {what} on {host.name}: {exc}")

    @property
    def owns_environment(self) -> bool:
        """False once the lock is known to be lost: another operation may own the slots and
        the state now, so the failure path must change nothing."""
        return self.lease is not None and self.lease.lost is None

    def confirm_ownership(self) -> bool:
        """Ask the host before the failure path undoes anything (the heartbeat may not have
        noticed yet that the lock was broken)."""
        if self.lease is None:
            return False
        try:
            self.lease.check("undoing this run")
        except LockLostError as exc:
            self.s.console.warn(f"{exc.message}: leaving the slots and the state as they are")
            return False
        return True

    def fail(self, exc: BaseException) -> None:
        if self.lock is None:
            return  # failed while taking the lock: nothing was changed, the error says it all
        step = self.progress.current or f"before {self.upcoming}"
        owned = self.confirm_ownership()  # always asked: on_failure records only if owned
        if self.new_slot_started and owned:
            self.stop_new_slot()
        message = self.failure_message(exc)
        self.on_failure(step, message)
        self.run_hook("on-failure", "failed", failed_step=step, error=message)
        self.notify("failed", step=step, message=message)

    def failure_message(self, exc: BaseException) -> str:
        """Made once, redacted once: it goes to the state file, the hook and the webhook."""
        message = exc.signame if isinstance(exc, Interrupted) else \
            getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if not isinstance(exc, (TogatherError, Interrupted)):
            message = f"internal error: {type(exc).__name__}: {message}"
        return self.s.redact(message)

    def stop_new_slot(self) -> None:
        """Undo `start`, except on a host whose proxy routes to the new slot (a switch cut
        before its restore): stopping it there would be an outage. Asks each host, since
        only the host knows what its proxy serves."""
        what = f"the new {self.new_slot} slot"
        for host in self.s.all_hosts:
            try:
                routed = slots.routed_slot(self.settings, host)
            except (TogatherError, OSError) as exc:
                self.s.console.warn(f"left {what} running on {host.name}: cannot tell which "
                                    f"slot its proxy routes to ({exc})")
                continue
            if routed == self.new_slot:
                self.s.console.warn(f"left {what} running on {host.name}: its proxy routes "
                                    "traffic to it")
                continue
            self.stop_on(host, self.new_slot, what)

    def run_hook(self, name: str, status: str, *, blocking: bool = False,
                 **extra: object) -> None:
        """A blocking hook's refusal stops the operation; any other hook, whatever goes wrong
        with it, never turns the operation's outcome around."""
        values = {**self.hook_values(status), **extra}
        if blocking:
            hooks.run_hook(self.settings.root, name, values, self.s.console, blocking=True)
            return
        try:
            hooks.run_hook(self.settings.root, name, values, self.s.console)
        except Exception as exc:  # noqa: BLE001 - a hook is the operator's code, not ours
            self.s.console.warn(f"hook {name} could not run ({type(exc).__name__}: {exc}); "
                                "the operation itself is not affected")

    def notify(self, event: str, **fields: object) -> None:
        try:
            notify.notify(self.settings, self.s.console, self.s.redact, event,
                          slot=self.new_slot, by=self.s.operator.email,
                          duration_seconds=self.elapsed(), **self.notify_fields(), **fields)
        except Exception as exc:  # noqa: BLE001 - a notification never fails an operation
            self.s.console.warn(f"webhook notification '{event}' failed ({type(exc).__name__})"
                                "; the operation is not affected")
        monitoring.record(self.s, event, operation=self.operation, by=self.s.operator.email,
                          duration_seconds=self.elapsed(), **self.notify_fields(), **fields)
