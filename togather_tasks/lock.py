"""Lock rules, pure: who may take the environment's lock, given the lock recorded in the state
file, the clock and whether the recorded holder process is still alive.

The atomicity lives elsewhere (a compare-and-swap of the state file on the host, see store.py);
this module only decides.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .state import iso, parse_iso
from .ulid import new_id


@dataclass(frozen=True)
class Operator:
    """Who is acting: recorded as `locked_by`/`deployed_by`, `hostname` and `pid`."""

    email: str
    hostname: str
    pid: int

    @classmethod
    def current(cls, cwd: str | None = None) -> Operator:
        hostname = socket.gethostname()
        return cls(email=operator_email(hostname, cwd), hostname=hostname, pid=os.getpid())


def operator_email(hostname: str, cwd: str | None = None) -> str:
    """git's user.email, else user@hostname (the state schema wants an e-mail)."""
    try:
        out = subprocess.run(["git", "config", "user.email"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out and "@" in out and " " not in out:
        return out
    return f"{getpass.getuser()}@{hostname}"


@dataclass(frozen=True)
class Decision:
    """`acquire` is True when the caller may write its lock; `replaced` names the lock it
    takes over (stale or forced) so the operator is told whose lock was broken."""

    acquire: bool
    reason: str
    replaced: dict[str, Any] | None = None


def new_lock(operator: Operator, *, deployment_id: str, now: datetime, timeout_minutes: int,
             operation: str, message: str | None = None, with_pid: bool = True) -> dict[str, Any]:
    lock: dict[str, Any] = {
        "locked": True,
        "lock_id": new_id("lock"),
        "locked_by": operator.email,
        "locked_at": iso(now),
        "lock_expires_at": iso(now + timedelta(minutes=timeout_minutes)),
        "deployment_id": deployment_id,
        "hostname": operator.hostname,
        "operation": operation,
    }
    # A manual lock (lock.acquire) outlives its process on purpose: no pid, so it is never
    # judged "holder gone"; it ends by release or expiry.
    if with_pid:
        lock["pid"] = operator.pid
    if message:
        lock["message"] = message
    return lock


def renewed(lock: dict[str, Any], now: datetime, timeout_minutes: int) -> dict[str, Any]:
    return {**lock, "lock_expires_at": iso(now + timedelta(minutes=timeout_minutes))}


def decide(current: dict[str, Any], *, now: datetime, force: bool, local_hostname: str,
           process_alive: Callable[[int], bool]) -> Decision:
    if not current.get("locked"):
        return Decision(True, "unlocked")
    expires = parse_iso(current["lock_expires_at"])
    if now >= expires:
        return Decision(True, f"the lock expired at {iso(expires)}", current)
    pid = current.get("pid")
    if (pid is not None and current.get("hostname") == local_hostname
            and not process_alive(int(pid))):
        return Decision(True, f"its holder (pid {pid} on {local_hostname}) is gone", current)
    if force:
        return Decision(True, "--force", current)
    return Decision(False, "held", current)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(lock: dict[str, Any], now: datetime) -> str:
    """`ops@example.com (pid 123 on laptop, deploy dep_…) for 4m12s, expires in 25m48s`."""
    age = now - parse_iso(lock["locked_at"])
    left = parse_iso(lock["lock_expires_at"]) - now
    where = []
    if lock.get("pid") is not None:
        where.append(f"pid {lock['pid']}")
    if lock.get("hostname"):
        where.append(f"on {lock['hostname']}")
    if lock.get("operation"):
        where.append(f"{lock['operation']} {lock.get('deployment_id', '')}".strip())
    text = f"{lock['locked_by']} ({', '.join(where)}) for {human_duration(age)}"
    if lock.get("message"):
        text += f", message: {lock['message']!r}"
    if left.total_seconds() > 0:
        return text + f", expires in {human_duration(left)}"
    return text + f", expired {human_duration(-left)} ago"


def human_duration(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
