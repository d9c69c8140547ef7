"""What the operator sees and what is kept: progress lines on the console and a JSON-lines run
log (~/.togather/logs/deployments/<env>_<UTC timestamp>.log). Both pass through the redactor;
nothing else in the package prints.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from .redact import Redactor

LOG_DIR_ENV = "TOGATHER_LOG_DIR"
DEBUG_ENV = "TOGATHER_DEBUG"


def default_log_dir() -> Path:
    return Path(os.environ.get(LOG_DIR_ENV) or Path.home() / ".togather" / "logs" / "deployments")


class RunLog:
    """Append-only JSON lines, one object per event, every string redacted."""

    def __init__(self, path: Path | None, redactor: Redactor) -> None:
        self.path = path
        self.redactor = redactor
        self._fh: TextIO | None = None
        # A fleet's hosts report their commands from worker threads: one line at a time.
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._fh = os.fdopen(fd, "a", encoding="utf-8")

    @classmethod
    def for_run(cls, env: str, operation: str, redactor: Redactor) -> RunLog:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{env}_{stamp}.log" if operation == "deploy" else f"{env}_{operation}_{stamp}.log"
        return cls(default_log_dir() / name, redactor)

    def event(self, kind: str, **fields: Any) -> None:
        if self._fh is None:
            return
        record = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": kind,
                  **fields}
        line = json.dumps(self.redactor.redact_obj(record), default=str) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# Escape sequences (CSI, OSC, two-character ESC forms) and every other control character but
# newline and tab: values read from the host (state file, lock holder, health JSON) are data,
# and must not be able to move the cursor, retitle the terminal or hide a line.
_TERMINAL_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"            # CSI: colours, cursor moves, erase
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"   # OSC: window title, hyperlinks
    r"|\x1b[@-_]?"                         # other ESC sequences, a lone ESC
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")       # C0 (but \t, \n) and C1 controls


def printable(text: str) -> str:
    """`text` without terminal control sequences."""
    return _TERMINAL_CONTROL.sub("", text)


class Console:
    def __init__(self, redactor: Redactor, *, stream: TextIO | None = None,
                 err: TextIO | None = None, quiet: bool = False) -> None:
        self.redactor = redactor
        self.out = stream or sys.stdout
        self.err = err or sys.stderr
        self.quiet = quiet
        self.debug_enabled = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        self._tty = hasattr(self.out, "isatty") and self.out.isatty()

    def print(self, text: str = "") -> None:
        if not self.quiet:
            self._emit(text, self.out)

    def always(self, text: str) -> None:
        """Printed even with --json/quiet (the JSON document itself)."""
        self._emit(text, self.out)

    def warn(self, text: str) -> None:
        self._emit(f"warning: {text}", self.err)

    def note(self, text: str) -> None:
        """Context for an error, on stderr, without the `error:` prefix (one error line per
        failure keeps scripts and eyes on the real message)."""
        self._emit(text, self.err)

    def error(self, text: str) -> None:
        self._emit(f"error: {text}", self.err)

    def debug(self, text: str) -> None:
        if self.debug_enabled:
            self._emit(f"debug: {text}", self.err)

    def _emit(self, text: str, stream: TextIO) -> None:
        # Controls out first: a secret split by an escape sequence is whole again, then masked.
        print(self.redactor(printable(text)), file=stream, flush=True)



class Progress:
    """One line per step: `[3/10] build      12.4s  togather-server:abc1234 built`."""

    def __init__(self, console: Console, log: RunLog, total: int) -> None:
        self.console = console
        self.log = log
        self.total = total
        self.index = 0
        self.timings: dict[str, float] = {}
        self.current: str | None = None
        self.completed: list[str] = []

    @contextmanager
    def step(self, name: str, title: str) -> Iterator[StepNote]:
        self.index += 1
        self.current = name
        note = StepNote()
        prefix = f"[{self.index}/{self.total}] {name:<9}"
        if self.console._tty and not self.console.quiet:
            print(f"{prefix} {title} ...", end="\r", file=self.console.out, flush=True)
        self.log.event("step_start", step=name)
        start = time.monotonic()
        try:
            yield note
        except BaseException as exc:
            elapsed = time.monotonic() - start
            self.timings[name] = elapsed
            self.console.print(f"{prefix} {elapsed:6.1f}s  FAILED")
            self.log.event("step_failed", step=name, seconds=round(elapsed, 3),
                           error=str(exc) or type(exc).__name__)
            raise
        elapsed = time.monotonic() - start
        self.timings[name] = elapsed
        self.completed.append(name)
        self.console.print(f"{prefix} {elapsed:6.1f}s  {note.text or title}")
        self.log.event("step_done", step=name, seconds=round(elapsed, 3), detail=note.text)
        self.current = None


class StepNote:
    """What a step reports on its progress line once done."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, text: str) -> None:
        self.text = text
