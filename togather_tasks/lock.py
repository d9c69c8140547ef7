"""Lock rules, pure: who may take the environment's lock, given the lock recorded in the state
file, the host's clock and whether the recorded holder process is provably gone.

The atomicity lives elsewhere (a compare-and-swap of the state file on the host, see store.py);
this module only decides, and store.py calls it inside the compare-and-swap.

Time is always the host's (read in the same round trip as the state), never an operator
machine's: a laptop whose clock runs 31 minutes ahead must not see a fresh lock as expired.

"Holder gone" is proven only on the machine that took the lock: same machine id (a random id,
not the hostname, which two laptops may share) and same boot (a cloned VM shares the machine id
but never the boot id), and the pid is free or now belongs to a process started at another time
(pid reuse).
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .state import iso, parse_iso
from .ulid import new_id

MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
ID_RE = re.compile(r"[0-9a-f-]{16,64}")


@dataclass(frozen=True)
class Operator:
    """Who is acting: recorded as `locked_by`/`deployed_by`, `hostname` and `pid`, and, to
    prove later that the process is gone, the machine, the boot and the process start time."""

    email: str
    hostname: str
    pid: int
    machine_id: str | None = None
    boot_id: str | None = None
    process_started: str | None = None

    @classmethod
    def current(cls, cwd: str | None = None) -> Operator:
        hostname = socket.gethostname()
        pid = os.getpid()
        return cls(email=operator_email(hostname, cwd), hostname=hostname, pid=pid,
                   machine_id=read_machine_id(), boot_id=read_boot_id(),
                   process_started=process_start_time(pid))


def read_machine_id(home: Path | None = None) -> str | None:
    """The OS's machine id, else a random one kept in ~/.togather/machine-id (macOS has none),
    created 0600 from the first byte and with O_EXCL, so two first runs agree on one id. None
    when neither can be had: then no lock of ours is ever judged "holder gone" (expiry only)."""
    for path in MACHINE_ID_FILES:
        found = _read_id(path)
        if found:
            return found
    path = (home or Path.home()) / ".togather" / "machine-id"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_id(path)
    except OSError:
        return None
    new = secrets.token_hex(16)
    with os.fdopen(fd, "w") as out:
        out.write(new + "\n")
    return new


def read_boot_id() -> str | None:
    """Linux's id of the running boot; None elsewhere."""
    return _read_id(BOOT_ID_FILE)


def _read_id(path: Path) -> str | None:
    try:
        text = path.read_text().strip().lower()
    except OSError:
        return None
    return text if ID_RE.fullmatch(text) else None


def process_start_time(pid: int) -> str | None:
    """When process `pid` started, as an opaque token compared for equality only (None: no such
    process, or this system does not tell). Linux: clock ticks since boot from /proc (exact);
    elsewhere `ps -o lstart=` (to the second, enough to tell a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        return _ps_start_time(pid)
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return f"ticks:{fields[19]}" if len(fields) > 19 else None


def _ps_start_time(pid: int) -> str | None:
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=5, check=False, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return None
    text = " ".join(out.stdout.split())
    return f"lstart:{text}" if out.returncode == 0 and text else None


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
        lock.update({k: v for k, v in (("machine_id", operator.machine_id),
                                       ("boot_id", operator.boot_id),
                                       ("process_started", operator.process_started)) if v})
    if message:
        lock["message"] = message
    return lock


def renewed(lock: dict[str, Any], now: datetime, timeout_minutes: int) -> dict[str, Any]:
    return {**lock, "lock_expires_at": iso(now + timedelta(minutes=timeout_minutes))}


def decide(current: dict[str, Any], *, now: datetime, force: bool, here: Operator,
           process_alive: Callable[[int], bool],
           start_time: Callable[[int], str | None]) -> Decision:
    """May `here` take the lock, at the host's time `now`?"""
    if not current.get("locked"):
        return Decision(True, "unlocked")
    expires = parse_iso(current["lock_expires_at"])
    if expires is not None and now >= expires:
        return Decision(True, f"the lock expired at {iso(expires)}", current)
    if holder_gone(current, here, process_alive, start_time):
        return Decision(True, f"its holder (pid {current['pid']} on this machine, "
                              f"{current.get('hostname', '?')}) is gone", current)
    if force:
        return Decision(True, "--force", current)
    if expires is None:
        return Decision(False, f"held, with an unreadable expiry "
                               f"{current['lock_expires_at']!r} (only --force breaks it)",
                        current)
    return Decision(False, "held", current)


def holder_gone(lock: dict[str, Any], here: Operator, process_alive: Callable[[int], bool],
                start_time: Callable[[int], str | None]) -> bool:
    """Provably gone: taken on this machine in this boot, and its pid is free or reused."""
    pid = lock.get("pid")
    if pid is None or here.machine_id is None or lock.get("machine_id") != here.machine_id:
        return False
    if lock.get("boot_id") != here.boot_id:
        return False
    if not process_alive(pid):
        return True
    recorded = lock.get("process_started")
    # A start time that cannot be read now is no proof: the process may be the holder.
    return recorded is not None and start_time(pid) not in (None, recorded)


def is_mine(lock: dict[str, Any], operator: Operator) -> bool:
    """May `lock.release` free this lock without --force? Only a manual lock (no pid: it
    outlives its process on purpose) taken by the same operator; a running operation's lock
    is released by that operation."""
    return bool(lock.get("locked")) and lock.get("locked_by") == operator.email \
        and lock.get("pid") is None


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
    locked_at = parse_iso(lock["locked_at"])
    expires = parse_iso(lock["lock_expires_at"])
    where = []
    if lock.get("pid") is not None:
        where.append(f"pid {lock['pid']}")
    if lock.get("hostname"):
        where.append(f"on {lock['hostname']}")
    if lock.get("operation"):
        where.append(f"{lock['operation']} {lock.get('deployment_id', '')}".strip())
    since = f"for {human_duration(now - locked_at)}" if locked_at \
        else f"since {lock['locked_at']!r}"
    text = f"{lock['locked_by']} ({', '.join(where)}) {since}"
    if lock.get("message"):
        text += f", message: {lock['message']!r}"
    if expires is None:
        return text + f", expiry unreadable ({lock['lock_expires_at']!r})"
    if expires > now:
        return text + f", expires in {human_duration(expires - now)}"
    return text + f", expired {human_duration(now - expires)} ago"


def human_duration(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
