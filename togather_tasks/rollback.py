"""Rollback (SPEC section 7): traffic back to the previous deployment, or to one named by
version or id, with the same gate as a deploy: start its slot from its image (rebuilt from its
commit if the image is gone), health-gate it, switch, verify, record. Migrations are not rolled
back: the operator is shown the snapshot and the exact restore command. With --restore-db the
snapshot is restored first, inside the rollback's lock and after a confirmation asked before
anything changes, so the old version starts on the schema it was built for."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import certs, dbops, fleet, images, slots, snapshots, source
from .errors import TogatherError
from .hosts import Host
from .operation import Release, SlotOperation, Step
from .output import StepNote
from .session import Session
from .slots import Slots
from .state import State, other_slot, utc_now


class RollbackError(TogatherError):
    """No target to roll back to (exit 1)."""


@dataclass
class RollbackOptions:
    to: str | None = None
    dry_run: bool = False
    restore_db: bool = False
    yes: bool = False
    lock_wait: int = 0


def choose_target(state: State, to: str | None) -> dict[str, Any]:
    """The deployment to return to; a clear error listing what exists otherwise."""
    if not state.current:
        raise RollbackError("nothing to roll back: this environment has no deployment yet")
    if to:
        target = state.find(to)
        if target is None or target["id"] == state.current["id"]:
            available = [f"{e['version']} ({e['id']}, {e['status']})"
                         for e in state.rollback_candidates()]
            reason = "is the current deployment" if target else "is not in the history"
            raise RollbackError(
                f"{to!r} {reason}",
                hint=("Available: " + ", ".join(available)) if available
                else "There is no other deployment to roll back to.")
        return target
    if not state.previous:
        raise RollbackError("no previous deployment to roll back to",
                            hint="Use --to=VERSION to name one from `inv history`.")
    return state.previous


class Rollback(SlotOperation):
    operation = "rollback"

    def __init__(self, session: Session, options: RollbackOptions) -> None:
        self.options = options
        super().__init__(session, dry_run=options.dry_run)
        self.chosen: dict[str, Any] = {}
        self.snapshot: str | None = None
        self.safety_snapshot: str | None = None
        self.traffic_seconds: float | None = None
        self._published: images.Published | None = None
        self._publish_lock = threading.Lock()

    def run(self) -> dict[str, Any]:
        self.run_steps(self.runbook[:1])
        if self.options.restore_db:
            self.check_restore_db()
        if self.options.dry_run:
            return self.chosen
        self.run_steps(self.runbook[1:])
        self.after()
        return self.state.current

    def validate(self, note: StepNote) -> None:
        """Step: the target and the slot it goes to; nothing changes."""
        self.state = self.s.store.read().state
        self.chosen = choose_target(self.state, self.options.to)
        old = self.state.active_slot or "blue"
        self.slots = Slots(other_slot(old), old)
        self.release = Release(self.chosen["git_commit"], self.image_ref())
        self.snapshot = snapshots.snapshot_before_newer(self.state, self.chosen)
        note(f"{self.state.current['version']} -> {self.chosen['version']} "
             f"(slot {self.slots.new})")

    @property
    def snapshot_name(self) -> str:
        return os.path.basename(self.snapshot or "")

    def check_restore_db(self) -> None:
        """Before any change: there is a snapshot to restore, and the operator said yes."""
        if not self.snapshot:
            raise RollbackError(
                f"--restore-db: no snapshot was taken after {self.chosen['version']} "
                "(no later deployment ran migrations)",
                hint="Roll back without --restore-db; the schema is the one it was built for.")
        if not self.options.dry_run:
            dbops.confirm_restore(self.settings.env, self.snapshot_name, self.options.yes)

    def plan(self) -> list[str]:
        restore = [f"[{self.settings.primary_host}] restore the database from "
                   f"{self.snapshot} (after a safety snapshot)"] \
            if self.options.restore_db else []
        when = "every host is" if len(self.settings.hosts) > 1 else "it is"
        return restore + [
            f"[{h}] start {self.slots.new} slot from {self.image_ref()} (rebuild from "
            f"{self.chosen['git_commit'][:7]} if the image is gone)" for h in self.settings.hosts
        ] + [f"[{h}] health-gate {self.slots.new}; when {when} healthy, rename the slot marker "
             f"to {self.slots.new} (no reload), verify through the proxy"
             for h in self.settings.hosts]

    def image_ref(self) -> str:
        return self.chosen.get("image") or f"{self.settings.image}:{self.chosen['version']}"

    def acquire_lock(self, note: StepNote) -> None:
        self.take_lock(self.chosen["id"], lock_wait=self.options.lock_wait)
        fresh = self.s.store.read().state
        if fresh.current and self.state.current and \
                fresh.current["id"] != self.state.current["id"]:
            raise RollbackError("the environment changed while taking the lock; retry")
        self.state = fresh
        self.settle_slots(fresh)
        note(self.lock["lock_id"])
        self.notify("started")

    def restore_database(self, note: StepNote) -> None:
        """Step: the database back to the snapshot, under this rollback's lock, before the
        old version starts (it may not run on the newer schema)."""
        assert self.lease is not None
        self.safety_snapshot = dbops.restore(self.s, self.snapshot_name, lease=self.lease)
        note(f"restored; the data as it was is in {self.safety_snapshot}")

    def image(self, note: StepNote) -> None:
        """Step: the target's image on every host at once, rebuilt from its commit where it
        is gone."""
        build = images.Build(self.settings, self.chosen["git_commit"], utc_now())
        outcomes = self.on_hosts("image", lambda host: self.rebuild_if_gone(build, host))
        rebuilt = [name for name, outcome in outcomes.items() if outcome.value]
        note(("rebuilt on " + ", ".join(rebuilt) if rebuilt else "present")
             + f" ({fleet.summary(outcomes)})")

    def rebuild_if_gone(self, build: images.Build, host: Host) -> bool:
        if images.image_present(host, self.image_ref(), self.chosen["git_commit"]):
            return False
        self.s.console.warn(f"{self.image_ref()} is gone on {host.name}; rebuilding it "
                            f"from commit {build.sha7}")
        slots.prepare_host(self.settings, host, primary=host.name == self.settings.primary_host)
        images.ensure_on_host(build, host, self.published(build))
        return True

    def published(self, build: images.Build) -> images.Published:
        """The rebuild's image published once for all hosts (the registry strategy: from this
        machine), whichever host finds it gone first; the source refreshed before that."""
        with self._publish_lock:
            if self._published is None:
                source.refresh(self.settings.source_url)
                source.resolve_ref(self.settings.source_root, self.chosen["git_commit"])
                self._published = images.Published(build.image)
                if self.settings.build["strategy"] == "registry":
                    self._published = images.publish_from(build, self.s.local, on_host=False)
            return self._published

    def switch(self, note: StepNote) -> None:
        outcomes = self.switch_traffic()
        self.traffic_seconds = time.monotonic() - self.started
        note(f"traffic on {self.slots.new} ({self.chosen['version']}) after "
             f"{self.traffic_seconds:.1f}s ({fleet.summary(outcomes)})")

    def record(self, note: StepNote) -> None:
        limit = self.settings.deployment["history_limit"]
        self.state = self.s.store.update(lambda state: state.record_rollback(
            self.chosen, self.slots.new, "healthy", utc_now(), limit))
        note(f"{self.chosen['id']} is current again "
             f"(rollback_count {self.state.current['rollback_count']})")

    def finish(self, note: StepNote) -> None:
        """Step: the rolled-back slot drained and stopped; meanwhile, as after a deploy, the
        certificate renewal service removed where proxy.tls.acme is gone (the switch has just
        written the site without it)."""
        self.drain_and_stop_old_slot(
            meanwhile=lambda host: certs.retire_after_switch(self.s, host))
        note(f"app-{self.slots.old} stopped")

    def after(self) -> None:
        console = self.s.console
        console.print(f"rolled back {self.settings.env} to {self.chosen['version']} "
                      f"({self.chosen['id']}) in {time.monotonic() - self.started:.1f}s")
        if self.safety_snapshot:
            console.print(f"  database restored from {self.snapshot}; the data as it was is in "
                          f"{self.safety_snapshot}")
        elif self.snapshot:
            console.warn("database migrations are NOT rolled back.")
            console.print(f"  snapshot taken before the migrations newer than "
                          f"{self.chosen['version']}: {self.snapshot}")
            console.print(f"  to restore it: inv db.restore --env={self.settings.env} "
                          f"--snapshot={self.snapshot_name}")
        else:
            # Deploys snapshot exactly when they migrate: none since means nothing to undo.
            console.print(f"  no deployment since {self.chosen['version']} migrated the "
                          "database: its schema is the one this version ran on")
        self.s.audit(operation="rollback", deployment_id=self.chosen["id"],
                     version=self.chosen["version"], result="succeeded", slot=self.slots.new)
        self.run_hook("post-rollback", "rolled_back")
        self.notify("rolled_back")

    def on_failure(self, step: str, message: str) -> None:
        where = "traffic was not switched: the current version keeps serving" \
            if not self.switched else f"traffic is on {self.slots.new}"
        self.s.console.note(f"rollback failed ({step}); {where}.")
        for line in self.failure_advice(step):
            self.s.console.note(line)
        self.s.audit(operation="rollback", deployment_id=self.chosen.get("id"),
                     version=self.chosen.get("version"), result="failed", step=step)

    def failure_advice(self, step: str) -> list[str]:
        """What the database has to do with it: a restore that happened, or (when the old
        version failed its health gate) the snapshot that would give it its schema back."""
        env = self.settings.env
        if self.safety_snapshot:
            return [f"the database WAS restored from {self.snapshot}; the data as it was is in "
                    f"{self.safety_snapshot} (inv db.restore --env={env} "
                    f"--snapshot={os.path.basename(self.safety_snapshot)})"]
        if step != "health" or not self.snapshot:
            return []
        return [f"{self.chosen['version']} may not run on the schema migrated by later "
                f"deployments; the snapshot taken before those migrations is {self.snapshot}",
                f"to restore it and roll back in one go: inv rollback --env={env}"
                + (f" --to={self.options.to}" if self.options.to else "") + " --restore-db"]

    def hook_values(self, status: str) -> dict[str, object]:
        return {"operation": "rollback", "environment": self.settings.env,
                "version": self.chosen.get("version"),
                "git_commit": self.chosen.get("git_commit"),
                "deployment_id": self.chosen.get("id"),
                "slot": self.slots.new if self.slots else None,
                "status": status, "duration": self.elapsed()}

    def notify_fields(self) -> dict[str, object]:
        return {"deployment_id": self.chosen.get("id"), "version": self.chosen.get("version"),
                "git_commit": self.chosen.get("git_commit")}


Rollback.steps = (
    Step("validate", "state and target", Rollback.validate),
    Step("lock", "taking the environment lock", Rollback.acquire_lock),
    Step("restore_database", "database from the snapshot", Rollback.restore_database,
         destructive=True, when=lambda rollback: rollback.options.restore_db, label="restore"),
    Step("image", "image on every host", Rollback.image),
    Step("start", "starting the target's slot", Rollback.start, undo=Rollback.stop_new_slot),
    Step("health", "health gate on the target's slot", Rollback.health),
    Step("switch", "nginx -> the target's slot", Rollback.switch, undo=Rollback.switch_back,
         destructive=True, commit=True),
    Step("record", "deployment state", Rollback.record, destructive=True),
    Step("finish", "drain and stop the rolled-back slot", Rollback.finish),
)
