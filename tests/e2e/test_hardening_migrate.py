"""Issue 8, database items end to end on the real test bed (staging over SSH): the URL's TLS
settings reach pg_dump and the migration tool (13), a failed migration shows the tool's own
error (24), and a deploy with no pending migration takes no snapshot (27).

The test bed's PostgreSQL runs without TLS, so `sslmode=require` must now fail: that proves the
setting is honoured (before, pg_dump silently connected in clear)."""

from __future__ import annotations

import re

from conftest import DemoApp, WebhookReceiver, assert_clean_failure

EXIT_MIGRATION = 5
SQL_ERROR = 'syntax error at or near "THIS"'
BAD_MIGRATION = {"db/migrations/20260201000000_bad.sql":
                 "-- migrate:up\nTHIS IS NOT SQL;\n-- migrate:down\n"}
GOOD_MIGRATION = {"db/migrations/20260201000000_notes.sql":
                  "-- migrate:up\nCREATE TABLE notes (id serial PRIMARY KEY);\n"
                  "-- migrate:down\nDROP TABLE notes;\n"}


def require_tls(app: DemoApp) -> None:
    """Ask for TLS in the URL pg_dump and the migrations use (the env file stays mode 600)."""
    text = app.env_file.read_text()
    assert "sslmode=disable" in text
    app.env_file.write_text(text.replace("sslmode=disable", "sslmode=require"))


def test_sslmode_require_reaches_pg_dump(demo_app: DemoApp) -> None:
    """`inv db.snapshot` is pg_dump alone: with sslmode=require against a server without TLS
    it must refuse to connect, not dump the database in clear."""
    demo_app.deploy(check=True)
    before = demo_app.snapshots()
    require_tls(demo_app)

    result = demo_app.inv("db.snapshot", demo_app.env_flag)

    assert_clean_failure(result, contains="snapshot failed")
    assert "SSL" in result.stderr, result.stderr
    assert demo_app.snapshots() == before
    demo_app.assert_no_secrets()


def test_failed_migration_shows_the_sql_error_everywhere(demo_app: DemoApp,
                                                         receiver: WebhookReceiver) -> None:
    """Item 24: the console, the webhook and the state say what PostgreSQL said, not the
    tool's last progress line (`Applying: ...`)."""
    demo_app.write_config(notifications={"webhook_url": receiver.url})
    demo_app.deploy(check=True)
    demo_app.commit("a broken migration", BAD_MIGRATION)

    result = demo_app.deploy()

    line = assert_clean_failure(result, contains=SQL_ERROR, code=EXIT_MIGRATION)
    assert "20260201000000_bad.sql" in line
    message = demo_app.state()["deployment_history"][0]["message"]
    assert SQL_ERROR in message, message
    failed = [e for e in receiver.events if e["event"] == "failed"]
    assert failed and SQL_ERROR in failed[-1]["message"], failed
    demo_app.assert_no_secrets(*(r.decode() for r in receiver.raw))


def test_no_pending_migration_takes_no_snapshot(demo_app: DemoApp) -> None:
    """Item 27: a deploy whose migrations are all applied skips the dump and the tool; the
    next one with a new migration snapshots first and records where."""
    demo_app.deploy(check=True)
    assert len(demo_app.snapshots()) == 1
    demo_app.commit("no schema change", {"app/VERSION_NOTE": "2\n"})

    quiet = demo_app.deploy(check=True)

    assert re.search(r"\] snapshot +[0-9.]+s +skipped \(no pending migration\)", quiet.stdout), \
        quiet.stdout
    assert "migration tool not run" in quiet.stdout
    assert len(demo_app.snapshots()) == 1
    current = demo_app.state()["current_deployment"]
    assert "snapshot" not in current and current["migrations_run"] == 0

    demo_app.commit("a new table", GOOD_MIGRATION)
    migrating = demo_app.deploy(check=True)

    assert "1 applied" in migrating.stdout
    assert len(demo_app.snapshots()) == 2
    current = demo_app.state()["current_deployment"]
    assert current["snapshot"] == str(demo_app.snapshots()[-1])
    assert "notes" in demo_app.tables()


def test_snapshot_always_keeps_the_old_behaviour(demo_app: DemoApp) -> None:
    demo_app.write_config(database={"snapshot": "always"}, commit=True)
    demo_app.deploy(check=True)
    demo_app.commit("no schema change", {"app/VERSION_NOTE": "2\n"})

    result = demo_app.deploy(check=True)

    assert "no pending migration (database.snapshot: always)" in result.stdout
    assert len(demo_app.snapshots()) == 2
    assert demo_app.state()["current_deployment"]["snapshot"] == str(demo_app.snapshots()[-1])


def test_pending_check_honours_sslmode_before_any_dump(demo_app: DemoApp) -> None:
    """Items 13 and 27: the read-only pending check connects with the URL's TLS settings too,
    so sslmode=require fails the deploy before any snapshot or migration."""
    demo_app.deploy(check=True)
    demo_app.commit("a new table", GOOD_MIGRATION)
    require_tls(demo_app)

    result = demo_app.deploy()

    assert_clean_failure(result, contains="SSL")
    assert len(demo_app.snapshots()) == 1
    assert "notes" not in demo_app.tables()
