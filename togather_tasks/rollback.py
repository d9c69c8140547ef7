"""Rollback (SPEC section 7): traffic back to the previous deployment, or to one named by
version or id, with the same gate as a deploy: start its slot from its image (rebuilt from its
commit if the image is gone), health-gate it, switch, verify, record. Migrations are not rolled
back: the operator is shown the snapshot and the exact restore command."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from . import hooks, images, notify, slots, source
from .errors import TogatherError
from .lock import describe
from .output import Progress
from .pipeline import pause_if_requested
from .session import Session
from .signals import shielded
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


class Rollback:
    def __init__(self, session: Session, options: RollbackOptions) -> None:
        self.s = session
        self.settings = session.settings
        self.options = options
        self.progress = Progress(session.console, session.log,
                                 1 if options.dry_run else len(STEPS))
        self.started = time.monotonic()
        self.lock: dict[str, Any] | None = None
        self.state: State | None = None
        self.target: dict[str, Any] = {}
        self.slot = ""
        self.old_slot = ""
        self.switched = False
        self.started_slot = False
        self.traffic_seconds: float | None = None

    def run(self) -> dict[str, Any]:
        with self.progress.step("validate", "state and target") as note:
            self.state = self.s.store.read().state
            self.target = choose_target(self.state, self.options.to)
            self.old_slot = self.state.active_slot or "blue"
            self.slot = other_slot(self.old_slot)
            note(f"{self.state.current['version']} -> {self.target['version']} "
                 f"(slot {self.slot})")
        if self.options.dry_run:
            return self.target
        self.acquire_lock()
        self.notify("started")
        try:
            for step in (self.image, self.start, self.health, self.switch, self.record,
                         self.finish):
                pause_if_requested(step.__name__)
                step()
        except BaseException as exc:
            with shielded():
                self.fail(exc)
            raise
        finally:
            with shielded():
                self.release_lock()
        self.after()
        return self.state.current

    def plan(self) -> list[str]:
        return [
            f"[{h}] start {self.slot} slot from {self.image_ref()} (rebuild from "
            f"{self.target['git_commit'][:7]} if the image is gone)" for h in self.settings.hosts
        ] + [f"[{h}] health-gate {self.slot}, switch nginx, verify" for h in self.settings.hosts]

    def image_ref(self) -> str:
        return self.target.get("image") or f"{self.settings.image}:{self.target['version']}"

    def acquire_lock(self) -> None:
        with self.progress.step("lock", "taking the environment lock") as note:
            self.lock, decision = self.s.store.acquire(
                self.s.operator, deployment_id=self.target["id"], operation="rollback",
                timeout_minutes=self.settings.deployment["lock_timeout_minutes"])
            if decision.replaced:
                self.s.console.warn(f"took over the lock of "
                                    f"{describe(decision.replaced, utc_now())}: {decision.reason}")
            fresh = self.s.store.read().state
            if fresh.current and self.state.current and \
                    fresh.current["id"] != self.state.current["id"]:
                raise RollbackError("the environment changed while taking the lock; retry")
            serving = slots.serving_slot(self.settings, self.s.primary)
            if serving and serving != self.old_slot:
                self.s.console.warn(f"the proxy serves {serving}, not {self.old_slot} as the "
                                    "state file says; rolling back into the other slot")
                self.old_slot, self.slot = serving, other_slot(serving)
            note(self.lock["lock_id"])

    def image(self) -> None:
        with self.progress.step("image", self.image_ref()) as note:
            build = images.Build(self.settings, self.target["git_commit"], utc_now())
            rebuilt = []
            for host in self.s.all_hosts:
                if images.image_present(host, self.image_ref(), self.target["git_commit"]):
                    continue
                self.s.console.warn(f"{self.image_ref()} is gone on {host.name}; rebuilding it "
                                    f"from commit {build.sha7}")
                source.resolve_ref(self.settings.root, self.target["git_commit"])
                slots.prepare_host(self.settings, host, primary=host is self.s.primary)
                images.ensure_image(build, host)
                rebuilt.append(host.name)
            note("rebuilt on " + ", ".join(rebuilt) if rebuilt else "present")

    def slot_target(self) -> slots.SlotTarget:
        return slots.SlotTarget(self.slot, self.image_ref(), self.target["version"])

    def start(self) -> None:
        with self.progress.step("start", f"{self.slot} slot") as note:
            for host in self.s.all_hosts:
                self.started_slot = True
                slots.start_slot(self.settings, host, self.slot_target())
            note(f"app-{self.slot} running {self.image_ref()}")

    def health(self) -> None:
        with self.progress.step("health", f"health gate on {self.slot}") as note:
            for host in self.s.all_hosts:
                verdict = slots.health_gate(self.settings, host, self.slot_target(),
                                            self.s.console)
            note(f"{self.slot} is {verdict.status}")

    def switch(self) -> None:
        with self.progress.step("switch", f"nginx -> {self.slot}") as note:
            for host in self.s.all_hosts:
                if slots.switch_traffic(self.settings, host, self.slot_target()) == "recreated":
                    self.s.console.warn(f"{host.name}: the proxy ran an older image and was "
                                        "recreated")
            self.switched = True
            self.traffic_seconds = time.monotonic() - self.started
            note(f"traffic on {self.slot} ({self.target['version']}) after "
                 f"{self.traffic_seconds:.1f}s")

    def record(self) -> None:
        with self.progress.step("record", "deployment state") as note:
            limit = self.settings.deployment["history_limit"]
            self.state = self.s.store.update(lambda state: state.record_rollback(
                self.target, self.slot, "healthy", utc_now(), limit))
            note(f"{self.target['id']} is current again "
                 f"(rollback_count {self.state.current['rollback_count']})")

    def finish(self) -> None:
        with self.progress.step("finish", "drain and stop the rolled-back slot") as note:
            time.sleep(self.settings.deployment["drain_seconds"])
            for host in self.s.all_hosts:
                try:
                    slots.stop_slot(self.settings, host, self.old_slot)
                except TogatherError as exc:
                    self.s.console.warn(exc.message)
            note(f"app-{self.old_slot} stopped")

    def after(self) -> None:
        rolled_back = self.state.previous or {}
        console = self.s.console
        console.print(f"rolled back {self.settings.env} to {self.target['version']} "
                      f"({self.target['id']}) in {time.monotonic() - self.started:.1f}s")
        console.warn("database migrations are NOT rolled back.")
        snapshot = rolled_back.get("snapshot")
        if snapshot:
            name = os.path.basename(snapshot)
            console.print(f"  snapshot taken before {rolled_back.get('version')} migrated: "
                          f"{snapshot}")
            console.print(f"  to restore it: inv db.restore --env={self.settings.env} "
                          f"--snapshot={name}")
        self.s.audit(operation="rollback", deployment_id=self.target["id"],
                     version=self.target["version"], result="succeeded", slot=self.slot)
        hooks.run_hook(self.settings.root, "post-rollback", self.hook_values("rolled_back"),
                       console)
        self.notify("rolled_back")

    def fail(self, exc: BaseException) -> None:
        step = self.progress.current or "before the first step"
        if not self.switched and self.started_slot:
            for host in self.s.all_hosts:
                try:
                    slots.stop_slot(self.settings, host, self.slot)
                except TogatherError as stop_exc:
                    self.s.console.warn(stop_exc.message)
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        where = "traffic was not switched: the current version keeps serving" \
            if not self.switched else f"traffic is on {self.slot}"
        self.s.console.note(f"rollback failed ({step}); {where}.")
        self.s.audit(operation="rollback", deployment_id=self.target.get("id"),
                     version=self.target.get("version"), result="failed", step=step)
        hooks.run_hook(self.settings.root, "on-failure",
                       {**self.hook_values("failed"), "failed_step": step}, self.s.console)
        self.notify("failed", step=step, message=message)

    def release_lock(self) -> None:
        if self.lock:
            try:
                self.s.store.release(self.lock["lock_id"])
            except TogatherError as exc:
                self.s.console.error(f"could not release the lock: {exc.message}")
            self.lock = None

    def hook_values(self, status: str) -> dict[str, object]:
        return {"operation": "rollback", "environment": self.settings.env,
                "version": self.target.get("version"),
                "git_commit": self.target.get("git_commit"),
                "deployment_id": self.target.get("id"), "slot": self.slot, "status": status,
                "duration": int(time.monotonic() - self.started)}

    def notify(self, event: str, **fields: object) -> None:
        notify.notify(self.settings, self.s.console, self.s.redact, event,
                      deployment_id=self.target.get("id"), version=self.target.get("version"),
                      slot=self.slot, by=self.s.operator.email,
                      duration_seconds=int(time.monotonic() - self.started), **fields)

