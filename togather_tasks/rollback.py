"""Rollback (SPEC section 7): traffic back to the previous deployment, or to one named by
version or id, with the same gate as a deploy: start its slot from its image (rebuilt from its
commit if the image is gone), health-gate it, switch, verify, record. Migrations are not rolled
back: the operator is shown the snapshot and the exact restore command. With --restore-db the
snapshot is restored first, inside the rollback's lock and after a confirmation asked before
anything changes, so the old version starts on the schema it was built for."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from . import dbops, images, slots, snapshots, source
from .errors import TogatherError
from .operation import SlotOperation
from .session import Session
from .state import State, other_slot, utc_now

STEPS = ("validate", "lock", "image", "start", "health", "switch", "record", "finish")
RESTORE_STEP = "restore"


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
        super().__init__(session, 1 if options.dry_run
                         else len(STEPS) + (1 if options.restore_db else 0))
        self.options = options
        self.state: State | None = None
        self.chosen: dict[str, Any] = {}
        self.snapshot: str | None = None
        self.safety_snapshot: str | None = None
        self.traffic_seconds: float | None = None

    def run(self) -> dict[str, Any]:
        with self.progress.step("validate", "state and target") as note:
            self.state = self.s.store.read().state
            self.chosen = choose_target(self.state, self.options.to)
            self.old_slot = self.state.active_slot or "blue"
            self.new_slot = other_slot(self.old_slot)
            self.snapshot = snapshots.snapshot_before_newer(self.state, self.chosen)
            note(f"{self.state.current['version']} -> {self.chosen['version']} "
                 f"(slot {self.new_slot})")
        if self.options.restore_db:
            self.check_restore_db()
        if self.options.dry_run:
            return self.chosen
        restore = (self.restore_database,) if self.options.restore_db else ()
        self.run_steps((self.acquire_lock, *restore, self.image, self.start, self.health,
                        self.switch, self.record, self.finish))
        self.after()
        return self.state.current

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
        return restore + [
            f"[{h}] start {self.new_slot} slot from {self.image_ref()} (rebuild from "
            f"{self.chosen['git_commit'][:7]} if the image is gone)" for h in self.settings.hosts
        ] + [f"[{h}] health-gate {self.new_slot}, switch nginx, verify"
             for h in self.settings.hosts]

    def image_ref(self) -> str:
        return self.chosen.get("image") or f"{self.settings.image}:{self.chosen['version']}"

    def target(self) -> slots.SlotTarget:
        return slots.SlotTarget(self.new_slot, self.image_ref(), self.chosen["version"])

    def acquire_lock(self) -> None:
        with self.progress.step("lock", "taking the environment lock") as note:
            self.take_lock(self.chosen["id"], lock_wait=self.options.lock_wait)
            fresh = self.s.store.read().state
            if fresh.current and self.state.current and \
                    fresh.current["id"] != self.state.current["id"]:
                raise RollbackError("the environment changed while taking the lock; retry")
            self.choose_slots(fresh.active_slot)
            note(self.lock["lock_id"])
        self.notify("started")

    def restore_database(self) -> None:
        """Step: the database back to the snapshot, under this rollback's lock, before the
        old version starts (it may not run on the newer schema)."""
        assert self.lease is not None
        with self.progress.step(RESTORE_STEP, f"database from {self.snapshot_name}") as note:
            self.safety_snapshot = dbops.restore(self.s, self.snapshot_name, lease=self.lease)
            note(f"restored; the data as it was is in {self.safety_snapshot}")

    def image(self) -> None:
        with self.progress.step("image", self.image_ref()) as note:
            build = images.Build(self.settings, self.chosen["git_commit"], utc_now())
            rebuilt = []
            for host in self.s.all_hosts:
                if images.image_present(host, self.image_ref(), self.chosen["git_commit"]):
                    continue
                self.s.console.warn(f"{self.image_ref()} is gone on {host.name}; rebuilding it "
                                    f"from commit {build.sha7}")
                source.refresh(self.settings.source_url)
                source.resolve_ref(self.settings.source_root, self.chosen["git_commit"])
                slots.prepare_host(self.settings, host, primary=host is self.s.primary)
                images.ensure_image(build, host)
                rebuilt.append(host.name)
            note("rebuilt on " + ", ".join(rebuilt) if rebuilt else "present")

    def switch(self) -> None:
        with self.progress.step("switch", f"nginx -> {self.new_slot}") as note:
            self.switch_to_new_slot()
            self.traffic_seconds = time.monotonic() - self.started
            note(f"traffic on {self.new_slot} ({self.chosen['version']}) after "
                 f"{self.traffic_seconds:.1f}s")

    def record(self) -> None:
        with self.progress.step("record", "deployment state") as note:
            limit = self.settings.deployment["history_limit"]
            self.state = self.s.store.update(lambda state: state.record_rollback(
                self.chosen, self.new_slot, "healthy", utc_now(), limit))
            note(f"{self.chosen['id']} is current again "
                 f"(rollback_count {self.state.current['rollback_count']})")

    def finish(self) -> None:
        with self.progress.step("finish", "drain and stop the rolled-back slot") as note:
            self.drain_and_stop_old_slot()
            note(f"app-{self.old_slot} stopped")

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
                     version=self.chosen["version"], result="succeeded", slot=self.new_slot)
        self.run_hook("post-rollback", "rolled_back")
        self.notify("rolled_back")

    def on_failure(self, step: str, message: str) -> None:
        where = "traffic was not switched: the current version keeps serving" \
            if not self.switched else f"traffic is on {self.new_slot}"
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
                "deployment_id": self.chosen.get("id"), "slot": self.new_slot,
                "status": status, "duration": self.elapsed()}

    def notify_fields(self) -> dict[str, object]:
        return {"deployment_id": self.chosen.get("id"), "version": self.chosen.get("version"),
                "git_commit": self.chosen.get("git_commit")}
