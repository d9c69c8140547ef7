"""Rollback (SPEC section 7): traffic back to the previous deployment, or to one named by
version or id, with the same gate as a deploy: start its slot from its image (rebuilt from its
commit if the image is gone), health-gate it, switch, verify, record. Migrations are not rolled
back: the operator is shown the snapshot and the exact restore command."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from . import images, slots, source
from .errors import TogatherError
from .operation import SlotOperation
from .session import Session
from .state import State, other_slot, utc_now

STEPS = ("validate", "lock", "image", "start", "health", "switch", "record", "finish")


class RollbackError(TogatherError):
    """No target to roll back to (exit 1)."""


@dataclass
class RollbackOptions:
    to: str | None = None
    dry_run: bool = False
    restore_db: bool = False


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
        super().__init__(session, 1 if options.dry_run else len(STEPS))
        self.options = options
        self.state: State | None = None
        self.chosen: dict[str, Any] = {}
        self.traffic_seconds: float | None = None

    def run(self) -> dict[str, Any]:
        with self.progress.step("validate", "state and target") as note:
            self.state = self.s.store.read().state
            self.chosen = choose_target(self.state, self.options.to)
            self.old_slot = self.state.active_slot or "blue"
            self.new_slot = other_slot(self.old_slot)
            note(f"{self.state.current['version']} -> {self.chosen['version']} "
                 f"(slot {self.new_slot})")
        if self.options.dry_run:
            return self.chosen
        self.run_steps((self.acquire_lock, self.image, self.start, self.health, self.switch,
                        self.record, self.finish))
        self.after()
        return self.state.current

    def plan(self) -> list[str]:
        return [
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
            self.take_lock(self.chosen["id"])
            fresh = self.s.store.read().state
            if fresh.current and self.state.current and \
                    fresh.current["id"] != self.state.current["id"]:
                raise RollbackError("the environment changed while taking the lock; retry")
            self.choose_slots(fresh.active_slot)
            note(self.lock["lock_id"])
        self.notify("started")

    def image(self) -> None:
        with self.progress.step("image", self.image_ref()) as note:
            build = images.Build(self.settings, self.chosen["git_commit"], utc_now())
            rebuilt = []
            for host in self.s.all_hosts:
                if images.image_present(host, self.image_ref(), self.chosen["git_commit"]):
                    continue
                self.s.console.warn(f"{self.image_ref()} is gone on {host.name}; rebuilding it "
                                    f"from commit {build.sha7}")
                source.resolve_ref(self.settings.root, self.chosen["git_commit"])
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
        rolled_back = self.state.previous or {}
        console = self.s.console
        console.print(f"rolled back {self.settings.env} to {self.chosen['version']} "
                      f"({self.chosen['id']}) in {time.monotonic() - self.started:.1f}s")
        console.warn("database migrations are NOT rolled back.")
        snapshot = rolled_back.get("snapshot")
        if snapshot:
            name = os.path.basename(snapshot)
            console.print(f"  snapshot taken before {rolled_back.get('version')} migrated: "
                          f"{snapshot}")
            console.print(f"  to restore it: inv db.restore --env={self.settings.env} "
                          f"--snapshot={name}")
        self.s.audit(operation="rollback", deployment_id=self.chosen["id"],
                     version=self.chosen["version"], result="succeeded", slot=self.new_slot)
        self.run_hook("post-rollback", "rolled_back")
        self.notify("rolled_back")

    def on_failure(self, step: str, message: str) -> None:
        where = "traffic was not switched: the current version keeps serving" \
            if not self.switched else f"traffic is on {self.new_slot}"
        self.s.console.note(f"rollback failed ({step}); {where}.")
        self.s.audit(operation="rollback", deployment_id=self.chosen.get("id"),
                     version=self.chosen.get("version"), result="failed", step=step)

    def hook_values(self, status: str) -> dict[str, object]:
        return {"operation": "rollback", "environment": self.settings.env,
                "version": self.chosen.get("version"),
                "git_commit": self.chosen.get("git_commit"),
                "deployment_id": self.chosen.get("id"), "slot": self.new_slot,
                "status": status, "duration": self.elapsed()}

    def notify_fields(self) -> dict[str, object]:
        return {"deployment_id": self.chosen.get("id"), "version": self.chosen.get("version"),
                "git_commit": self.chosen.get("git_commit")}
