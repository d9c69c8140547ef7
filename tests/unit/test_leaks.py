"""Secrets on the real output paths (issue 8, item 16): a message cut to a length, a value
escaped by repr() or json.dumps(), a debug traceback. Each path redacts first."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from invoke import Exit

from togather_tasks.cli import guarded
from togather_tasks.config import Settings
from togather_tasks.errors import CommandError
from togather_tasks.hosts import LocalHost, Result
from togather_tasks.output import Console, RunLog
from togather_tasks.redact import Redactor
from togather_tasks.session import COMMAND_LOG_TAIL, Session

# Backslash and quote: both change under repr() and json.dumps().
SECRET = 'tricky\\secret"value-0123456789'
ESCAPED = json.dumps(SECRET)[1:-1]


def _no_secret_part(text: str) -> None:
    for part in (SECRET, ESCAPED, SECRET[:12], SECRET[-12:]):
        assert part not in text


def test_error_detail_is_redacted_before_it_is_cut() -> None:
    # The secret straddles the 300-character cut of the error detail.
    host = LocalHost(redact=Redactor([SECRET]))
    with pytest.raises(CommandError) as caught:
        host.run(f"printf '%s' {'x' * 290}'{SECRET.replace(chr(39), '')}' >&2; exit 3",
                 timeout=10)
    _no_secret_part(caught.value.message)


class _RecordingHost(LocalHost):
    """A primary host that records the commands it is asked to run instead of running them."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: list[str] = []

    def _run(self, command: str, timeout: float | None) -> Result:
        self.commands.append(command)
        return Result(command, 0, "", "", 0.0)


def _session(settings: Settings, tmp_path: Path, err: io.StringIO) -> tuple[Session, Path]:
    redactor = Redactor([SECRET])
    log_path = tmp_path / "run.log"
    session = Session(settings, Console(redactor, err=err), RunLog(log_path, redactor))
    return session, log_path


def test_command_log_tail_is_cut_after_redaction(settings: Settings, tmp_path: Path) -> None:
    session, log_path = _session(settings, tmp_path, io.StringIO())
    stderr = SECRET + "y" * (COMMAND_LOG_TAIL - 20)
    session._observe(LocalHost(), Result("false", 1, "", stderr, 0.1))
    session.close()
    _no_secret_part(log_path.read_text())


def test_audit_line_is_redacted_before_json_escaping(settings: Settings, tmp_path: Path) -> None:
    session, _ = _session(settings, tmp_path, io.StringIO())
    host = _RecordingHost()
    session._hosts[settings.primary_host] = host
    session.__dict__["operator"] = type("Op", (), {"email": "ops@example.com"})()
    session.audit(operation="test", message=f"failed: {SECRET}")
    _no_secret_part(host.commands[0])
    assert "***" in host.commands[0]


def test_internal_error_is_redacted_in_the_debug_traceback_and_the_run_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOGATHER_DEBUG", "1")
    redactor = Redactor([SECRET])
    err = io.StringIO()
    log = RunLog(tmp_path / "run.log", redactor)
    with pytest.raises(Exit), guarded(Console(redactor, err=err), log):
        raise KeyError(SECRET)
    log.close()
    assert "Traceback" in err.getvalue()
    _no_secret_part(err.getvalue())
    for line in (tmp_path / "run.log").read_text().splitlines():
        _no_secret_part(json.dumps(json.loads(line)["error"]))
        _no_secret_part(json.loads(line)["error"])
