"""The package's exception tree and the exit-code contract.

Every expected failure is a `TogatherError` subclass carrying its exit code, so the task layer
turns it into `invoke.Exit(message, code)` in one place and no operator ever sees a traceback for
a held lock, a bad config or an unreachable host.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes scripts rely on (SPEC section 2). The only place these numbers appear."""

    OK = 0
    FAILURE = 1
    INVALID_ARGUMENTS = 2
    LOCK_HELD = 3
    HEALTH_FAILED = 4
    MIGRATION_FAILED = 5
    CONFIG_ERROR = 10


class TogatherError(Exception):
    """An expected failure: one clear message, an exit code, optionally what to do next."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class UsageError(TogatherError):
    exit_code = ExitCode.INVALID_ARGUMENTS


class ConfigError(TogatherError):
    """Configuration or secrets file rejected (missing, invalid, wrong mode, placeholder)."""

    exit_code = ExitCode.CONFIG_ERROR

    def __init__(self, problems: list[str] | str, *, hint: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        text = self.problems[0] if len(self.problems) == 1 else "\n".join(
            [f"configuration has {len(self.problems)} problems:"]
            + [f"  - {p}" for p in self.problems]
        )
        super().__init__(text, hint=hint)


class LockHeldError(TogatherError):
    exit_code = ExitCode.LOCK_HELD


class LockLostError(LockHeldError):
    """Our lock expired or was taken over while the operation ran: nothing destructive may
    happen after this (exit 3, like a lock held by someone else)."""


class HealthCheckError(TogatherError):
    exit_code = ExitCode.HEALTH_FAILED


class MigrationError(TogatherError):
    exit_code = ExitCode.MIGRATION_FAILED


class StateError(TogatherError):
    """The state file on the host is unreadable, corrupt or fails its schema."""


class HostError(TogatherError):
    """A host could not be reached or used: base of the connection errors below."""


class HostUnreachableError(HostError):
    pass


class HostAuthError(HostError):
    pass


class HostKeyError(HostError):
    pass


class CommandTimeoutError(HostError):
    pass


class CommandError(HostError):
    """A remote or local command exited non-zero where that means the step failed."""

    def __init__(self, message: str, *, exit_status: int = 1, stderr: str = "",
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.exit_status = exit_status
        self.stderr = stderr


class Interrupted(BaseException):
    """Raised from the SIGINT/SIGTERM handler.

    A BaseException (not KeyboardInterrupt) on purpose: Invoke's runners swallow
    KeyboardInterrupt to forward it to the child, which for a remote command without a pty
    does nothing; any other exception leaves the wait loop, so cleanup (lock release) runs now.
    """

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame
