"""`inv audit`: the primary host's audit log (one JSON object per line, appended by
Session.audit), newest last."""

from __future__ import annotations

import json
from typing import Any

from . import commands as cmd
from .errors import UsageError
from .session import Session

DEFAULT_LINES = 50
# Shown first, in this order; any other field follows as key=value.
LEADING = ("ts", "operation", "result", "by")


def read_audit(session: Session, lines: int) -> list[dict[str, Any]]:
    if lines < 1:
        raise UsageError("--lines must be at least 1")
    out = session.primary.run(cmd.audit_tail_command(session.settings.remote_dir, lines),
                              timeout=60, what="reading the audit log").stdout
    return [parse_record(line) for line in out.splitlines() if line.strip()]


def parse_record(line: str) -> dict[str, Any]:
    """One audit line; a line that is not a JSON object (edited by hand, cut by a full disk)
    is kept as `{"raw": line}` rather than hiding the rest of the log."""
    try:
        record = json.loads(line)
    except ValueError:
        return {"raw": line}
    return record if isinstance(record, dict) else {"raw": line}


def format_record(record: dict[str, Any]) -> str:
    """`2026-01-02T03:04:05Z  deploy  succeeded  alice@example.com  version=abc1234 ...`"""
    if "raw" in record:
        return record["raw"]
    head = [str(record.get(key, "-")) for key in LEADING]
    rest = [f"{k}={v}" for k, v in sorted(record.items())
            if k not in LEADING and k != "environment" and v is not None]
    return "  ".join(head + rest)
