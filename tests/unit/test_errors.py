"""The exit-code contract (SPEC section 2) and the error classes that carry it."""

from __future__ import annotations

import pytest

from togather_tasks import errors
from togather_tasks.errors import ExitCode


def test_exit_code_values_are_the_contract() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "FAILURE": 1,
        "INVALID_ARGUMENTS": 2,
        "LOCK_HELD": 3,
        "HEALTH_FAILED": 4,
        "MIGRATION_FAILED": 5,
        "CONFIG_ERROR": 10,
    }


@pytest.mark.parametrize("cls, code", [
    (errors.TogatherError, 1),
    (errors.UsageError, 2),
    (errors.LockHeldError, 3),
    (errors.HealthCheckError, 4),
    (errors.MigrationError, 5),
    (errors.ConfigError, 10),
    (errors.StateError, 1),
    (errors.HostError, 1),
    (errors.HostUnreachableError, 1),
    (errors.HostAuthError, 1),
    (errors.HostKeyError, 1),
    (errors.CommandTimeoutError, 1),
    (errors.CommandError, 1),
])
def test_error_class_maps_to_its_exit_code(cls: type[errors.TogatherError], code: int) -> None:
    assert issubclass(cls, errors.TogatherError)
    assert cls("boom").exit_code == code


def test_hint_is_appended_to_the_message() -> None:
    exc = errors.TogatherError("it failed", hint="do this")
    assert exc.message == "it failed"
    assert str(exc) == "it failed\ndo this"


def test_config_error_with_one_problem_is_that_problem() -> None:
    exc = errors.ConfigError("config/deployment.yml: app.name: required")
    assert exc.problems == ["config/deployment.yml: app.name: required"]
    assert str(exc) == "config/deployment.yml: app.name: required"


def test_config_error_lists_every_problem() -> None:
    exc = errors.ConfigError(["first", "second", "third"])
    assert exc.problems == ["first", "second", "third"]
    assert exc.message.splitlines() == ["configuration has 3 problems:",
                                        "  - first", "  - second", "  - third"]


def test_command_error_keeps_status_and_stderr() -> None:
    exc = errors.CommandError("docker failed", exit_status=125, stderr="no such image")
    assert (exc.exit_status, exc.stderr) == (125, "no such image")


def test_interrupted_is_not_an_ordinary_exception() -> None:
    assert not issubclass(errors.Interrupted, Exception)
    assert errors.Interrupted("SIGTERM").signame == "SIGTERM"
