"""The deployment state file: a pure model (no I/O) with its transitions and schema checks.

Compatible with the original bash tools' format (shared/compat/deployment-state.schema.json):
fields this package adds (`image`, `snapshot`, `duration_seconds`, `message`, ...) are optional, so
files written by the old tools read fine and files written here validate against the old schema.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from .errors import StateError

SCHEMA_PATH = Path(__file__).parent / "schemas" / "deployment-state.schema.json"


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime | None:
    """A timestamp read from a state file, or None when this machine cannot represent it.

    The schema accepts every RFC 3339 date-time, which is more than `fromisoformat` takes (a
    lowercase `t`/`z`, an offset that pushes 9999-12-31 past year 9999); a hand-edited or
    hostile file must make a command degrade, never crash it.
    """
    try:
        return datetime.fromisoformat(text.upper().replace("Z", "+00:00")).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def other_slot(slot: str) -> str:
    return "green" if slot == "blue" else "blue"


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def validate(document: Any, where: str) -> None:
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
            for e in errors[:5])
        raise StateError(f"{where} does not match the state schema: {details}",
                         hint="The file was not changed. Inspect it, fix or restore it by hand; "
                              "`inv status --env=...` shows it once valid.")


@dataclass
class State:
    """One environment's state. Deployments are plain dicts in the file's own shape, so unknown
    fields written by other tools survive a read-modify-write."""

    environment: str
    current: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    lock: dict[str, Any] = field(default_factory=lambda: {"locked": False})
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, environment: str) -> State:
        return cls(environment=environment)

    @classmethod
    def from_json(cls, text: str, where: str, environment: str) -> State:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno})",
                             hint="It may be truncated. The file was not changed; restore it "
                                  "from a backup or fix it by hand.") from None
        validate(document, where)
        if document["environment"] != environment:
            raise StateError(f"{where} belongs to environment {document['environment']!r}, "
                             f"not {environment!r}")
        known = {"environment", "current_deployment", "previous_deployment",
                 "deployment_history", "lock"}
        return cls(
            environment=document["environment"],
            current=document.get("current_deployment"),
            previous=document.get("previous_deployment"),
            history=list(document.get("deployment_history") or []),
            lock=document.get("lock") or {"locked": False},
            extra={k: v for k, v in document.items() if k not in known},
        )

    def to_document(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "current_deployment": self.current,
            "previous_deployment": self.previous,
            "deployment_history": self.history,
            "lock": self.lock,
            **self.extra,
        }

    def to_json(self) -> str:
        document = self.to_document()
        validate(document, "the state to be written")
        return json.dumps(document, indent=2, ensure_ascii=True) + "\n"

    def copy(self) -> State:
        return copy.deepcopy(self)

    # --- queries -------------------------------------------------------------------------

    @property
    def active_slot(self) -> str | None:
        return self.current["active_slot"] if self.current else None

    def next_slot(self) -> str:
        """The slot a new deployment goes to: the inactive one; blue on a first deploy."""
        return other_slot(self.active_slot) if self.active_slot else "blue"

    def find(self, version_or_id: str) -> dict[str, Any] | None:
        """The newest successful deployment matching an id or a (short or full) git SHA."""
        for entry in self.known_deployments():
            if entry.get("status") == "failed":
                continue
            if version_or_id in (entry["id"], entry["version"], entry["git_commit"]):
                return entry
            if len(version_or_id) >= 7 and entry["git_commit"].startswith(version_or_id):
                return entry
        return None

    def rollback_candidates(self) -> list[dict[str, Any]]:
        current_id = self.current["id"] if self.current else None
        return [e for e in self.known_deployments()
                if e.get("status") != "failed" and e["id"] != current_id]

    def known_deployments(self) -> list[dict[str, Any]]:
        """Current, previous and history, one entry per id, newest first (files written by
        the original tools keep current and previous out of the history)."""
        seen: dict[str, dict[str, Any]] = {}
        for entry in [self.current, self.previous, *self.history]:
            if entry and entry["id"] not in seen:
                seen[entry["id"]] = entry
        return sorted(seen.values(), key=lambda e: e["id"], reverse=True)

    # --- transitions (each returns a new State; the caller persists it) -------------------

    def with_lock(self, lock: dict[str, Any]) -> State:
        new = self.copy()
        new.lock = dict(lock)
        return new

    def without_lock(self) -> State:
        return self.with_lock({"locked": False})

    def record_success(self, deployment: dict[str, Any], history_limit: int) -> State:
        """A verified deployment becomes current; the old current becomes previous."""
        new = self.copy()
        entry = {**deployment, "status": "active"}
        if new.current:
            new.previous = {**new.current, "status": "superseded"}
            new._set_history_status(new.current["id"], "superseded")
        new.current = entry
        new._add_history(history_entry(entry), history_limit)
        return new

    def record_failure(self, deployment: dict[str, Any], history_limit: int) -> State:
        """A failed deployment goes into the history only; traffic (current) is unchanged."""
        new = self.copy()
        new._add_history(history_entry({**deployment, "status": "failed"}), history_limit)
        return new

    def record_rollback(self, target: dict[str, Any], slot: str, health_status: str,
                        at: datetime, history_limit: int) -> State:
        """Traffic went back to `target`, now running in `slot`; the rolled-back deployment
        becomes previous with status rolled_back."""
        if not self.current:
            raise StateError("nothing to roll back: no current deployment")
        new = self.copy()
        rolled_back = {**new.current, "status": "rolled_back"}
        restored = {
            **target,
            "status": "active",
            "active_slot": slot,
            "health_status": health_status,
            "rollback_count": int(target.get("rollback_count", 0)) + 1,
            "rolled_back_at": iso(at),
        }
        new.previous = rolled_back
        new.current = restored
        new._set_history_status(rolled_back["id"], "rolled_back")
        for item in new.history:
            if item["id"] == restored["id"]:
                item.update(status="active", active_slot=slot,
                            rollback_count=restored["rollback_count"])
                break
        else:
            new._add_history(history_entry(restored), history_limit)
        return new

    def _set_history_status(self, deployment_id: str, status: str) -> None:
        for item in self.history:
            if item["id"] == deployment_id:
                item["status"] = status

    def _add_history(self, entry: dict[str, Any], limit: int) -> None:
        self.history = [e for e in self.history if e["id"] != entry["id"]]
        self.history.insert(0, entry)
        self.history.sort(key=lambda e: e["id"], reverse=True)
        self.history = self.history[:limit]


HISTORY_FIELDS = ("id", "version", "git_commit", "deployed_at", "deployed_by", "status",
                  "health_status", "duration_seconds", "migrations_run", "active_slot",
                  "image", "snapshot", "rollback_count", "message")


def history_entry(deployment: dict[str, Any]) -> dict[str, Any]:
    return {k: deployment[k] for k in HISTORY_FIELDS if deployment.get(k) is not None}


def new_deployment(*, deployment_id: str, git_commit: str, deployed_by: str, slot: str,
                   image: str, at: datetime) -> dict[str, Any]:
    return {
        "id": deployment_id,
        "version": git_commit[:7],
        "git_commit": git_commit,
        "deployed_at": iso(at),
        "deployed_by": deployed_by,
        "active_slot": slot,
        "health_status": "unknown",
        "status": "deploying",
        "migrations_run": 0,
        "rollback_count": 0,
        "image": image,
    }
