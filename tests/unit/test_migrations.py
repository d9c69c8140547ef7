"""Pending migrations and migration failures (issue 8 items 24 and 27): exact commands, the
parsers, and the failure message (the tool's error, redacted before it is cut)."""

from __future__ import annotations

import pytest

from togather_tasks import commands as cmd
from togather_tasks.config import Settings
from togather_tasks.deploy import describe_pending
from togather_tasks.redact import MASK, Redactor

from .projects import DB_PASSWORD, Project
from .test_commands import PG_ENV, URL_NO_PASSWORD

DBMATE_STATUS = """\
[X] 20260101000001_create_events.sql
[X] 20260101000002_create_jobs.sql
[ ] 20260201000000_notes.sql
[ ] 20260202000000_more notes.sql

Applied: 2
Pending: 2
"""
DBMATE_FAILURE_OUT = "Applying: 20260201000000_bad.sql\n"
DBMATE_FAILURE_ERR = ('Error: line: 2, column: 1, position: 15: pq: syntax error at or near '
                      '"THIS" at position 2:1 (42601)\n')


def test_dbmate_status_command_is_exact(settings: Settings) -> None:
    assert cmd.dbmate_status_command(settings, "/srv/r/db/migrations") == (
        f"{PG_ENV} timeout --kill-after=10 60 dbmate --url '{URL_NO_PASSWORD}' "
        "--migrations-dir /srv/r/db/migrations --wait --wait-timeout 10s status")


def test_parse_dbmate_status_lists_the_pending_ones() -> None:
    assert cmd.parse_dbmate_status(DBMATE_STATUS) == [
        "20260201000000_notes.sql", "20260202000000_more notes.sql"]


def test_parse_dbmate_status_with_nothing_pending() -> None:
    assert cmd.parse_dbmate_status("[X] 1_a.sql\n\nApplied: 1\nPending: 0\n") == []


@pytest.mark.parametrize("current, pending", [
    (None, ["1_init.up.sql", "2_jobs.up.sql", "10_notes.up.sql"]),
    (1, ["2_jobs.up.sql", "10_notes.up.sql"]),
    (2, ["10_notes.up.sql"]),
    (10, []),
    (11, []),
])
def test_golang_migrate_pending(current: int | None, pending: list[str]) -> None:
    files = ["10_notes.up.sql", "10_notes.down.sql", "1_init.up.sql", "1_init.down.sql",
             "2_jobs.up.sql", "2_jobs.down.sql", "README.md"]
    assert cmd.golang_migrate_pending(files, current) == pending


@pytest.mark.parametrize("pending, text", [
    (None, "the migration command (it cannot list what is pending)"),
    ([], "no pending migration (database.snapshot: always)"),
    (["1_a.sql"], "1 pending: 1_a.sql"),
    ([f"{i}_m.sql" for i in range(7)], "7 pending: 0_m.sql, 1_m.sql, 2_m.sql, 3_m.sql, "
                                       "4_m.sql ..."),
])
def test_describe_pending(pending: list[str] | None, text: str) -> None:
    assert describe_pending(pending) == text


# --- item 24: the failure says what the tool said ---------------------------------------------


def test_migration_failure_shows_the_sql_error_not_the_last_stdout_line() -> None:
    assert cmd.migration_failure(DBMATE_FAILURE_OUT, DBMATE_FAILURE_ERR, 1, Redactor()) == (
        "migration 20260201000000_bad.sql failed: line: 2, column: 1, position: 15: pq: "
        'syntax error at or near "THIS" at position 2:1 (42601)')


def test_migration_failure_of_golang_migrate() -> None:
    err = ("error: migration failed: syntax error at or near \"THIS\" (column 1) in line 1: "
           "THIS IS NOT SQL;\n (details: pq: syntax error at or near \"THIS\")\n")
    assert cmd.migration_failure("", err, 1, Redactor()) == (
        'migration failed: migration failed: syntax error at or near "THIS" (column 1) in '
        'line 1: THIS IS NOT SQL; / (details: pq: syntax error at or near "THIS")')


@pytest.mark.parametrize("stdout, exit_status, text", [
    ("Waiting for database...\nsomething odd\n", 1, "migration failed: something odd"),
    ("", 2, "migration failed: exit 2"),
])
def test_migration_failure_without_stderr(stdout: str, exit_status: int, text: str) -> None:
    assert cmd.migration_failure(stdout, "", exit_status, Redactor()) == text


def test_migration_failure_is_redacted_before_it_is_cut() -> None:
    """A secret that straddles the cut must not leave its first half in the message."""
    secret = "Sup3r-secret-database-passw0rd"
    err = "x" * 370 + f" connecting with {secret}\n"
    message = cmd.migration_failure("", err, 1, Redactor([secret]))
    assert secret[:8] not in message
    assert len(message) == 400 and message.endswith("...")


def test_migration_failure_redacts_urls_and_the_database_password(project: Project) -> None:
    settings = project.load("staging")
    err = (f"Error: dial postgres://togather_app:{DB_PASSWORD}@db.internal/x failed; "
           f"password={DB_PASSWORD}\n")
    message = cmd.migration_failure("", err, 1, settings.redactor())
    assert DB_PASSWORD not in message
    assert MASK in message


# --- configuration ------------------------------------------------------------------------


def test_snapshot_policy_defaults_to_when_migrating(settings: Settings) -> None:
    assert settings.database["snapshot"] == "when-migrating"


def test_snapshot_policy_always_is_accepted(project: Project) -> None:
    project.write_config(project.config_path.read_text() + "database:\n  snapshot: always\n")
    assert project.load("staging").database["snapshot"] == "always"


def test_snapshot_policy_rejects_other_values(project: Project) -> None:
    from togather_tasks.errors import ConfigError
    project.write_config(project.config_path.read_text() + "database:\n  snapshot: never\n")
    with pytest.raises(ConfigError, match="snapshot"):
        project.load("staging")
