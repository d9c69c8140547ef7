"""What deploy and rollback share: the runner of a runbook (one table of `Step`s per operation:
names, order, progress total and pause-hook names all come from it), the lock around it, moving
traffic to a new slot on every host (start, health gate, switch all or none, stop the old one),
each step's undo per host, hooks and notifications.

A fleet's steps run on all hosts at once (fleet.py). Undo is per step and per host: a step's
results say what it did on each host (`results[step]`), and its undo reverses exactly that, in
reverse order of the steps, after asking each host what its proxy routes to.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import fleet, hooks, monitoring, notify, proxy, slots
from .errors import Interrupted, LockLostError, TogatherError
from .hosts import Host
from .lease import Lease
from .lock import describe
from .output import Progress, StepNote
from .session import Session
from .signals import shielded
from .slots import Slots, SlotTarget
from .state import State, utc_now

PAUSE_ENV = "TOGATHER_TEST_PAUSE_BEFORE"
PAUSE_FILE_ENV = "TOGATHER_TEST_PAUSE_FILE"
PAUSE_SECONDS = 120


def pause_if_requested(step: str) -> None:
    """Test hook for fault tests: with TOGATHER_TEST_PAUSE_BEFORE=<step>, announce and wait
    before that step so a test can kill the process or cut its connection at a known point
    (`switch@<host>`: before that host's own switch, the other hosts switching meanwhile).
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


@dataclass(frozen=True)
class Release:
    """The version an operation puts into the new slot."""

    commit: str
    image: str

    @property
    def sha7(self) -> str:
        return self.commit[:7]


@dataclass(frozen=True)
class Step:
    """One row of a runbook. `name` is the pause-hook name (TOGATHER_TEST_PAUSE_BEFORE) and the
    one the lock check names; `label` the progress line's (default `name`). `undo` is armed
    before `run` starts, so a step cut half-way is undone too. A `destructive` step runs only
    while the lock is provably ours. After a `commit` step the operation has happened: later
    failures are reported, never undone. `when` leaves an optional step out of the runbook."""

    name: str
    title: str
    run: Callable[[Any, StepNote], None]
    undo: Callable[[Any], None] | None = None
    destructive: bool = False
    commit: bool = False
    when: Callable[[Any], bool] | None = None
    label: str = ""


class SlotOperation:
    """Base of Deploy and Rollback: subclasses give their runbook (`steps`) and say what a
    failure records (`on_failure`) and what hooks and webhooks see."""

    operation = "operation"
    steps: tuple[Step, ...] = ()

    def __init__(self, session: Session, *, dry_run: bool) -> None:
        self.s = session
        self.settings = session.settings
        self.runbook = tuple(step for step in self.steps if step.when is None or step.when(self))
        self.progress = Progress(session.console, session.log,
                                 1 if dry_run else len(self.runbook))
        self.started = time.monotonic()
        self.lease: Lease | None = None
        self.state: State | None = None
        self.release: Release | None = None
        self.slots: Slots | None = None
        self.results: dict[str, fleet.Outcomes] = {}
        self._undo: list[Step] = []
        self.upcoming = "lock"

    # --- for subclasses -------------------------------------------------------------------

    def on_failure(self, step: str, message: str) -> None:
        """Record and report a failure (what the steps did is already undone)."""
        raise NotImplementedError

    def hook_values(self, status: str) -> dict[str, object]:
        raise NotImplementedError

    def notify_fields(self) -> dict[str, object]:
        raise NotImplementedError

    # --- the runner -----------------------------------------------------------------------

    def run_steps(self, steps: Sequence[Step]) -> None:
        """Each step in order; on any failure (Ctrl-C, SIGTERM and unexpected exceptions
        included) undo what the steps did, record it, and always release the lock, shielded
        from a second signal."""
        try:
            for step in steps:
                self.upcoming = step.name
                pause_if_requested(step.name)
                if self.lease and step.destructive:
                    self.lease.check(step.name)
                if step.undo:
                    self._undo.append(step)
                with self.progress.step(step.label or step.name, step.title) as note:
                    step.run(self, note)
                if step.commit:
                    self._undo.clear()
        except BaseException as exc:  # an unexpected error needs the undo more than any other
            with shielded():
                self.fail(exc)
            raise
        finally:
            with shielded():
                self.release_lock()

    def fail(self, exc: BaseException) -> None:
        if self.lock is None:
            return  # failed while taking the lock: nothing was changed, the error says it all
        step = self.progress.current or f"before {self.upcoming}"
        if self.confirm_ownership():  # always asked: on_failure records only if owned
            self.unwind()
        message = self.failure_message(exc)
        self.on_failure(step, message)
        self.run_hook("on-failure", "failed", failed_step=step, error=message)
        self.notify("failed", step=step, message=message)

    def unwind(self) -> None:
        """The armed undos, newest first: a switch is undone on every host before the new
        slot may be stopped anywhere."""
        for step in reversed(self._undo):
            assert step.undo is not None
            try:
                step.undo(self)
            except (TogatherError, OSError) as exc:
                self.s.console.warn(f"could not undo {step.name}: {exc}")
        self._undo.clear()

    def on_hosts(self, step: str, action: Callable[[Host], Any], *,
                 hosts: Sequence[Host] | None = None,
                 cancelled: threading.Event | None = None) -> fleet.Outcomes:
        """`action` on every host (or `hosts`) at once (bounded by deployment.parallel); its
        outcomes join `results[step]`, also when it fails, so the step's undo knows where it
        ran (a rolling deploy calls it once per wave). The first host's failure is raised,
        every host's line shown first."""
        outcomes: fleet.Outcomes = {}
        targets = hosts or self.s.all_hosts
        size = len(self.s.all_hosts)
        try:
            fleet.on_each(targets, action, into=outcomes, cancelled=cancelled,
                          parallel=self.settings.deployment["parallel"])
        except TogatherError as exc:  # one host runs inline: its error comes as it is
            if size > 1:
                fleet.name_host(exc, targets[0].name)
            raise
        finally:
            self.results.setdefault(step, {}).update(outcomes)
        if fleet.first_failure(outcomes) is not None:
            for outcome in outcomes.values():
                self.s.console.note(f"  {outcome.line()}"
                                    + (f": {outcome.error}" if outcome.error else ""))
        fleet.raise_first_failure(outcomes, fleet_size=size)
        return outcomes

    # --- shared steps ---------------------------------------------------------------------

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

    def settle_slots(self, state: State) -> None:
        """Under the lock: choose the slots from what every host's proxy routes to (see
        slots.choose_slots), and first bring hosts that disagree back to one slot."""
        routes = self.on_hosts("routes", lambda host: proxy.routed_slot(self.settings, host))
        choice = slots.choose_slots(state.active_slot,
                                    {name: o.value for name, o in routes.items()})
        if choice.warning:
            self.s.console.warn(choice.warning)
        if choice.repair:
            assert self.lease is not None and choice.slots.old is not None
            self.lease.check("switch")
            version = self.version_in(state, choice.slots.old)
            for name in choice.repair:
                proxy.switch(self.settings, self.s.host(name), choice.slots.old, version)
        self.slots = choice.slots

    @staticmethod
    def version_in(state: State | None, slot: str | None) -> str | None:
        """The version the state file says `slot` runs (None when it does not know)."""
        current = state.current if state else None
        return current["version"] if current and current["active_slot"] == slot else None

    def target(self) -> SlotTarget:
        assert self.release is not None and self.slots is not None
        return SlotTarget(self.slots.new, self.release.image, self.release.sha7)

    def start(self, note: StepNote) -> None:
        """Step: the new slot runs its image on every host."""
        target = self.target()
        outcomes = self.on_hosts("start", lambda host: slots.start_slot(self.settings, host,
                                                                         target))
        note(f"app-{target.slot} running {target.image} ({fleet.summary(outcomes)})")

    def stop_new_slot(self) -> None:
        """Undo `start` where it ran, except on a host whose proxy routes to the new slot (a
        switch cut before its restore, a switch back that failed): stopping it there would be
        an outage. Asks each host, since only the host knows what its proxy serves."""
        assert self.slots is not None
        started = [self.s.host(name) for name, o in self.results.get("start", {}).items()
                   if o.ran]
        if started:
            fleet.on_each(started, lambda host: self.stop_unless_routed(host, self.slots.new),
                          into={}, fail_fast=False, parallel=self.settings.deployment["parallel"])

    def stop_unless_routed(self, host: Host, slot: str) -> None:
        what = f"the new {slot} slot"
        try:
            routed = proxy.routed_slot(self.settings, host)
        except (TogatherError, OSError) as exc:
            self.s.console.warn(f"left {what} running on {host.name}: cannot tell which "
                                f"slot its proxy routes to ({exc})")
            return
        if routed == slot:
            self.s.console.warn(f"left {what} running on {host.name}: its proxy routes "
                                "traffic to it")
            return
        self.stop_on(host, slot, what)

    def health(self, note: StepNote) -> None:
        """Step: the new slot is healthy and runs the expected version on every host."""
        target = self.target()
        outcomes = self.gate("health", target)
        verdict = next(iter(outcomes.values())).value
        note(f"{target.slot} is {verdict.status}, version {verdict.version} "
             f"({fleet.summary(outcomes)})")

    def gate(self, step: str, target: SlotTarget, hosts: Sequence[Host] | None = None, *,
             through_proxy: bool = False) -> fleet.Outcomes:
        """The health gate of the new slot on every host (or `hosts`), on its own port or
        `through_proxy`; the first host that fails cancels the others' gates (the answer is
        already no)."""
        cancelled = threading.Event()
        where = proxy.address(self.settings) if through_proxy else None
        return self.on_hosts(step, lambda host: slots.health_gate(
            self.settings, host, target, self.s.console, cancelled, proxy_address=where),
            hosts=hosts, cancelled=cancelled)

    @property
    def gate_failed(self) -> bool:
        """A health gate failed on some host (of the health step, or of a wave)."""
        return any(outcome.error is not None for step in ("health", "proxy health")
                   for outcome in self.results.get(step, {}).values())

    @property
    def rolling_batch(self) -> int | None:
        """deployment.rolling's batch: hosts per wave; None when all hosts switch at once."""
        rolling = self.settings.deployment.get("rolling")
        return rolling["batch"] if rolling else None

    def roll_out(self) -> list[str]:
        """Start, health gate and switch wave by wave (deployment.rolling), in the
        environment's host order: a wave's hosts switch together, then their proxies must
        answer healthy with the new version before the next wave starts. Any failure leaves
        the undo (`undo_waves`) to switch back every wave already switched, verified, before
        any slot is stopped. Returns one line per wave."""
        target = self.target()
        planned = fleet.waves(self.s.all_hosts, self.rolling_batch)
        lines = []
        for number, wave in enumerate(planned, 1):
            started = time.monotonic()
            self.on_hosts("start", lambda host: slots.start_slot(self.settings, host, target),
                          hosts=wave)
            self.gate("health", target, wave)
            assert self.lease is not None
            self.lease.check("switch")
            self.switch_traffic(wave)
            outcomes = self.gate("proxy health", target, wave, through_proxy=True)
            lines.append(f"wave {number}/{len(planned)} on {target.slot} "
                         f"{time.monotonic() - started:.1f}s ({fleet.summary(outcomes)})")
            self.s.console.note(f"  {lines[-1]}")
        return lines

    def undo_waves(self) -> None:
        """Undo `roll_out`: the switched hosts back first (verified), then the new slot
        stopped where it started and no proxy routes to it."""
        self.switch_back()
        self.stop_new_slot()

    def switch_traffic(self, hosts: Sequence[Host] | None = None) -> fleet.Outcomes:
        """Every host's (or `hosts`') proxy to the new slot, all at once (milliseconds
        each): all or none. A host whose switch fails restores its own slot marker
        (proxy.switch); those that did switch are switched back by this step's undo before
        anything is stopped."""
        target = self.target()

        def switch_one(host: Host) -> proxy.Switched:
            pause_if_requested(f"switch@{host.name}")
            return proxy.switch(self.settings, host, target.slot, target.sha7)

        outcomes = self.on_hosts("switch", switch_one, hosts=hosts)
        for name, outcome in outcomes.items():
            for note in outcome.value.notes():
                self.s.console.warn(f"{name}: {note}")
        return outcomes

    def switch_back(self) -> None:
        """Undo `switch` on every host where it succeeded, each verified through its proxy."""
        assert self.slots is not None
        switched = {name: o.value for name, o in self.results.get("switch", {}).items() if o.ok}
        if not switched:
            return
        version = self.version_in(self.state, self.slots.old)
        outcomes = fleet.on_each(
            [self.s.host(name) for name in switched],
            lambda host: proxy.switch_back(self.settings, host, switched[host.name].previous,
                                           version),
            into={}, fail_fast=False, parallel=self.settings.deployment["parallel"])
        for name, outcome in outcomes.items():
            if outcome.ok:
                self.s.console.note(f"{name}: switched back to the {self.slots.old} slot")
            else:
                self.s.console.warn(f"{name}: could not switch back ({outcome.error}); its "
                                    f"proxy keeps the {self.slots.new} slot, which stays up")

    def drain_and_stop_old_slot(self, meanwhile: Callable[[Host], None] | None = None
                                ) -> None:
        """On every host at once: `meanwhile` (cleanup that is safe while the old slot still
        drains its requests), then the rest of the drain, then stop the old slot. A host's
        drain counts from its own switch (the record step, a rolling deploy's later waves and
        the cleanup all take place within it), so the cleanup adds no time unless it outlasts
        the drain. On the first deploy there is no old slot: only `meanwhile`."""
        assert self.slots is not None
        old = self.slots.old
        drain = self.settings.deployment["drain_seconds"]
        now = time.monotonic()
        switched = self.results.get("switch", {})
        cancelled = threading.Event()  # set by fleet.on_each on Ctrl-C or SIGTERM

        def finish_on(host: Host) -> None:
            if meanwhile is not None:
                meanwhile(host)
            outcome = switched.get(host.name)
            drained = (outcome.finished if outcome and outcome.ok else now) + drain
            if old is None or cancelled.wait(max(0.0, drained - time.monotonic())):
                return
            self.stop_on(host, old, f"the old {old} slot")

        fleet.on_each(self.s.all_hosts, finish_on, into=self.results.setdefault("finish", {}),
                      cancelled=cancelled, fail_fast=False,
                      parallel=self.settings.deployment["parallel"])

    def stop_on(self, host: Host, slot: str, what: str) -> None:
        """Stopping is cleanup: a failure is reported, never raised."""
        try:
            slots.stop_slot(self.settings, host, slot)
        except (TogatherError, OSError) as exc:
            self.s.console.warn(f"could not stop {what} on {host.name}: {exc}")

    @property
    def switched(self) -> bool:
        """Traffic is on the new slot everywhere (the switch, or the last wave, is done)."""
        return any(name in self.progress.completed for name in ("switch", "waves"))

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

    def release_lock(self) -> None:
        if self.lease:
            self.lease.release()

    def failure_message(self, exc: BaseException) -> str:
        """Made once, redacted once: it goes to the state file, the hook and the webhook."""
        message = exc.signame if isinstance(exc, Interrupted) else \
            getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if not isinstance(exc, (TogatherError, Interrupted)):
            message = f"internal error: {type(exc).__name__}: {message}"
        return self.s.redact(message)

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
                          slot=self.slots.new if self.slots else "", by=self.s.operator.email,
                          duration_seconds=self.elapsed(), **self.notify_fields(), **fields)
        except Exception as exc:  # noqa: BLE001 - a notification never fails an operation
            self.s.console.warn(f"webhook notification '{event}' failed ({type(exc).__name__})"
                                "; the operation is not affected")
        monitoring.record(self.s, event, operation=self.operation, by=self.s.operator.email,
                          duration_seconds=self.elapsed(), **self.notify_fields(), **fields)
